"""The supervisor: crashed or killed components are seen and restarted; finished or stopped ones are not."""

from __future__ import annotations

import asyncio
import contextlib

from meshfed.supervisor import Supervisor
from tests.conftest import eventually

# Long enough for a poll to see the component waiting to restart, short enough for a fast test.
FAST = (0.2, 0.4)


def test_a_crashing_component_is_reported_and_restarted_with_backoff() -> None:
    async def scenario() -> None:
        supervisor = Supervisor("east", backoff=FAST)
        runs = 0
        healthy = asyncio.Event()

        async def flaky() -> None:
            nonlocal runs
            runs += 1
            if runs < 3:
                raise RuntimeError(f"boom {runs}")
            healthy.set()
            await asyncio.Event().wait()

        supervisor.spawn("flaky", flaky)
        await eventually(lambda: supervisor.problems() != [], "the crash is reported")
        assert "flaky crashed (RuntimeError: boom " in supervisor.problems()[0]
        await asyncio.wait_for(healthy.wait(), 5)
        (status,) = supervisor.statuses()
        assert (status.state, status.restarts, status.last_error) == ("running", 2, "RuntimeError: boom 2")
        assert supervisor.problems() == []
        await supervisor.stop()
        assert supervisor.statuses() == []

    asyncio.run(scenario())


def test_a_component_cancelled_from_outside_is_restarted() -> None:
    async def scenario() -> None:
        supervisor = Supervisor("east", backoff=FAST)
        starts = 0

        async def loop() -> None:
            nonlocal starts
            starts += 1
            await asyncio.Event().wait()

        component = supervisor.spawn("watch", loop)
        await eventually(lambda: starts == 1, "started")
        first = component.task
        assert first is not None
        assert first.get_name() == "meshfed-east-watch"
        first.cancel()
        await eventually(lambda: any("watch crashed (cancelled" in p for p in supervisor.problems()), "seen")
        await eventually(lambda: starts == 2, "restarted")
        assert component.task is not first
        await component.cancel()
        assert component.task is not None
        assert component.task.cancelled()
        await supervisor.stop()

    asyncio.run(scenario())


def test_finished_and_stopped_components_stay_down() -> None:
    async def scenario() -> None:
        supervisor = Supervisor("east", backoff=FAST)
        done = asyncio.Event()

        async def once() -> None:
            done.set()

        async def forever() -> None:
            await asyncio.Event().wait()

        supervisor.spawn("once", once)
        supervisor.spawn("forever", forever)
        await asyncio.wait_for(done.wait(), 5)
        await eventually(lambda: [s.name for s in supervisor.statuses()] == ["forever"], "once finished")
        await supervisor.stop()
        assert supervisor.statuses() == []
        assert supervisor.problems() == []

    asyncio.run(scenario())


def test_a_component_that_swallows_cancellation_still_stops_or_is_left_behind(caplog) -> None:
    async def scenario() -> None:
        supervisor = Supervisor("east", backoff=FAST, stop_timeout=0.5)
        stubborn = True

        async def swallows_once() -> None:
            with contextlib.suppress(asyncio.CancelledError):  # what a racing wait_for does on Python 3.11
                await asyncio.Event().wait()
            await asyncio.Event().wait()

        async def swallows_while_stubborn() -> None:
            while stubborn:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.Event().wait()

        once = supervisor.spawn("once", swallows_once)
        always = supervisor.spawn("always", swallows_while_stubborn)
        await asyncio.sleep(0)  # both started
        await once.cancel()
        assert once.task is not None
        assert once.task.cancelled()
        await always.cancel()  # returns after the stop timeout instead of hanging the shutdown
        assert always.task is not None
        assert not always.task.done()
        assert "component always did not stop within 0.5s" in caplog.text
        stubborn = False  # let the leaked task end, so the test leaves nothing behind
        always.task.cancel()
        await asyncio.wait({always.task})

    asyncio.run(scenario())


def test_a_running_component_is_ready_only_while_its_probe_says_so() -> None:
    async def scenario() -> None:
        supervisor = Supervisor("east", backoff=FAST)
        reason: list[str] = []

        def probe() -> str | None:
            if reason and reason[0] == "raise":
                raise ValueError("no state yet")
            return reason[0] if reason else None

        async def forever() -> None:
            await asyncio.Event().wait()

        supervisor.spawn("watch", forever, ready=probe)
        supervisor.spawn("plain", forever)
        assert [(s.name, s.ready) for s in supervisor.statuses()] == [("watch", True), ("plain", True)]
        assert supervisor.problems() == []

        reason.append("the catalog does not answer")
        (watch, plain) = supervisor.statuses()
        assert (watch.state, watch.ready, plain.ready) == ("running", False, True)
        assert supervisor.problems() == ["watch is not ready: the catalog does not answer"]

        reason[0] = "raise"  # a broken probe is shown, not raised
        assert supervisor.problems() == ["watch is not ready: its readiness probe failed (ValueError: no state yet)"]

        reason.clear()
        assert supervisor.problems() == []
        assert all(status.ready for status in supervisor.statuses())
        await supervisor.stop()

    asyncio.run(scenario())
