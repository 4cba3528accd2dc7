"""Failing peers on a manual clock: under ``closed`` a peer's imports stop exactly at the grace period, not before.

:class:`~meshfed.controller.failing_peers.FailingPeers` alone, with a real
supervisor running its grace timers and a recorder in place of the
controller's reconfigure; the clock moves only when the test advances it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Coroutine
from typing import Any

from meshfed.controller.failing_peers import FailingPeerPolicy, FailingPeers
from meshfed.supervisor import Supervisor
from tests.clocks import ManualClock

GRACE = dt.timedelta(minutes=5)


class Reconfigures:
    def __init__(self) -> None:
        self.count = 0

    async def __call__(self) -> None:
        self.count += 1


def run(scenario: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(scenario, 10))


def failing_peers(policy: FailingPeerPolicy) -> tuple[FailingPeers, ManualClock, Reconfigures, Supervisor]:
    clock, reconfigure, supervisor = ManualClock(), Reconfigures(), Supervisor("west")
    peers = FailingPeers("west", supervisor, grace=GRACE, policy=policy, reconfigure=reconfigure, clock=clock)
    return peers, clock, reconfigure, supervisor


def test_closed_withholds_a_failing_peer_only_once_the_clock_passes_the_grace_period():
    async def scenario() -> None:
        peers, clock, reconfigure, supervisor = failing_peers("closed")
        try:
            await peers.follow("east", "FAILING")
            await clock.wait_for_sleepers(1)  # the grace timer runs
            grace = GRACE.total_seconds()

            clock.advance(grace - 0.001)
            await clock.settled()
            assert not peers.withheld("east")
            assert peers.withheld_now() == frozenset()
            assert reconfigure.count == 0

            clock.advance(0.001)
            await clock.settled()  # the timer fired: the config that withholds east was applied
            assert peers.withheld("east")
            assert peers.withheld_now() == {"east"}
            assert reconfigure.count == 1

            # Still FAILING at the next report: the grace runs from when it started, not again.
            await peers.follow("east", "FAILING")
            assert peers.withheld("east")

            # Back: served again at once, with a reconfigure; a new failure waits a whole grace period again.
            await peers.follow("east", "ACTIVE")
            assert not peers.withheld("east")
            assert reconfigure.count == 2
            await peers.follow("east", "FAILING")
            await clock.wait_for_sleepers(1)
            clock.advance(grace / 2)
            await clock.settled()
            assert not peers.withheld("east")
        finally:
            await supervisor.stop()

    run(scenario())


def test_a_peer_back_before_the_grace_period_is_never_withheld():
    async def scenario() -> None:
        peers, clock, reconfigure, supervisor = failing_peers("closed")
        try:
            await peers.follow("east", "FAILING")
            await clock.wait_for_sleepers(1)
            clock.advance(GRACE.total_seconds() / 2)
            await peers.follow("east", "DISCONNECTED")  # still not back: the grace runs on
            await peers.follow("east", "ACTIVE")
            assert reconfigure.count == 1  # back from FAILING
            clock.advance(GRACE.total_seconds())
            await clock.settled()  # the timer fired with east no longer failing: nothing withheld
            assert not peers.withheld("east")
            assert reconfigure.count == 1
        finally:
            await supervisor.stop()

    run(scenario())


def test_open_never_withholds():
    async def scenario() -> None:
        peers, clock, reconfigure, supervisor = failing_peers("open")
        try:
            await peers.follow("east", "FAILING")
            assert clock.sleepers == 0  # no grace timer under open
            clock.advance(10 * GRACE.total_seconds())
            assert not peers.withheld("east")
            assert reconfigure.count == 0
        finally:
            await supervisor.stop()

    run(scenario())
