"""Leading a Consul zone: a Consul session holding the lock of a KV key, as ``consul lock`` elects.

Every candidate keeps a session of its own, with a TTL and no health checks (the
TTL alone decides whether it lives), and tries to ``acquire`` the key with it.
Consul lets one session hold a key at a time, so two candidates never lead
together; the holder's identity is the key's value. Each try renews the
candidate's session and acquires again (a no-op for the holder, and how the
leader checks that it still holds the lock). A leader that cannot renew for
``renew_deadline`` — shorter than the TTL, after which Consul invalidates the
session and frees the key — stops leading (:class:`LeadershipLostError`) before
anyone else can take the key; after an invalidation Consul keeps the key from
new holders for ``lock_delay`` more. A leader that stops cleanly releases the
key and destroys its session, so a follower leads at its next try.

The token needs ``session:write`` (sessions are created on the agent's node)
and ``key:write`` on the key: ``helm/meshfed/examples/consul-acl-policy.hcl``.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from meshfed.clock import SYSTEM_CLOCK, Clock
from meshfed.errors import MeshfedError
from meshfed.leadership.campaign import Campaign, LeadershipLostError, check_timings

if TYPE_CHECKING:  # the Consul client loads only for a zone that campaigns
    from meshfed.catalog.consul_api import ConsulApi

log = logging.getLogger("meshfed.leadership")

# Consul's bounds on a session's TTL.
MIN_TTL, MAX_TTL = 10.0, 86_400.0


@dataclasses.dataclass(frozen=True)
class LockSettings:
    """The lock's key and this candidate; the timings keep a crashed leader's successor within about 2 TTLs."""

    key: str  # a Consul KV key, such as meshfed/east/leader
    identity: str  # this candidate, unique among them (a pod name)
    ttl: float = 10.0  # Consul invalidates a session not renewed for this long (it may take up to twice as long)
    renew_deadline: float = 7.0  # a leader that has not renewed for this long stops leading
    retry_period: float = 2.0  # how often candidates try, and the leader renews
    lock_delay: float = 2.0  # after an invalidation, the key takes no new holder for this long

    def __post_init__(self) -> None:
        if not MIN_TTL <= self.ttl <= MAX_TTL:
            raise ValueError(f"a Consul session's TTL is {MIN_TTL:g} s to {MAX_TTL:g} s, not {self.ttl:g} s")
        check_timings(self, self.ttl, "TTL")


class ConsulLockElector(Campaign):
    """One candidate for the lock of :class:`LockSettings`, over a :class:`ConsulApi`."""

    def __init__(self, api: ConsulApi, settings: LockSettings, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(settings, clock)
        self._api = api
        self.settings = settings
        self.session: str | None = None  # this candidate's session, while Consul keeps it

    @property
    def held(self) -> str:
        return f"Consul lock {self.settings.key}"

    def _check_when_lost(self) -> str:
        return (
            f"check Consul at {self._api.address} is reachable and the token grants session:write and key:write "
            f"on {self.settings.key} (helm/meshfed/examples/consul-acl-policy.hcl)"
        )

    async def try_acquire_or_renew(self) -> bool:
        now = self._clock.monotonic()
        if self.session is not None and await self._put(f"/v1/session/renew/{self.session}") is None:
            # Invalidated (its TTL passed, or an operator ended it): the key was released with it, and may
            # be another's after the lock delay. A leader stops at once, not at its renew deadline.
            dropped, self.session = self.session, None
            if self.leading:
                raise LeadershipLostError(
                    f"{self.held}: Consul dropped session {dropped} of {self.identity}, which released the lock; "
                    f"{self.identity} stops leading — {self._check_when_lost()}"
                )
        if self.session is None:
            self.session = await self._create_session()
        taken = await self._put(self._kv, {"acquire": self.session}, self.identity)
        if taken is True:
            return self._won(True, now)
        self.holder = await self._holder()
        if self.leading:
            raise LeadershipLostError(
                f"{self.held}: held by {self.holder or 'another session'} now; {self.identity} stops leading"
            )
        return False

    async def release(self) -> None:
        """Release the key if this candidate holds it, and end its session either way."""
        session, leading = self.session, self.leading
        self.session, self.leading = None, False
        if session is None:
            return
        try:
            if leading:
                await self._put(self._kv, {"release": session})
                log.info("%s: released by %s", self.held, self.identity)
            await self._put(f"/v1/session/destroy/{session}")
        except MeshfedError as err:
            log.warning(
                "%s: could not release it (%s); followers take over once Consul drops session %s (TTL %g s)",
                self.held,
                err,
                session,
                self.settings.ttl,
            )

    # -- the API ------------------------------------------------------------------------------------

    @property
    def _kv(self) -> str:
        return f"/v1/kv/{self.settings.key}"

    async def _create_session(self) -> str:
        body = {
            "Name": f"meshfed leader election: {self.identity}"[:256],
            "TTL": f"{self.settings.ttl:g}s",
            "LockDelay": f"{self.settings.lock_delay:g}s",
            "Behavior": "release",
            # No health checks: the TTL alone says whether the candidate lives (not the agent's node).
            "NodeChecks": [],
            "ServiceChecks": [],
        }
        answer = await self._put("/v1/session/create", body=body)
        session = answer.get("ID") if isinstance(answer, dict) else None
        if not isinstance(session, str) or not session:
            raise MeshfedError(f"Consul at {self._api.address} answered a session create without an ID: {answer!r}")
        return session

    async def _holder(self) -> str:
        """The holder's identity, as it wrote it into the key; "" if nobody holds it."""
        with self._api.described(self.held):
            answer = await self._api.get(self._kv)
        entries = answer.body if isinstance(answer.body, list) else []
        entry = entries[0] if entries and isinstance(entries[0], dict) else {}
        if not entry.get("Session"):
            return ""
        # Anyone with key:write may have written it: bounded, and quoted unless printable, before any log.
        try:
            holder = base64.b64decode(str(entry.get("Value") or ""), validate=True)[:256].decode(errors="replace")
        except ValueError:
            return "(unreadable)"
        return holder if holder.isprintable() else repr(holder)

    async def _put(self, path: str, params: dict[str, str] | None = None, body: Any = None) -> Any:
        with self._api.described(self.held):
            return await self._api.send(path, params=params, body=body)


__all__ = ["ConsulLockElector", "LockSettings"]
