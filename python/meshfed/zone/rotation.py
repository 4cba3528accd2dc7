"""The rotation service: advances CA rotations in a running controller and notices trust changes.

``meshfed trust rotate`` (or the API) starts a rotation by writing the new
root and its deadlines into the zone's store. This service, run by the
controller, moves each phase on when its deadline passes and calls
``on_trust_changed`` whenever what the gateway must trust or present has
changed: a phase moved, or another process (the CLI) changed a bundle. The
controller then rebuilds the gateway config: new pools, and a new gateway SVID
once a new CA signs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable

from meshfed.errors import MeshfedError
from meshfed.supervisor import Component, Supervisor
from meshfed.zone import Zone

log = logging.getLogger(__name__)

DEFAULT_CHECK_INTERVAL = dt.timedelta(seconds=10)

TrustChanged = Callable[[], Awaitable[None]]
# The moment only (a meshfed.clock.Clock also sleeps): what the rotation service reads the time with.
UtcNow = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class RotationService:
    """Advance the zone's CA rotation on time and report trust changes.

    ``check_interval`` bounds how late a change made by another process is
    noticed; phase deadlines are met on time regardless. ``clock`` is
    injectable so tests can move time instead of waiting for it.
    """

    def __init__(
        self,
        zone: Zone,
        on_trust_changed: TrustChanged,
        *,
        check_interval: dt.timedelta = DEFAULT_CHECK_INTERVAL,
        clock: UtcNow = utc_now,
        supervisor: Supervisor | None = None,
    ) -> None:
        self._zone = zone
        self._on_trust_changed = on_trust_changed
        self._check_interval = check_interval
        self._clock = clock
        self._supervisor = supervisor or Supervisor(zone.name)
        self._task: Component | None = None
        self._seen: tuple[object, ...] | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        self._seen = await asyncio.to_thread(self._trust_state)
        self._task = self._supervisor.spawn("ca-rotation", self._run)

    async def stop(self) -> None:
        if self._task is not None:
            await self._task.cancel()
        self._task = None

    def wake(self) -> None:
        """Check now (after a rotation started in this process, or a moved test clock)."""
        self._wake.set()

    async def check(self) -> bool:
        """One pass: advance due phases; call ``on_trust_changed`` if anything changed. True if it did."""
        steps = await asyncio.to_thread(self._zone.authority.advance, self._clock())
        for step in steps:
            log.info("zone %s: CA generation %d %s: %s", self._zone.name, step.generation, step.state, step.message)
        state = await asyncio.to_thread(self._trust_state)
        if not steps and state == self._seen:
            return False
        self._seen = state
        await self._on_trust_changed()
        return True

    async def _run(self) -> None:
        while True:
            # Cleared before the check, not after: a wake() that arrives during the check
            # stays set and causes another check at once instead of being lost.
            self._wake.clear()
            try:
                await self.check()
            except MeshfedError as err:
                log.error("zone %s: CA rotation check failed, retrying: %s", self._zone.name, err)
            await self._sleep_until_next_check()

    async def _sleep_until_next_check(self) -> None:
        delay = self._check_interval.total_seconds()
        deadline = await asyncio.to_thread(self._zone.authority.next_deadline)
        if deadline is not None:
            delay = max(0.0, min(delay, (deadline - self._clock()).total_seconds()))
        with contextlib.suppress(TimeoutError):
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that races the event.
            async with asyncio.timeout(delay):
                await self._wake.wait()

    def _trust_state(self) -> tuple[object, ...]:
        # What the gateway depends on: every bundle's revision and the signing generation.
        bundles = tuple(
            (s.bundle.trust_domain.name, s.bundle.sequence, s.source) for s in self._zone.trust.trusted_bundles()
        )
        active = tuple(g.generation for g in self._zone.authority.generations() if g.state == "active")
        return bundles, active


__all__ = ["DEFAULT_CHECK_INTERVAL", "RotationService"]
