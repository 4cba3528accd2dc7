"""Peering end to end on loopback: real gRPC, real TLS, real SQLite; two zones in one process.

Each zone is a real ``Controller`` (Rust gateway on 127.0.0.1:0) with a
``PeeringService``; the exports and import callbacks are plain recorders.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest

from meshfed.clock import SYSTEM_CLOCK, Clock
from meshfed.controller import Controller, ControllerSettings
from meshfed.federation.dialer import establish
from meshfed.federation.exchange import ExportedService, ServiceSnapshot
from meshfed.federation.peering_state import Peering, PeerState
from meshfed.federation.peering_store import PeeringStore, request_delete
from meshfed.federation.service import PeeringService
from meshfed.federation.settings import PeeringSettings
from meshfed.zone import Zone
from tests.clocks import ManualClock
from tests.conftest import eventually, free_port

HEARTBEAT = 0.2
MISSED = 3
STORE_POLL = 0.2


def service(name: str, healthy: int = 1) -> ExportedService:
    return ExportedService(
        name=name, namespace="default", ports={"http": 8080}, healthy_endpoints=healthy, total_endpoints=2
    )


@dataclass
class Harness:
    """One running zone: controller + peering service + recorders of what the callbacks saw."""

    zone: Zone
    exported: list[ExportedService] = field(default_factory=list)
    imports: list[tuple[str, ServiceSnapshot]] = field(default_factory=list)
    states: list[tuple[str, PeerState, float]] = field(default_factory=list)
    trust_changes: int = 0
    controller: Controller | None = None
    peering: PeeringService | None = None
    clock: Clock = SYSTEM_CLOCK
    heartbeat: float = HEARTBEAT

    def exports(self, peer: str) -> ServiceSnapshot:
        return ServiceSnapshot(
            zone=self.zone.name,
            trust_domain=str(self.zone.trust_domain),
            gateway_addresses=["127.0.0.1:15443"],
            version=0,
            services=list(self.exported),
        )

    async def on_imports(self, peer: str, snapshot: ServiceSnapshot) -> None:
        self.imports.append((peer, snapshot))

    async def on_trust_changed(self) -> None:
        self.trust_changes += 1

    async def on_peer_state(self, peer: str, state: PeerState) -> None:
        self.states.append((peer, state, time.monotonic()))

    async def start(
        self, listen: str = "127.0.0.1:0", establish_at: str = "127.0.0.1:0", advertise: str | None = None
    ) -> PeeringService:
        self.peering = PeeringService(
            self.zone,
            PeeringSettings(
                listen_address=listen,
                establish_address=establish_at,
                advertise_host=advertise,
                heartbeat_interval=self.heartbeat,
                missed_heartbeats=MISSED,
                store_poll_interval=STORE_POLL,
                reconnect_backoff=(0.05, 0.5),
            ),
            exports=self.exports,
            on_imports=self.on_imports,
            on_trust_changed=self.on_trust_changed,
            on_peer_state=self.on_peer_state,
            clock=self.clock,
        )
        self.controller = Controller(
            self.zone,
            ControllerSettings(gateway_address="127.0.0.1:0", egress_port_base=0),
            companions=[self.peering],
            clock=self.clock,
        )
        await self.controller.start()
        return self.peering

    async def stop(self) -> None:
        assert self.controller is not None
        await self.controller.stop()

    @property
    def service(self) -> PeeringService:
        assert self.peering is not None
        return self.peering

    def state_of(self, peer: str) -> PeerState:
        return self.service.peer(peer).state

    def versions_from(self, peer: str) -> list[int]:
        return [snapshot.version for name, snapshot in self.imports if name == peer]

    def latest_from(self, peer: str) -> ServiceSnapshot:
        return [snapshot for name, snapshot in self.imports if name == peer][-1]


def run(coroutine: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coroutine, 60))


def names(snapshot: ServiceSnapshot) -> list[str]:
    return sorted(s.name for s in snapshot.services)


def test_token_establish_stream_failover_resume_and_delete(make_zone):
    # Both zones on one manual clock: polls, heartbeats and their deadlines run only when the test moves it.
    # West's own heartbeat is short, so its watcher (every heartbeat/4) looks each millisecond of that clock;
    # east's deadline at west is east's heartbeat (the peer's) times MISSED.
    clock = ManualClock()
    east = Harness(make_zone("east"), clock=clock)
    west = Harness(make_zone("west"), clock=clock, heartbeat=0.004)
    east.exported = [service("web")]
    west.exported = [service("db")]

    async def scenario() -> None:
        await east.start()
        await west.start()
        token = east.service.issue_token("west").encoded
        assert east.state_of("west") is PeerState.PENDING

        # Established the way the CLI does it (straight to the store); the running west picks it up by polling.
        peering = await establish(west.zone, token)
        assert peering.name == "east"
        clock.advance(STORE_POLL)
        await eventually(lambda: east.state_of("west") is PeerState.ACTIVE, what="east sees west ACTIVE")
        await eventually(lambda: west.state_of("east") is PeerState.ACTIVE, what="west sees east ACTIVE")
        assert east.trust_changes >= 1

        # Snapshots flow both ways.
        await eventually(lambda: bool(east.imports) and bool(west.imports), what="first snapshots")
        assert names(east.latest_from("west")) == ["db"]
        assert names(west.latest_from("east")) == ["web"]
        assert west.latest_from("east").zone == "east"
        assert west.latest_from("east").trust_domain == "east.mesh"
        assert west.versions_from("east") == [1]

        # A change reaches the peer as the next version (sent as a delta).
        east.exported = [service("web"), service("api")]
        east.service.notify_exports_changed()
        await eventually(lambda: west.versions_from("east") == [1, 2], what="version 2 at west")
        assert names(west.latest_from("east")) == ["api", "web"]
        await eventually(lambda: east.service.peer("west").acked_version == 2, what="east's v2 acked")
        status = west.service.peer("east")
        assert status.imported_services == 2
        assert status.exported_services == 1
        assert status.connected
        assert status.last_heartbeat_received_at is not None

        # Stop east: west shows it DISCONNECTED at once, and FAILING once the clock passes the heartbeat
        # deadline (east's last message came at the clock's present: it has not moved since).
        east_stream = east.service.stream_addresses[0]
        east_establish = east.service.establish_addresses[0]
        await east.stop()
        await eventually(lambda: west.state_of("east") is PeerState.DISCONNECTED, what="west to see east drop")
        deadline = HEARTBEAT * MISSED
        clock.advance(deadline - 0.001)
        await clock.settled()  # west's heartbeat watcher looked, and sleeps again
        assert west.state_of("east") is PeerState.DISCONNECTED
        clock.advance(0.002)
        await clock.settled()
        assert west.state_of("east") is PeerState.FAILING
        assert "no message for 0.6s" in west.service.peer("east").state_reason

        # While east is down: west changes three times (coalesced), east's own exports change too.
        for extra in ("a", "b", "c"):
            west.exported = [*west.exported, service(extra)]
            west.service.notify_exports_changed()
        east.exported = [service("web")]
        east_seen_before = east.versions_from("west")
        west_seen_before = west.versions_from("east")

        # Restart east on the same addresses: resume from the acked versions.
        east.imports.clear()
        await east.start(listen=east_stream, establish_at=east_establish)
        await eventually(lambda: west.state_of("east") is PeerState.ACTIVE, timeout=5, what="west back ACTIVE")
        await eventually(lambda: names(east.latest_from("west")) == ["a", "b", "c", "db"] if east.imports else False)
        await eventually(lambda: names(west.latest_from("east")) == ["web"], what="east's change at west")
        resumed = east.versions_from("west")
        assert len(resumed) == 1, resumed  # one coalesced update, nothing replayed
        assert resumed[0] > max(east_seen_before)
        west_versions = west.versions_from("east")
        assert west_versions == [*west_seen_before, west_seen_before[-1] + 1]  # nothing lost or duplicated
        print(f"resume: east received {resumed} after {east_seen_before}; west received {west_versions}")

        # Delete on west tears down both sides.
        await west.service.delete("east")
        await eventually(lambda: east.state_of("west") is PeerState.TERMINATED, what="east sees TERMINATED")
        assert [p.name for p in west.service.peers()] == []
        assert west.latest_from("east").services == []
        assert east.latest_from("west").services == []
        assert ("east", PeerState.TERMINATED) in [(n, s) for n, s, _ in west.states]
        # The trust the peering brought goes with it, on both sides.
        assert "east.mesh" not in {s.bundle.trust_domain.name for s in west.zone.trust.trusted_bundles()}
        await eventually(
            lambda: "west.mesh" not in {s.bundle.trust_domain.name for s in east.zone.trust.trusted_bundles()},
            what="east forgets west.mesh",
        )

        await west.stop()
        await east.stop()

    run(scenario())


def test_a_connected_peer_gone_silent_is_failing_at_the_deadline_and_its_stream_is_dropped(make_zone):
    """A half-open connection never errors: the heartbeat deadline alone finds it, then the dialer reconnects.

    Each zone on a clock of its own: east's never moves, so after its first messages east sends nothing
    (no heartbeat comes due), while the test moves west's past the deadline of east's heartbeats.
    """
    west_clock = ManualClock()
    east = Harness(make_zone("east"), clock=ManualClock())
    west = Harness(make_zone("west"), clock=west_clock, heartbeat=0.004)  # west's watcher looks every 1 ms

    async def scenario() -> None:
        await east.start()
        await west.start()
        try:
            await west.service.establish(east.service.issue_token("west").encoded)
            await eventually(
                lambda: west.service.peer("east").acked_version >= 1 and east.service.peer("west").acked_version >= 1,
                what="both snapshots applied and acked",
            )
            connected_at = west.service.peer("east").last_connected_at
            deadline = HEARTBEAT * MISSED  # east's heartbeat interval, as it announced it

            west_clock.advance(deadline - 0.001)
            await west_clock.settled()
            assert west.state_of("east") is PeerState.ACTIVE
            west_clock.advance(0.002)
            await west_clock.settled()
            status = west.service.peer("east")
            assert status.state is PeerState.FAILING
            assert status.state_reason.startswith("no message for 0.6s (heartbeats every 0.2s)")

            # The silent stream was dropped: the dialer connects again and east's hello makes it ACTIVE.
            await eventually(lambda: west.state_of("east") is PeerState.ACTIVE, what="west reconnected")
            assert west.service.peer("east").last_connected_at != connected_at
        finally:
            await west.stop()
            await east.stop()

    run(scenario())


def test_cli_delete_while_running_is_picked_up(make_zone):
    east, west = Harness(make_zone("east")), Harness(make_zone("west"))

    async def scenario() -> None:
        await east.start()
        await west.start()
        await west.service.establish(east.service.issue_token("west").encoded)
        await eventually(lambda: east.state_of("west") is PeerState.ACTIVE)
        # What `meshfed peer delete` does on a running zone: mark the row, let the service finish.
        with PeeringStore.of(east.zone) as store:
            request_delete(store, "west")
        await eventually(lambda: not east.service.peers(), what="east forgets west")
        await eventually(lambda: west.state_of("east") is PeerState.TERMINATED, what="west told")
        await west.stop()
        await east.stop()

    run(scenario())


@pytest.mark.parametrize("coalesce_changes", [50])
def test_slow_peer_gets_coalesced_snapshots(make_zone, coalesce_changes):
    east, west = Harness(make_zone("east")), Harness(make_zone("west"))

    busy = asyncio.Event()  # west stays busy with the snapshot it holds until the test lets it go

    async def slow_imports(peer: str, snapshot: ServiceSnapshot) -> None:
        west.imports.append((peer, snapshot))
        await busy.wait()

    async def scenario() -> None:
        await east.start()
        west.on_imports = slow_imports  # type: ignore[method-assign]
        await west.start()
        await west.service.establish(east.service.issue_token("west").encoded)
        await eventually(lambda: bool(west.imports))
        for index in range(coalesce_changes):
            east.exported = [service(f"s{index}")]
            east.service.notify_exports_changed()
            await asyncio.sleep(0)  # east's stream runs between changes: each could be sent
        busy.set()
        await eventually(lambda: names(west.latest_from("east")) == [f"s{coalesce_changes - 1}"], timeout=10)
        versions = west.versions_from("east")
        assert versions == sorted(set(versions))
        assert len(versions) < coalesce_changes / 2, versions  # changes coalesced while the peer was busy
        print(f"{coalesce_changes} changes reached a slow peer as {len(versions)} versions")
        await west.stop()
        await east.stop()

    run(scenario())


def test_dialer_restart_resumes_without_replay(make_zone):
    east, west = Harness(make_zone("east")), Harness(make_zone("west"))
    west.exported = [service("db")]

    async def scenario() -> None:
        await east.start()
        await west.start()
        await west.service.establish(east.service.issue_token("west").encoded)
        await eventually(lambda: bool(east.imports) and bool(west.imports), what="first snapshots")
        await eventually(lambda: west.service.peer("east").acked_version == 1, what="west's v1 acked")
        await west.stop()  # the dialer's in-memory history goes with it
        east.exported = [service("x")]
        east.service.notify_exports_changed()
        east.exported = [service("x"), service("y")]
        east.service.notify_exports_changed()
        await west.start()
        await eventually(lambda: names(west.latest_from("east")) == ["x", "y"], what="east's changes at west")
        await eventually(lambda: east.state_of("west") is PeerState.ACTIVE)
        assert west.versions_from("east") == [1, 2]  # two changes while away: one coalesced version
        # Two heartbeats from west on the resumed stream: it had its chance to re-send, and did not.
        resumed = east.service.peer("west").last_heartbeat_received_at
        assert resumed is not None
        await eventually(
            lambda: (east.service.peer("west").last_heartbeat_received_at or resumed) > resumed,
            what="a heartbeat from west after the resume",
        )
        latest = east.service.peer("west").last_heartbeat_received_at
        assert latest is not None
        await eventually(
            lambda: (east.service.peer("west").last_heartbeat_received_at or latest) > latest,
            what="a second heartbeat from west",
        )
        assert east.versions_from("west") == [1]  # west's unchanged exports are not re-sent
        await west.stop()
        await east.stop()

    run(scenario())


def test_store_updates_write_only_the_named_columns_and_status_reads_skip_snapshots(make_zone):
    """Heartbeats and status reads run every second; with big catalogs they must not touch the snapshots."""
    zone = make_zone("east")
    now = dt.datetime.now(dt.UTC)
    snapshot = ServiceSnapshot(
        zone="west", trust_domain="west.mesh", gateway_addresses=[], version=7, services=[service("a"), service("b")]
    )
    with PeeringStore.of(zone) as store:
        store.put(Peering("west", "dialer", PeerState.ACTIVE, now, now, peer_zone="west"))
        assert store.update("west", received_version=7, received_snapshot=snapshot)
        assert store.update("west", last_heartbeat_received_at=now)
        light = store.require("west")
        assert light.received_snapshot is None  # not parsed...
        assert light.received_services == 2  # ...but counted
        assert light.last_heartbeat_received_at == now
        assert store.require("west", snapshots=True).received_snapshot == snapshot  # the heartbeat kept it
        assert store.update("west", received_snapshot=None)
        assert store.require("west").received_services == 0
        assert not store.update("nobody", state=PeerState.FAILING)
        with pytest.raises(TypeError, match="no updatable field 'role'"):
            store.update("west", role="acceptor")


async def hello_as_west_signed_by_north(east: Harness, west: Zone, north: Zone) -> Exception:
    """west and north peer with ``east``; then north's CA signs a west.mesh controller SVID and says hello
    as west on east's stream. Returns the error the stream refused it with (it must refuse)."""
    import grpc

    from meshfed.federation._proto import peering_pb2 as pb
    from meshfed.federation._proto import peering_pb2_grpc as pb_grpc
    from meshfed.federation.identity import controller_id, federation_host
    from meshfed.trust.ca import CertificateAuthority
    from meshfed.trust.spiffe import TrustDomain

    await establish(west, east.service.issue_token("west").encoded)
    await establish(north, east.service.issue_token("north").encoded)
    north_ca = north.authority.signing_ca()
    forger = CertificateAuthority(
        TrustDomain("west.mesh"), north_ca.root, north_ca.intermediate, north_ca.intermediate_key
    )
    forged = forger.issue(controller_id(TrustDomain("west.mesh")))
    credentials = grpc.ssl_channel_credentials(
        east.zone.trust.own_bundle().to_pem(), forged.private_key_pem(), forged.cert_chain_pem()
    )
    options = [("grpc.ssl_target_name_override", federation_host("east.mesh"))]
    async with grpc.aio.secure_channel(east.service.stream_addresses[0], credentials, options=options) as channel:
        call = pb_grpc.PeeringStreamStub(channel).Stream()  # type: ignore[no-untyped-call]

        async def say_hello_and_listen() -> None:
            # The server may refuse before the hello is even written: either call raises.
            await call.write(pb.PeerMessage(hello=pb.Hello(zone="west", trust_domain="west.mesh")))
            await call.read()

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await say_hello_and_listen()
    return refused.value


def test_a_dialer_follows_the_acceptor_to_where_its_stream_is_now(make_zone):
    """East restarts advertising another name for the same stream (a new advertised host, a load
    balancer's name): its hello says so, and west dials that from then on, stored for its restarts."""
    port = free_port()
    east, west = Harness(make_zone("east")), Harness(make_zone("west"))

    async def scenario() -> None:
        await east.start(listen=f"127.0.0.1:{port}")
        await west.start()
        await west.service.establish(east.service.issue_token("west").encoded, "east")
        await eventually(lambda: west.state_of("east") == PeerState.ACTIVE, "west's peering ACTIVE")
        assert west.service.peer("east").peer_addresses == [f"127.0.0.1:{port}"]
        await east.stop()
        await east.start(listen=f"127.0.0.1:{port}", advertise="localhost")
        await eventually(
            lambda: west.service.peer("east").peer_addresses == [f"localhost:{port}"], "west following east"
        )
        with PeeringStore.of(west.zone) as store:
            assert store.require("east").peer_addresses == (f"localhost:{port}",)
        await west.stop()
        await east.stop()

    run(scenario())
