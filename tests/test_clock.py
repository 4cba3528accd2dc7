"""The clocks: the system one is the real time; the manual one moves only when advanced, and wakes sleepers then."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from meshfed.clock import SYSTEM_CLOCK, Clock
from tests.clocks import ManualClock

START = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def test_the_system_clock_reads_the_real_time():
    before = dt.datetime.now(dt.UTC)
    now, monotonic = SYSTEM_CLOCK.now(), SYSTEM_CLOCK.monotonic()
    assert before <= now <= dt.datetime.now(dt.UTC)
    assert now.tzinfo is dt.UTC
    assert SYSTEM_CLOCK.monotonic() >= monotonic

    async def zero_sleep() -> None:
        await SYSTEM_CLOCK.sleep(0)

    asyncio.run(zero_sleep())


def test_now_and_monotonic_move_together_and_only_when_advanced():
    clock: Clock = ManualClock(START, monotonic_start=50.0)
    assert isinstance(clock, ManualClock)
    assert (clock.now(), clock.monotonic()) == (START, 50.0)
    clock.advance(1.5)
    assert (clock.now(), clock.monotonic()) == (START + dt.timedelta(seconds=1.5), 51.5)
    clock.advance(0)
    assert clock.monotonic() == 51.5
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(-1)


def test_the_default_start_is_the_real_time_to_the_second():
    clock = ManualClock()
    assert clock.now().microsecond == 0
    assert abs((dt.datetime.now(dt.UTC) - clock.now()).total_seconds()) < 2
    with pytest.raises(ValueError, match="aware"):
        ManualClock(dt.datetime(2030, 1, 1))  # naive on purpose


def test_a_sleeper_wakes_when_time_reaches_its_deadline_and_not_before():
    async def scenario() -> None:
        clock = ManualClock(START)
        sleeper = asyncio.create_task(clock.sleep(2))
        await clock.wait_for_sleepers(1)
        assert clock.advance(1.999) == 0
        await asyncio.sleep(0)
        assert not sleeper.done()
        assert clock.advance(0.001) == 1
        await sleeper
        assert clock.sleepers == 0

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_sleepers_wake_in_deadline_order_and_sums_of_steps_are_exact():
    async def scenario() -> None:
        clock = ManualClock(START)
        woke: list[str] = []

        async def sleeper(name: str, first: float, second: float = 0) -> None:
            await clock.sleep(first)
            if second:
                await clock.sleep(second)
            woke.append(name)

        tasks = [
            asyncio.create_task(sleeper("late", 0.5)),
            asyncio.create_task(sleeper("steps", 0.1, 0.2)),  # 0.1 + 0.2 reaches 0.3 exactly
            asyncio.create_task(sleeper("early", 0.3)),
        ]
        await clock.wait_for_sleepers(3)
        clock.advance(0.1)
        await clock.settled()  # "steps" asleep again, until 0.3
        assert woke == []
        clock.advance(0.2)
        await clock.settled()
        assert woke == ["early", "steps"]  # both due at 0.3: "early" slept first
        clock.advance(0.2)
        await asyncio.gather(*tasks)
        assert woke == ["early", "steps", "late"]

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_one_advance_past_several_deadlines_wakes_them_all_at_once():
    async def scenario() -> None:
        clock = ManualClock(START)
        tasks = [asyncio.create_task(clock.sleep(seconds)) for seconds in (1, 2, 3)]
        await clock.wait_for_sleepers(3)
        assert clock.advance(10) == 3
        await asyncio.gather(*tasks)
        assert clock.monotonic() == 1010.0

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_settled_waits_until_each_woken_task_slept_again_or_ended():
    async def scenario() -> None:
        clock = ManualClock(START)
        ticks: list[float] = []

        async def ticker() -> None:
            while True:
                await clock.sleep(1)
                for _ in range(5):  # work spanning loop turns before the next sleep
                    await asyncio.sleep(0)
                ticks.append(clock.monotonic())

        async def once() -> None:
            await clock.sleep(1)
            for _ in range(5):
                await asyncio.sleep(0)

        task, single = asyncio.create_task(ticker()), asyncio.create_task(once())
        await clock.wait_for_sleepers(2)
        clock.advance(1)
        await clock.settled()
        assert ticks == [1001.0]
        assert single.done()
        clock.advance(0.5)
        await clock.settled()  # nothing woke: returns at once
        clock.advance(0.5)
        await clock.settled()
        assert ticks == [1001.0, 1002.0]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_a_cancelled_sleep_leaves_nothing_waiting():
    async def scenario() -> None:
        clock = ManualClock(START)
        sleeper = asyncio.create_task(clock.sleep(5))
        await clock.wait_for_sleepers(1)
        sleeper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sleeper
        assert clock.sleepers == 0
        assert clock.advance(10) == 0

    asyncio.run(asyncio.wait_for(scenario(), 10))
