"""A peering's link records the peer's snapshots one at a time, newest last; large ones off the event loop.

The link runs against a recording LinkHost (no gRPC, no store); the last test
runs two real peering services and checks which thread wrote what.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from typing import Any, Literal

import pytest

from meshfed.clock import SYSTEM_CLOCK, Clock
from meshfed.federation import wire
from meshfed.federation._proto import peering_pb2 as pb
from meshfed.federation.exchange import ServiceSnapshot
from meshfed.federation.link import OFF_LOOP_SERVICES, LinkSettings, PeerLimits, PeerLink
from meshfed.federation.peering_state import Peering, PeerState
from meshfed.federation.peering_store import PeeringStore
from meshfed.trust.bundle import TrustBundle
from tests.conftest import eventually
from tests.test_peering import Harness, run, service


class RecordingHost:
    """A LinkHost that records the link's writes; deliveries of versions in ``hold`` wait for ``release``."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.hold: set[int] = set()
        self.holding = asyncio.Event()  # a delivery waits on release
        self.in_write = asyncio.Event()  # an off-loop write has begun
        self.write_release = asyncio.Event()  # writes finish once set (set unless a test holds them)
        self.write_release.set()
        self.written: list[int] = []
        self.off_loop: list[int] = []
        self.writing = 0
        self.most_at_once = 0

    def exports(self, peer: str) -> ServiceSnapshot:
        return ServiceSnapshot(zone="east", trust_domain="east.mesh", gateway_addresses=[], version=0)

    def import_problem(self, peer: str) -> str | None:
        return None

    async def deliver(self, peer: str, snapshot: ServiceSnapshot) -> None:
        if snapshot.version in self.hold:
            self.holding.set()
            await self.release.wait()

    async def state_changed(self, peer: str, state: PeerState) -> None:
        pass

    def record(self, peer: str, **changes: object) -> None:
        snapshot = changes.get("received_snapshot")
        if isinstance(snapshot, ServiceSnapshot):
            assert self.writing == 0
            self.written.append(snapshot.version)

    async def record_snapshot(self, peer: str, **changes: object) -> None:
        self.writing += 1
        self.most_at_once = max(self.most_at_once, self.writing)
        self.in_write.set()
        await self.write_release.wait()
        for _ in range(5):  # a write spanning several loop turns: others queue meanwhile
            await asyncio.sleep(0)
        snapshot = changes["received_snapshot"]
        assert isinstance(snapshot, ServiceSnapshot)
        self.written.append(snapshot.version)
        self.off_loop.append(snapshot.version)
        self.writing -= 1

    def own_bundle_json(self) -> bytes:
        return b"{}"

    def own_stream_addresses(self) -> list[str]:
        return ["127.0.0.1:15440"]

    def held_bundle_sequence(self, trust_domain: str) -> int:
        return 1

    async def bundle_received(self, offered: TrustBundle) -> None:
        pass

    def peer_bundle_changed(self) -> None:
        pass

    async def peer_terminated(self, link: PeerLink, reason: str) -> None:
        pass


def make_link(
    host: RecordingHost,
    name: str = "west",
    *,
    clock: Clock = SYSTEM_CLOCK,
    limits: PeerLimits | None = None,
    role: Literal["acceptor", "dialer"] = "acceptor",
    **stored: Any,
) -> PeerLink:
    """A live link of east with peer ``name`` (trust domain ``<name>.mesh``), reporting to ``host``; ``stored``
    are more fields of its stored peering (as a restart finds them)."""
    now = dt.datetime.now(dt.UTC)
    peering = Peering(
        name=name,
        role=role,
        peer_addresses=("127.0.0.1:15440",),
        state=PeerState.ACTIVE,
        created_at=now,
        updated_at=now,
        peer_zone=name,
        peer_trust_domain=f"{name}.mesh",
        **stored,
    )
    settings = LinkSettings(
        zone="east",
        trust_domain="east.mesh",
        heartbeat_interval=0.2,
        missed_heartbeats=3,
        peer_heartbeat_bounds=(0.05, 60.0),
        limits=limits or PeerLimits(),
    )
    return PeerLink(host, settings, peering, clock=clock)


LARGE = OFF_LOOP_SERVICES + 1


def _snapshot(version: int, size: int = LARGE) -> pb.Snapshot:
    services = [service(f"s{version}-{i}") for i in range(size)]
    return wire.snapshot_to_proto(
        ServiceSnapshot(
            zone="west", trust_domain="west.mesh", gateway_addresses=[], version=version, epoch="e1", services=services
        )
    )


@pytest.mark.parametrize("size", [1, LARGE])
def test_an_older_snapshot_delivered_last_never_overwrites_a_newer_one(size: int) -> None:
    async def scenario() -> None:
        host = RecordingHost()
        link = make_link(host)
        host.hold = {1}
        older = asyncio.create_task(link.apply_snapshot(_snapshot(1, size)))
        await host.holding.wait()  # the older one waits in delivery
        newer = await link.apply_snapshot(_snapshot(2, size))  # the newer one is delivered and recorded
        assert host.written == [2]
        host.release.set()  # the older delivery finishes after the newer one was recorded
        acks = [await older, newer]
        assert host.written == [2]
        assert host.off_loop == ([2] if size == LARGE else [])
        assert (link.received_version, link.received_epoch) == (2, "e1")
        assert [ack.version for ack in acks] == [2, 2]

    asyncio.run(scenario())


