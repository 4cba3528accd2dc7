"""The bundle poller: keeps each federated trust domain's bundle fresh from its bundle endpoint.

For every federation relationship in the zone's store, the poller fetches the
bundle at the bundle's refresh hint (default 5 minutes), keeps the highest
``spiffe_sequence``, stores a newer one with source ``federation`` and calls
``on_trust_changed`` so the controller pushes the new pool to the gateway. A
failed fetch or a bad bundle changes nothing: the zone keeps trusting what it
held.

A lower sequence holding the same authorities is a lagging replica or a
replay, and is ignored. A lower sequence with *other* authorities is a
sequence reset (the endpoint was redeployed, say a SPIRE server with a fresh
datastore starting again at 1): since every fetch is authenticated (the
pinned SPIFFE ID verified against the bundle held, or the Web PKI identity of
the host), it is the domain's own endpoint speaking, so the bundle is taken
and a warning names the domain and both sequences.

Relationships added or changed by another process (``meshfed trust
federate`` writes ``state.db``) are noticed by reading their definitions
every :data:`STORE_CHECK_INTERVAL` while the poller waits: the first fetch
follows within about that. In the zone's own process, :meth:`BundlePoller.wake`
polls at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from meshfed.errors import MeshfedError
from meshfed.store import Federation
from meshfed.supervisor import Component, Supervisor
from meshfed.trust.bundle import DEFAULT_REFRESH_HINT_SECONDS, newest
from meshfed.trust.endpoint_client import EndpointSpec, fetch_bundle
from meshfed.trust.spiffe import SpiffeId, TrustDomain
from meshfed.zone import Zone

log = logging.getLogger(__name__)

DEFAULT_REFRESH = dt.timedelta(seconds=DEFAULT_REFRESH_HINT_SECONDS)
# A failed poll is retried sooner than the hint, but not in a tight loop.
RETRY_AFTER_ERROR = dt.timedelta(seconds=30)
# How often a waiting poller reads the federation definitions (one small SELECT) for changes by the CLI.
STORE_CHECK_INTERVAL = dt.timedelta(seconds=0.5)


class BundlePoller:
    """Poll every federated bundle endpoint of ``zone``; a controller service.

    ``interval`` overrides the refresh hints (tests, or an operator who wants
    faster convergence); ``fetch_timeout`` bounds each fetch.
    """

    def __init__(
        self,
        zone: Zone,
        on_trust_changed: Callable[[], Awaitable[None]],
        *,
        interval: dt.timedelta | None = None,
        retry_after_error: dt.timedelta = RETRY_AFTER_ERROR,
        fetch_timeout: dt.timedelta = dt.timedelta(seconds=10),
        store_check_interval: dt.timedelta = STORE_CHECK_INTERVAL,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._zone = zone
        self._on_trust_changed = on_trust_changed
        self._interval = interval
        self._retry_after_error = retry_after_error
        self._fetch_timeout = fetch_timeout
        self._store_check_interval = store_check_interval
        self._supervisor = supervisor or Supervisor(zone.name)
        self._task: Component | None = None
        self._wake = asyncio.Event()
        # The refresh hint each endpoint announced last: honoured at once, even when the sequence (and
        # so the bundle held) did not change.
        self._hints: dict[TrustDomain, int] = {}
        # Why each relationship's last poll failed; the poller is not ready while any has.
        self._failing: dict[TrustDomain, str] = {}

    async def start(self) -> None:
        self._task = self._supervisor.spawn("bundle-poller", self._run, ready=self._not_ready)

    def _not_ready(self) -> str | None:
        failing = sorted(self._failing.items(), key=lambda item: item[0].name)
        return "; ".join(f"the last poll of {domain} failed: {error}" for domain, error in failing) or None

    async def stop(self) -> None:
        if self._task is not None:
            await self._task.cancel()
        self._task = None

    def wake(self) -> None:
        """Poll every endpoint now (after `meshfed trust federate` added one, say)."""
        self._wake.set()

    async def poll_all(self) -> dt.timedelta:
        """Poll every relationship once; returns how long to wait before the next round."""
        federations = await asyncio.to_thread(self._zone.trust.federations)
        current = {federation.trust_domain for federation in federations}
        self._hints = {domain: hint for domain, hint in self._hints.items() if domain in current}
        self._failing = {domain: error for domain, error in self._failing.items() if domain in current}
        waits = [await self._poll(federation) for federation in federations]
        return min(waits, default=self._interval or DEFAULT_REFRESH)

    async def poll(self, federation: Federation) -> bool:
        """Poll one endpoint; True if a newer bundle was stored (and ``on_trust_changed`` called)."""
        held = await asyncio.to_thread(self._zone.trust.bundle_of, federation.trust_domain)
        spec = EndpointSpec(
            federation.trust_domain,
            federation.endpoint_url,
            federation.profile,
            SpiffeId.parse(federation.endpoint_spiffe_id) if federation.endpoint_spiffe_id else None,
            federation.web_ca_pem,
        )
        verifier = held
        if spec.endpoint_spiffe_id is not None and spec.endpoint_spiffe_id.trust_domain != federation.trust_domain:
            verifier = await asyncio.to_thread(self._zone.trust.bundle_of, spec.endpoint_spiffe_id.trust_domain)
        now = dt.datetime.now(dt.UTC)
        try:
            fetched = await fetch_bundle(spec, verifier, self._fetch_timeout.total_seconds())
        except MeshfedError as err:
            log.warning("federation with %s: %s (keeping the bundle held)", federation.trust_domain, err)
            self._failing[federation.trust_domain] = str(err)
            await asyncio.to_thread(self._zone.trust.record_poll, federation.trust_domain, now, str(err))
            raise
        self._failing.pop(federation.trust_domain, None)
        self._hints[federation.trust_domain] = fetched.refresh_hint_seconds
        kept = newest(held, fetched)
        if held is not None and fetched.sequence < held.sequence:
            if fetched.same_content(held):
                message = (
                    f"endpoint served spiffe_sequence {fetched.sequence}, lower than the {held.sequence} held, "
                    "with the same authorities; ignored"
                )
                log.warning("federation with %s: %s", federation.trust_domain, message)
                await asyncio.to_thread(self._zone.trust.record_poll, federation.trust_domain, now, message)
                return False
            log.warning(
                "federation with %s: sequence reset: %s now serves spiffe_sequence %d, lower than the %d held, "
                "with other authorities; taking it (the endpoint was redeployed?), as %s",
                federation.trust_domain,
                spec.url,
                fetched.sequence,
                held.sequence,
                _served_by(spec),
            )
            kept = fetched
        await asyncio.to_thread(self._zone.trust.record_poll, federation.trust_domain, now, None)
        if kept is held:
            return False
        if not await asyncio.to_thread(self._zone.trust.store_federated_bundle, kept):
            log.info("federation with %s ended while its bundle was fetched; not stored", federation.trust_domain)
            return False
        log.info(
            "federation with %s: bundle sequence %d stored (%d root(s))",
            federation.trust_domain,
            kept.sequence,
            len(kept.roots),
        )
        await self._on_trust_changed()
        return True

    async def _poll(self, federation: Federation) -> dt.timedelta:
        try:
            await self.poll(federation)
        except MeshfedError:
            return min(self._retry_after_error, self._interval or self._retry_after_error)
        if self._interval is not None:
            return self._interval
        hint = self._hints.get(federation.trust_domain)
        if hint is not None:
            return _refresh_interval(hint)
        held = await asyncio.to_thread(self._zone.trust.bundle_of, federation.trust_domain)
        return _refresh_interval(held.refresh_hint_seconds if held is not None else 0)

    async def _run(self) -> None:
        while True:
            self._wake.clear()  # before polling, so a wake() during the poll is not lost
            seen = await asyncio.to_thread(self._federation_revision)
            try:
                wait = await self.poll_all()
            except MeshfedError as err:
                log.error("zone %s: bundle polling failed: %s", self._zone.name, err)
                wait = self._retry_after_error
            await self._wait(wait, self._federation_revision, seen)

    def _federation_revision(self) -> object:
        # Opened in the worker thread: a poller cancelled while it waits for the thread must not close a
        # connection the thread still uses (sqlite3 crashes on that).
        with self._zone.store() as store:
            return store.federation_revision()

    async def _wait(self, wait: dt.timedelta, revision: Callable[[], object], seen: object) -> None:
        """Until ``wait`` has passed, :meth:`wake` is called, or a relationship was added, changed or ended."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait.total_seconds()
        while (remaining := deadline - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that races the event.
                async with asyncio.timeout(min(remaining, self._store_check_interval.total_seconds())):
                    await self._wake.wait()
                    return
            if await asyncio.to_thread(revision) != seen:
                log.info("zone %s: federation relationships changed; polling now", self._zone.name)
                return


def _served_by(spec: EndpointSpec) -> str:
    if spec.profile == "https_spiffe":
        return f"it was served by the pinned {spec.endpoint_spiffe_id}, verified against the bundle held"
    host = urlsplit(spec.url).hostname
    return f"it was served by {host}, verified by the Web PKI" + (" (--web-ca)" if spec.web_ca_pem else "")


def _refresh_interval(hint_seconds: int) -> dt.timedelta:
    return DEFAULT_REFRESH if hint_seconds <= 0 else dt.timedelta(seconds=hint_seconds)


__all__ = ["DEFAULT_REFRESH", "STORE_CHECK_INTERVAL", "BundlePoller"]
