"""Time as the control plane reads it: one :class:`Clock`, injectable, so tests move time instead of waiting.

A :class:`Clock` gives the three things the peering code asks of time: the
wall-clock moment (:meth:`~Clock.now`, for what is stored and compared with
other zones: token expiry, heartbeat times), a monotonic reading
(:meth:`~Clock.monotonic`, for intervals: heartbeat deadlines, grace periods)
and a sleep on that same time. :data:`SYSTEM_CLOCK` is the real one and every
default; the tests' manual clock (``tests/clocks.py``) moves only when told.

Not to be confused with the bare ``now`` callable that
:class:`~meshfed.zone.rotation.RotationService` takes (``rotation.UtcNow``,
``Callable[[], datetime]``): rotation needs the moment only, no sleep.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Final, Protocol


class Clock(Protocol):
    """Where a component reads the time and waits for it."""

    def now(self) -> dt.datetime:
        """The current moment, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that never goes back; only differences mean anything."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return once ``seconds`` have passed on this clock's monotonic time (at once for 0 or less)."""
        ...


class SystemClock:
    """The real time: ``datetime.now(UTC)``, ``time.monotonic()`` and ``asyncio.sleep``."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK: Final[Clock] = SystemClock()

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock"]
