"""One peer's churn is applied at its own budget's pace, and never holds up another peer.

The link tests run a :class:`~meshfed.federation.link.PeerLink` on a manual
clock against a recording host (no gRPC); the last test floods a running zone
from a hostile peer over the real stream while an honest peer's export goes
through.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import pytest

from meshfed.federation import wire
from meshfed.federation._proto import peering_pb2 as pb
from meshfed.federation.exchange import ServiceSnapshot
from meshfed.federation.link import PeerLimits, PeerLink
from tests.clocks import ManualClock
from tests.conftest import ZoneFactory, eventually
from tests.hostile_peer import LOOPBACK, export
from tests.hostile_peer import service as hostile_service
from tests.hostile_peer import snapshot as hostile_snapshot
from tests.test_hostile_peers import federation, run
from tests.test_peer_link import RecordingHost, make_link
from tests.test_peering import service

BUDGET = PeerLimits(updates_per_second=2.0, update_burst=3)


def _link(name: str, clock: ManualClock, limits: PeerLimits = BUDGET) -> tuple[PeerLink, RecordingHost]:
    host = RecordingHost()
    return make_link(host, name, clock=clock, limits=limits), host


def _update(peer: str, version: int) -> pb.Snapshot:
    return wire.snapshot_to_proto(
        ServiceSnapshot(
            zone=peer,
            trust_domain=f"{peer}.mesh",
            gateway_addresses=[],
            version=version,
            epoch="e1",
            services=[service(f"s{version}")],
        )
    )


async def _turns(count: int = 10) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def test_a_burst_is_applied_at_once_and_what_follows_at_the_rate(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        clock = ManualClock()
        link, host = _link("evil", clock)
        for version in (1, 2, 3):  # the burst: applied without waiting
            await link.apply_snapshot(_update("evil", version))
        assert host.written == [1, 2, 3]

        fourth = asyncio.create_task(link.apply_snapshot(_update("evil", 4)))
        await _turns()
        assert not fourth.done()  # waits for its budget, unapplied and unacked
        assert host.written == [1, 2, 3]
        clock.advance(0.49)
        await _turns()
        assert not fourth.done()
        clock.advance(0.01)  # one token at 2 per second: half a second
        ack = await fourth
        assert (ack.version, host.written) == (4, [1, 2, 3, 4])
        assert link.updates.throttled == 1

        # Idle time refills the bucket up to the burst, not beyond.
        clock.advance(60)
        for version in (5, 6, 7):
            await link.apply_snapshot(_update("evil", version))
        eighth = asyncio.create_task(link.apply_snapshot(_update("evil", 8)))
        await _turns()
        assert not eighth.done()
        clock.advance(0.5)
        await eighth
        assert link.updates.throttled == 2

    with caplog.at_level(logging.WARNING, logger="meshfed.federation.service"):
        asyncio.run(scenario())
    warnings = [record.getMessage() for record in caplog.records if "faster than" in record.getMessage()]
    assert len(warnings) == 2, warnings  # once per episode, naming the peer and the limit
    assert "peer evil sends updates faster than 2 per second (burst 3)" in warnings[0]


def test_a_replay_spends_nothing_of_the_budget() -> None:
    async def scenario() -> None:
        clock = ManualClock()
        link, host = _link("west", clock, PeerLimits(updates_per_second=1.0, update_burst=1))
        await link.apply_snapshot(_update("west", 1))
        for _ in range(5):  # the same version again (a reconnect's resend): acked, not applied, not waited for
            ack = await link.apply_snapshot(_update("west", 1))
            assert ack.version == 1
        assert host.written == [1]
        assert link.updates.throttled == 0

    asyncio.run(scenario())


def test_one_peers_spent_budget_does_not_hold_up_another_peer() -> None:
    async def scenario() -> None:
        clock = ManualClock()
        evil, evil_host = _link("evil", clock)
        west, west_host = _link("west", clock)
        for version in (1, 2, 3):
            await evil.apply_snapshot(_update("evil", version))
        waiting = asyncio.create_task(evil.apply_snapshot(_update("evil", 4)))
        await _turns()
        assert not waiting.done()
        ack = await west.apply_snapshot(_update("west", 1))  # west's budget is its own
        assert (ack.version, west_host.written) == (1, [1])
        assert evil_host.written == [1, 2, 3]
        clock.advance(0.5)
        await waiting

    asyncio.run(scenario())


def test_a_flooding_peer_waits_for_its_budget_while_an_honest_peers_export_goes_through(
    make_zone: ZoneFactory,
) -> None:
    # A token every 10 s: the flood's fourth update is still waiting when west's export arrives.
    slow = replace(
        LOOPBACK, peering=replace(LOOPBACK.peering, limits=PeerLimits(updates_per_second=0.1, update_burst=3))
    )

    async def scenario() -> None:
        async with federation(make_zone, east_settings=slow) as fed:
            east, evil = fed.east, fed.evil
            for version in range(1, 9):  # sent without waiting for acks, as no honest peer sends
                await evil.send(hostile_snapshot(version, [hostile_service(f"s{version}")]))
            for _ in range(3):
                assert (await evil.next_ack()).error == ""
            await eventually(lambda: east.status("evil").updates_throttled == 1, "evil's flood throttled")

            export(fed.west.zone, "late", "east")
            await eventually(lambda: east.has_import("late", "west"), "east imports west's export during the flood")
            assert evil.kinds().count("ack") == 3  # the flood's fourth update is still waiting for its budget
            assert east.status("west").import_error == ""
            assert east.state("evil") == "ACTIVE"

    run(scenario())