def test_writes_of_one_link_run_one_at_a_time_in_delivery_order() -> None:
    async def scenario() -> None:
        host = RecordingHost()
        link = make_link(host)
        # A small snapshot behind a large one waits for it (large ones are checked off the loop, too).
        applies = []
        for version, size in ((1, LARGE), (2, 1), (3, LARGE), (4, 1)):
            applies.append(asyncio.create_task(link.apply_snapshot(_snapshot(version, size))))
            await asyncio.sleep(0)  # a loop turn: each apply begins in delivery order
        await asyncio.gather(*applies)
        await link.stop()
        assert host.written == [1, 2, 3, 4]
        assert host.off_loop == [1, 3]
        assert host.most_at_once == 1
        assert link.received_version == 4

    asyncio.run(scenario())


def test_a_cancelled_session_leaves_its_write_to_finish_and_stop_waits_for_it() -> None:
    async def scenario() -> None:
        host = RecordingHost()
        link = make_link(host)
        host.write_release.clear()
        applying = asyncio.create_task(link.apply_snapshot(_snapshot(1)))
        await host.in_write.wait()
        applying.cancel()
        with pytest.raises(asyncio.CancelledError):
            await applying
        assert host.written == []
        host.write_release.set()
        await link.stop()
        assert host.written == [1]
        assert link.received_version == 1  # the link's copy follows the row it wrote

    asyncio.run(scenario())


def test_a_running_service_writes_received_snapshots_on_another_thread(make_zone, monkeypatch) -> None:
    written: list[tuple[str, bool]] = []  # (field, on the event loop's thread)
    received: list[tuple[int, bool]] = []  # (services, on the event loop's thread)
    write = PeeringStore.write_encoded

    def recording_write(self: PeeringStore, name: str, values: dict[str, object]) -> bool:
        # Every write of a peering's fields ends here, encoded (a snapshot as its document and its count).
        on_loop = threading.current_thread() is threading.main_thread()
        written.extend((field, on_loop) for field in values)
        if "received_snapshot" in values:
            received.append((int(str(values["received_services"])), on_loop))
        return write(self, name, values)

    monkeypatch.setattr(PeeringStore, "write_encoded", recording_write)
    east, west = Harness(make_zone("east")), Harness(make_zone("west"))
    east.exported = [service(f"web-{i}") for i in range(LARGE)]

    async def scenario() -> None:
        await east.start()
        await west.start()
        try:
            await west.service.establish(east.service.issue_token("west").encoded)
            await eventually(lambda: west.service.peer("east").received_version >= 1, what="west holds east's exports")
            with PeeringStore.of(west.zone) as store:
                stored = store.require("east", snapshots=True).received_snapshot
            assert stored is not None
            assert len(stored.services) == LARGE
        finally:
            await west.stop()
            await east.stop()

    run(scenario())
    assert (LARGE, False) in received  # west's copy of east's large exports: off the event loop's thread
    assert (0, True) in received  # east's of west's empty ones: written at once, on the loop
    assert ("acked_version", True) in written  # small fields: on the loop, as before


@pytest.mark.parametrize(
    "offered",
    [
        ["not an address"],
        ["127.0.0.1:0"],
        ["x" * 600 + ":15440"],
        [f"127.0.0.1:{port}" for port in range(15440, 15457)],  # 17: more than a token may carry
    ],
    ids=["no port", "port 0", "too long", "too many"],
)
def test_a_dialer_ignores_stream_addresses_that_break_the_rules(offered: list[str]) -> None:
    """The acceptor's hello may move the dialer to where its stream is now; a hostile one moves it nowhere."""
    host = RecordingHost()
    link = make_link(host, "east", role="dialer")
    asyncio.run(link.connected(pb.Hello(stream_addresses=offered)))
    assert link.peer_addresses == ("127.0.0.1:15440",)
    asyncio.run(link.connected(pb.Hello(stream_addresses=["east.example.net:15440", "[::1]:15440"])))
    assert list(link.peer_addresses) == ["east.example.net:15440", "[::1]:15440"]


def test_an_acceptor_tells_its_stream_addresses_and_a_dialer_tells_none() -> None:
    host = RecordingHost()
    assert list(make_link(host).hello().stream_addresses) == ["127.0.0.1:15440"]
    assert list(make_link(host, role="dialer").hello().stream_addresses) == []


def test_a_restart_before_the_sent_content_was_stored_sends_a_full_snapshot_of_a_new_version() -> None:
    """The version is stored before a send, its content after: a restart in between must not take the
    older stored content for what the peer holds (a delta from it would be wrong), nor reuse the version."""

    async def scenario() -> None:
        host = RecordingHost()
        older = ServiceSnapshot(
            zone="east", trust_domain="east.mesh", gateway_addresses=[], version=4, epoch="e1", services=[]
        )
        restarted = make_link(host, sent_version=5, sent_snapshot=older, sent_epoch="e1")
        assert restarted.sent is None
        assert not restarted.history  # no base for a delta: a full snapshot follows
        assert restarted.peer_holds("e1", 5) == 5
        current = restarted.current_exports()
        assert current is not None
        assert (current.version, current.epoch) == (6, "e1")

    asyncio.run(scenario())
