"""Exports and imports turned into gateway config, with two running controllers and real traffic.

The peering stream is not involved here: snapshots are handed from one
controller to the other directly, so these tests pin down what the stream must
deliver and what the controllers do with it.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from meshfed.catalog import EmbeddedCatalog, Endpoint, Service
from meshfed.controller import Controller, ControllerSettings
from meshfed.errors import FederationError
from meshfed.federation.exchange import ExportedService, ServiceSnapshot
from meshfed.federation.exports import ExportRules
from meshfed.federation.imports import ImportStore, ParsedSnapshots, parse_stored
from meshfed.gateway import AuthzRule
from meshfed.trust.spiffe import TrustDomain
from meshfed.zone import Zone
from tests.conftest import EchoServer, eventually, round_trip, trust_each_other


def _register_echo(zone: Zone, backend: EchoServer, name: str = "echo") -> None:
    with EmbeddedCatalog(zone.directory) as catalog:
        catalog.register(
            Service(
                name=name,
                ports={"tcp": 7},
                endpoints=[Endpoint(address=backend.address[0], port=backend.address[1], zone=zone.name)],
            )
        )


def _controller(zone: Zone, peers: dict[str, Zone]) -> Controller:
    return Controller(
        zone,
        ControllerSettings(
            gateway_address="127.0.0.1:0",
            egress_port_base=0,
            # No active checks: these tests count the backend's connections, and a check is one more.
            health_check=None,
        ),
        peer_trust_domains=lambda: {name: peer.trust_domain for name, peer in peers.items()},
    )


async def _call(address: tuple[str, int], payload: bytes) -> bytes:
    def call() -> bytes:
        try:
            with socket.create_connection(address, timeout=5) as sock:
                return round_trip(sock, payload)
        except OSError:
            return b""

    return await asyncio.to_thread(call)


def _egress(controller: Controller, listener: str) -> tuple[str, int]:
    return controller.gateway.address(listener)


@pytest.fixture
def zones(make_zone) -> tuple[Zone, Zone, Zone]:
    east, west, north = make_zone("east"), make_zone("west"), make_zone("north")
    trust_each_other(east, west, north)
    return east, west, north


def test_an_exported_service_is_reachable_from_the_importing_zone(zones, echo_server):
    east, west, north = zones
    _register_echo(east, echo_server)
    with ExportRules(east.directory) as rules:
        rules.add("echo", "default", ["west"])

    async def scenario() -> None:
        async with (
            _controller(east, {"west": west, "north": north}) as east_ctl,
            _controller(west, {"east": east}) as west_ctl,
            _controller(north, {"east": east}) as north_ctl,
        ):
            assert east_ctl.exported_snapshot("north").services == []  # not exported to north
            await west_ctl.import_snapshot("east", east_ctl.exported_snapshot("west"))
            assert await _call(_egress(west_ctl, "egress:echo.default.east:tcp"), b"ping") == b"ping"

            # north forges an import of the same service: east's ingress must refuse its gateway.
            forged = east_ctl.exported_snapshot("west")
            await north_ctl.import_snapshot("east", forged)
            assert await _call(_egress(north_ctl, "egress:echo.default.east:tcp"), b"ping") == b""
            assert east_ctl.gateway.stats()["listeners"]["ingress"]["denied"] == 1

    asyncio.run(scenario())
    assert len(echo_server.connections) == 1


def test_a_peer_hears_of_exports_only_once_the_ingress_admits_it(zones, echo_server):
    """A peering just established: until east's running ingress admits west, west is told nothing (it'd be refused)."""
    east, west, _ = zones
    _register_echo(east, echo_server)
    with ExportRules(east.directory) as rules:
        rules.add("echo", "default", ["west"])
    peers: dict[str, Zone] = {}
    told: list[None] = []

    async def scenario() -> None:
        async with _controller(east, peers) as east_ctl, _controller(west, {"east": east}) as west_ctl:
            east_ctl.on_exports_changed(lambda: told.append(None))
            assert east_ctl.exports_for_peer("west") is None
            peers["west"] = west  # the peering is stored; the config the gateway runs does not admit west yet
            assert east_ctl.exports_for_peer("west") is None
            await east_ctl.reconfigure()
            assert told, "the apply that admits west asks the peers again"
            snapshot = east_ctl.exports_for_peer("west")
            assert snapshot is not None
            assert [service.name for service in snapshot.services] == ["echo"]
            await west_ctl.import_snapshot("east", snapshot)
            assert await _call(_egress(west_ctl, "egress:echo.default.east:tcp"), b"ping") == b"ping"

    asyncio.run(scenario())


def test_export_changes_reach_the_running_ingress(zones, echo_server):
    east, west, _ = zones
    _register_echo(east, echo_server)

    async def scenario() -> None:
        async with _controller(east, {"west": west}) as east_ctl, _controller(west, {"east": east}) as west_ctl:
            notified: list[float] = []
            east_ctl.on_exports_changed(lambda: notified.append(time.monotonic()))
            snapshot = east_ctl.exported_snapshot("west")
            assert snapshot.services == []

            # An operator exports from another process (the CLI writes state.db).
            with ExportRules(east.directory) as rules:
                rules.add("echo", "default", ["*"])
            # How fast is measured in bench/control_plane.py; here, that it arrives.
            await eventually(lambda: bool(notified), "the export to reach the running controller")
            newer = east_ctl.exported_snapshot("west")
            assert newer.version > snapshot.version
            assert [service.name for service in newer.services] == ["echo"]
            await west_ctl.import_snapshot("east", newer)
            assert await _call(_egress(west_ctl, "egress:echo.default.east:tcp"), b"hi") == b"hi"

            # Deregistering the service removes the route: nothing is forwarded any more.
            with EmbeddedCatalog(east.directory) as catalog:
                catalog.deregister("default", "echo")
            await eventually(lambda: len(notified) >= 2, "the deregistration to reach the running controller")
            assert await _call(_egress(west_ctl, "egress:echo.default.east:tcp"), b"hi") == b""

    asyncio.run(scenario())


def test_stale_or_duplicate_snapshots_change_nothing(zones, echo_server):
    east, west, _ = zones
    _register_echo(east, echo_server)
    with ExportRules(east.directory) as rules:
        rules.add("echo", "default", ["west"])

    async def scenario() -> None:
        async with _controller(east, {"west": west}) as east_ctl, _controller(west, {"east": east}) as west_ctl:
            snapshot = east_ctl.exported_snapshot("west")
            await west_ctl.import_snapshot("east", snapshot)
            port = _egress(west_ctl, "egress:echo.default.east:tcp")
            older = snapshot.model_copy(update={"version": snapshot.version - 1, "services": []})
            await west_ctl.import_snapshot("east", older)
            await west_ctl.import_snapshot("east", snapshot)
            assert _egress(west_ctl, "egress:echo.default.east:tcp") == port
            await west_ctl.forget_peer("east")
            assert "egress:echo.default.east:tcp" not in west_ctl.gateway.addresses()

    asyncio.run(scenario())
    with ImportStore(west.directory) as imports:
        assert imports.services() == []


def test_egress_ports_are_kept_per_import(tmp_path):
    with ImportStore(tmp_path) as imports:
        ports = imports.egress_ports(15500)
        first, second = ports("egress:a.default.east:http"), ports("egress:b.default.east:http")
        assert (first, second) == (15500, 15501)
        assert ports("egress:a.default.east:http") == 15500
        ports.save()
    with ImportStore(tmp_path) as imports:  # kept across restarts; new names skip the taken ports
        ports = imports.egress_ports(15500)
        assert ports("egress:c.default.east:http") == 15502
        assert ports("egress:b.default.east:http") == 15501
    with ImportStore(tmp_path) as imports:  # c was never saved: its port is free again
        assert imports.egress_ports(15500)("egress:d.default.east:http") == 15502
        near_the_top = imports.egress_ports(65535)
        assert near_the_top("egress:e.default.east:http") == 65535
        with pytest.raises(FederationError, match="no free egress port"):
            near_the_top("egress:f.default.east:http")


def test_a_build_reads_only_the_stored_imports_it_has_not_parsed(tmp_path):
    """A stored snapshot is named by its (epoch, version): a reader holding that pair reads no document, and
    one put back after a refusal is another pair, read again."""

    def snapshot(version: int, *names: str) -> ServiceSnapshot:
        services = [
            ExportedService(name=name, namespace="default", ports={"tcp": 1}, healthy_endpoints=1, total_endpoints=1)
            for name in names
        ]
        return ServiceSnapshot(
            zone="east", trust_domain="east.mesh", gateway_addresses=[], version=version, epoch="e1", services=services
        )

    known: ParsedSnapshots = {}
    with ImportStore(tmp_path) as imports:
        assert imports.put("east", snapshot(1, "a"))
        assert imports.put("north", snapshot(4, "n"))
        heads, documents = imports.documents_unless({})
        assert heads == {"east": ("e1", 1), "north": ("e1", 4)}
        first, problems = parse_stored(heads, documents, known)
        assert not problems
        assert [s.name for s in first["east"].services] == ["a"]

        previous = imports.snapshot("east")
        assert imports.put("east", snapshot(2, "a", "b"))
        heads, documents = imports.documents_unless({peer: head for peer, (head, _) in known.items()})
        assert set(documents) == {"east"}  # north's is held
        second, _ = parse_stored(heads, documents, known)
        assert second["north"] is first["north"]
        assert [s.name for s in second["east"].services] == ["a", "b"]

        imports.restore("east", previous)  # refused: version 1 back
        heads, documents = imports.documents_unless({peer: head for peer, (head, _) in known.items()})
        assert heads["east"] == ("e1", 1)
        assert set(documents) == {"east"}
        third, _ = parse_stored(heads, documents, known)
        assert third["east"] == first["east"]


@pytest.mark.parametrize(
    ("peers", "message"),
    [([], "at least one peer"), (["West"], "not a peering name"), (["a b"], "not a peering name")],
)
def test_bad_export_rules_are_refused(tmp_path, peers, message):
    with ExportRules(tmp_path) as rules:
        with pytest.raises(FederationError, match=message):
            rules.add("web", "default", peers)
        assert rules.rules() == []
        with pytest.raises(FederationError, match=r"no export of web\.default"):
            rules.remove("web", "default")


def test_peer_trust_domain_mapping_is_what_the_ingress_allows(zones, echo_server):
    east, west, _ = zones
    _register_echo(east, echo_server)
    with ExportRules(east.directory) as rules:
        rules.add("echo", "default", ["west"])

    async def scenario() -> None:
        async with _controller(east, {"west": west}) as east_ctl:
            (route,) = east_ctl.gateway_config().listeners[0].routes  # type: ignore[union-attr]
            # Any identity west's trust domain vouches for (its gateway, or a workload it conveys).
            assert route.rules == [AuthzRule(action="allow", id="spiffe://west.mesh/*")]
            assert east_ctl.gateway_config().listeners[0].trusted_gateways == [  # type: ignore[union-attr]
                str(TrustDomain("west.mesh").gateway_id)
            ]

    asyncio.run(scenario())


def test_imports_are_published_at_the_advertised_egress_host(zones, echo_server):
    east, west, _ = zones
    _register_echo(east, echo_server)
    with ExportRules(east.directory) as rules:
        rules.add("echo", "default", ["west"])

    async def scenario() -> None:
        west_controller = Controller(
            west,
            ControllerSettings(
                gateway_address="127.0.0.1:0",
                egress_port_base=0,
                egress_host="0.0.0.0",
                egress_advertise_host="127.0.0.1",
            ),
            peer_trust_domains=lambda: {"east": east.trust_domain},
        )
        async with _controller(east, {"west": west}) as east_ctl, west_controller as west_ctl:
            await west_ctl.import_snapshot("east", east_ctl.exported_snapshot("west"))
            (published,) = west_ctl.local_imports()
            assert published.name == "echo.default.east"
            host, port = published.ports["tcp"]
            assert host == "127.0.0.1"
            assert west_ctl.gateway.address("egress:echo.default.east:tcp") == ("0.0.0.0", port)
            assert await _call((host, port), b"via the advertised host") == b"via the advertised host"

    asyncio.run(scenario())
