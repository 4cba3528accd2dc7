"""A clock for tests that moves only when told: :class:`ManualClock` (a :class:`meshfed.clock.Clock`).

A test hands it to what it tests in place of :data:`meshfed.clock.SYSTEM_CLOCK`,
then moves time with :meth:`ManualClock.advance` instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import itertools

_NS = 1_000_000_000


class ManualClock:
    """Time that stands still until :meth:`advance` moves it; its sleepers wake then, never on real time.

    ``now()`` and ``monotonic()`` move together, by exactly what was advanced.
    Time is kept in whole nanoseconds, so sleeps and advances that add up to
    the same seconds reach the same moment (``0.1 + 0.2`` is ``0.3`` here).
    ``now()`` starts at ``start`` (default: the real time of construction, to
    the second, so that what it stamps reads sensibly on the system clock too).
    """

    def __init__(self, start: dt.datetime | None = None, monotonic_start: float = 1000.0) -> None:
        self._start = start or dt.datetime.now(dt.UTC).replace(microsecond=0)
        if self._start.tzinfo is None:
            raise ValueError("a ManualClock starts at an aware datetime")
        self._monotonic_start = monotonic_start
        self._elapsed = 0  # nanoseconds
        # (deadline in ns, order of arrival, the future the sleeper awaits, the sleeping task)
        self._sleepers: list[tuple[int, int, asyncio.Future[None], asyncio.Task[object] | None]] = []
        self._order = itertools.count()
        # Tasks woken by advance() that have neither slept again nor finished (see settled()).
        self._woken: set[asyncio.Task[object]] = set()
        self._changed: asyncio.Event | None = None

    # -- the Clock protocol ------------------------------------------------

    def now(self) -> dt.datetime:
        return self._start + dt.timedelta(microseconds=self._elapsed // 1000)

    def monotonic(self) -> float:
        return self._monotonic_start + self._elapsed / _NS

    async def sleep(self, seconds: float) -> None:
        """Return once :meth:`advance` has moved time to ``seconds`` from now or beyond (0 or less: one loop turn)."""
        task = asyncio.current_task()
        if task is not None:
            self._settle(task)
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._elapsed + _to_ns(seconds), next(self._order), future, task))
        self._notify()
        await future  # cancelled: its entry stays in the heap, done, and is dropped when time reaches it

    # -- for the test ------------------------------------------------------

    def advance(self, seconds: float) -> int:
        """Move time on by ``seconds`` and wake every sleeper whose deadline it reaches; returns how many woke."""
        if seconds < 0:
            raise ValueError(f"time does not go back: advance({seconds})")
        self._elapsed += _to_ns(seconds)
        woken = 0
        while self._sleepers and self._sleepers[0][0] <= self._elapsed:
            _, _, future, task = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)
                woken += 1
                if task is not None and task not in self._woken:
                    self._woken.add(task)
                    task.add_done_callback(self._settle)
        return woken

    @property
    def sleepers(self) -> int:
        """How many sleeps are waiting for time to move."""
        return sum(1 for _, _, future, _ in self._sleepers if not future.done())

    async def settled(self) -> None:
        """Wait until every task that :meth:`advance` woke has slept again on this clock, or finished.

        After ``advance(...)`` then ``await settled()``, every task whose sleep
        ended has run to its next sleep: what it does at that moment is done
        (for a task that slept itself; one that raced a sleep in a task of its
        own is not followed). A woken task that then waits on something else
        (a message, a lock) keeps this waiting; the test's overall timeout
        catches that.
        """
        while any(not task.done() for task in self._woken):
            await self._change().wait()
        self._woken.clear()

    async def wait_for_sleepers(self, count: int) -> None:
        """Wait until at least ``count`` sleeps are waiting on this clock (the code under test reached its timers)."""
        while self.sleepers < count:
            await self._change().wait()

    # -- internals ---------------------------------------------------------

    def _settle(self, task: asyncio.Task[object]) -> None:
        if task in self._woken:
            self._woken.discard(task)
            self._notify()

    def _change(self) -> asyncio.Event:
        if self._changed is None or self._changed.is_set():
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()


def _to_ns(seconds: float) -> int:
    return round(seconds * _NS)


__all__ = ["ManualClock"]
