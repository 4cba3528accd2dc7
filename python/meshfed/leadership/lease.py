"""Leading a Kubernetes zone: a ``coordination.k8s.io/v1`` Lease, as Kubernetes' own controllers elect theirs.

Every candidate reads the Lease. It leads when the Lease is free, or held by it,
or its holder has not renewed it for ``duration`` seconds — measured on the
candidate's own monotonic clock from when it last saw the record change, never by
comparing another host's timestamps (client-go's rule). Taking and renewing are
writes with the Lease's ``resourceVersion``: of two candidates writing at once,
the API server keeps one and answers the other ``409 Conflict``, so two never
lead together. A leader that cannot renew within ``renew_deadline`` stops
leading (:class:`LeadershipLostError`) before its Lease can expire for the others; a
leader that stops cleanly releases the Lease, so a follower takes over at its
next try instead of after ``duration``.

Followers are warm: they have loaded everything and poll every ``retry_period``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from typing import TYPE_CHECKING, Any

from meshfed.clock import SYSTEM_CLOCK, Clock
from meshfed.errors import MeshfedError
from meshfed.leadership.campaign import Campaign, check_timings

if TYPE_CHECKING:  # the Kubernetes client loads only for a zone that campaigns
    from meshfed.catalog.kubernetes_api import KubernetesApi

Document = dict[str, Any]

log = logging.getLogger("meshfed.leadership")


@dataclasses.dataclass(frozen=True)
class LeaseSettings:
    """The Lease and this candidate. The timings are Kubernetes' controllers' defaults."""

    namespace: str
    name: str
    identity: str  # this candidate, unique among them (a pod name)
    duration: float = 15.0  # a holder not seen renewing for this long has lost the Lease
    renew_deadline: float = 10.0  # a leader that has not renewed for this long stops leading
    retry_period: float = 2.0  # how often candidates try, and the leader renews

    def __post_init__(self) -> None:
        check_timings(self, self.duration, "duration")


class LeaseElector(Campaign):
    """One candidate for the Lease of :class:`LeaseSettings`, over a connected :class:`KubernetesApi`."""

    def __init__(self, api: KubernetesApi, settings: LeaseSettings, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(settings, clock)
        self._api = api
        self.settings = settings
        # The holder's record as last seen, and when (this clock's monotonic time) it was first seen so.
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0

    @property
    def held(self) -> str:
        return f"lease {self.settings.namespace}/{self.settings.name}"

    def _check_when_lost(self) -> str:
        return "check the Kubernetes API is reachable and the Role grants get/update on leases"

    async def release(self) -> None:
        """Give the Lease up if this candidate holds it, so a follower leads at its next try."""
        if not self.leading:
            return
        self.leading = False
        try:
            lease = await self._read()
            if lease is not None and _spec(lease).get("holderIdentity") == self.settings.identity:
                spec = {**_spec(lease), "holderIdentity": "", "leaseDurationSeconds": 1}
                await self._write(lease, spec)
                log.info("%s: released by %s", self.held, self.settings.identity)
        except MeshfedError as err:
            log.warning(
                "%s: could not release it (%s); followers take over in %g s", self.held, err, self.settings.duration
            )

    async def try_acquire_or_renew(self) -> bool:
        """One try: True if this candidate leads now (taken, renewed, or created)."""
        me = self.settings.identity
        now = self._clock.monotonic()
        lease = await self._read()
        stamp = _timestamp(self._clock.now())
        if lease is None:
            return self._won(await self._create(self._spec_for(None, stamp)), now)
        spec = _spec(lease)
        holder = str(spec.get("holderIdentity") or "")
        self.holder = holder
        record = (holder, spec.get("renewTime"), spec.get("leaseDurationSeconds"), spec.get("leaseTransitions"))
        if record != self._observed:
            self._observed, self._observed_at = record, now
        duration = float(spec.get("leaseDurationSeconds") or self.settings.duration)
        if holder and holder != me and now - self._observed_at < duration:
            self.leading = False
            return False
        return self._won(await self._write(lease, self._spec_for(spec, stamp)), now)

    def _spec_for(self, current: Document | None, stamp: str) -> Document:
        me = self.settings.identity
        taking = current is None or current.get("holderIdentity") != me
        spec: Document = dict(current or {})
        spec.update(holderIdentity=me, leaseDurationSeconds=int(self.settings.duration), renewTime=stamp)
        if taking:
            spec["acquireTime"] = stamp
            spec["leaseTransitions"] = int((current or {}).get("leaseTransitions") or 0) + (current is not None)
        return spec

    # -- the API ------------------------------------------------------------------------------------

    async def _read(self) -> Document | None:
        from meshfed.catalog.kubernetes_api import ApiError, NotFoundError

        try:
            return await self._api.request(self._api.read_call("leases", self.settings.namespace, self.settings.name))
        except NotFoundError:
            return None
        except ApiError as err:
            raise MeshfedError(self._api.describe(err)) from None

    async def _create(self, spec: Document) -> bool:
        from meshfed.catalog.kubernetes_api import ApiError

        body = {"metadata": {"name": self.settings.name, "namespace": self.settings.namespace}, "spec": spec}
        try:
            await self._api.request(self._api.create_call("leases", self.settings.namespace, body))
        except ApiError as err:
            if err.status == 409:  # another candidate created it first
                return False
            raise MeshfedError(self._api.describe(err)) from None
        return True

    async def _write(self, lease: Document, spec: Document) -> bool:
        from meshfed.catalog.kubernetes_api import ApiError

        # The resourceVersion read makes this a compare-and-swap: a write in between gets 409.
        body = {"metadata": lease["metadata"], "spec": spec}
        try:
            await self._api.request(self._api.replace_call("leases", self.settings.namespace, self.settings.name, body))
        except ApiError as err:
            if err.status == 409:
                return False
            raise MeshfedError(self._api.describe(err)) from None
        return True


def _spec(lease: Document) -> Document:
    spec = lease.get("spec")
    return dict(spec) if isinstance(spec, dict) else {}


def _timestamp(moment: dt.datetime) -> str:
    """A MicroTime, as the Lease's renewTime and acquireTime hold it."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


__all__ = ["LeaseElector", "LeaseSettings"]
