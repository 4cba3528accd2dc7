"""Stable failover groups: a group's listener and address live while any source offers the service.

Local clients are given a group's address (``failover:<service>.<namespace>:<port>``). When the
group shrinks to one source (a peering deleted, an export removed) that source still serves the
service, so the listener must stay where it is; only when no source is left does it go.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field

import orjson
import pytest

from meshfed.catalog import CatalogSnapshot, EmbeddedCatalog, Endpoint
from meshfed.controller import Controller, ControllerSettings
from meshfed.federation.exchange import ExportedService, ServiceSnapshot
from meshfed.federation.exports import ExportRules
from meshfed.federation.failover import failover_groups, group_of_listener
from meshfed.runtime import assemble_zone
from tests.conftest import eventually, free_port, round_trip, running_echo_server, trust_each_other
from tests.test_cli import meshfed_cli
from tests.test_e2e_federation import LOOPBACK, register_echo
from tests.test_failover_groups import imported, local_web

GROUP = "failover:echo.default:tcp"
NORTH_IMPORT = "egress:echo.default.north:tcp"
WEB = ("default", "web")


def test_a_group_that_shrinks_to_one_source_stays_a_group_with_one_tier():
    empty = CatalogSnapshot(version=1, services=[])
    (group,) = failover_groups(empty, [imported("north")], sticky={WEB})
    assert group.sources == ["north"]
    assert len(group.tiers) == 1
    assert group.listener_name("http") == "failover:web.default:http"

    # This zone alone: no import is left, the local endpoints are the group.
    (group,) = failover_groups(local_web(Endpoint(address="10.9.0.1", port=8080)), [], sticky={WEB})
    assert group.sources == ["local"]
    assert group.tiers == ()

    # No source left (a local service without endpoints offers nothing): no group.
    assert failover_groups(empty, [], sticky={WEB}) == []
    assert failover_groups(local_web(), [], sticky={WEB}) == []
    assert failover_groups(empty, [imported("north", name="api")], sticky={WEB}) == []

    # Never a group: one source is served by its import listener alone.
    assert failover_groups(empty, [imported("north")]) == []
    assert failover_groups(local_web(Endpoint(address="10.9.0.1", port=8080)), []) == []
    # Two sources are a group, sticky or not.
    assert len(failover_groups(empty, [imported("east"), imported("north")], sticky={WEB})) == 1


def test_group_names_are_read_back_from_listener_names():
    assert group_of_listener("failover:web.shop:http") == ("shop", "web")
    assert group_of_listener("egress:web.shop.east:http") is None
    assert group_of_listener("ingress") is None
    assert group_of_listener("failover:web:http") is None


@dataclass
class Client:
    """Sends one request per new connection to ``address`` in a loop (a thread), counting how each went."""

    address: tuple[str, int]
    outcomes: Counter[str] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Client:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=10)

    @property
    def failed(self) -> int:
        return sum(count for outcome, count in self.outcomes.items() if outcome != "ok")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with socket.create_connection(self.address, timeout=5) as sock:
                    outcome = "ok" if round_trip(sock, b"ping") == b"ping" else "closed"
            except ConnectionRefusedError:
                outcome = "connection refused"
            except OSError as err:
                outcome = type(err).__name__
            self.outcomes[outcome] += 1
            self._stop.wait(0.01)


@pytest.mark.parametrize("removal", ["peering deleted", "export removed"])
def test_a_group_shrinking_to_one_peer_keeps_its_address_and_fails_no_request(make_zone, removal: str) -> None:
    """echo runs in east and north; west's clients call the group. North goes; east serves on, unmoved."""
    east, west, north = make_zone("east"), make_zone("west"), make_zone("north")
    with running_echo_server() as east_backend, running_echo_server() as north_backend:
        for zone, backend in ((east, east_backend), (north, north_backend)):
            register_echo(zone, backend)
            with ExportRules(zone.directory) as rules:
                rules.add("echo", "default", ["west"])

        async def scenario() -> tuple[Counter[str], bool, list[str]]:
            runtimes = [assemble_zone(zone, LOOPBACK) for zone in (east, west, north)]
            e, w, n = runtimes
            for runtime in runtimes:
                await runtime.controller.start()
            try:
                await w.peering.establish(e.peering.issue_token("west").encoded, "east")
                await w.peering.establish(n.peering.issue_token("west").encoded, "north")
                await eventually(
                    lambda: [g.sources for g in w.controller.failover_groups()] == [["east", "north"]],
                    "west's group of east and north",
                )
                await eventually(lambda: GROUP in w.controller.gateway.addresses(), "west's group listener")
                address = w.controller.gateway.addresses()[GROUP]
                with Client(address) as client:
                    await eventually(lambda: client.outcomes["ok"] >= 20, "requests through the group")
                    if removal == "peering deleted":
                        await w.peering.delete("north")
                    else:
                        with ExportRules(north.directory) as rules:
                            rules.remove("echo", "default")
                        await n.controller.exports_changed()
                    # West applied a config without north's import (its own listener gone)...
                    await eventually(
                        lambda: NORTH_IMPORT not in w.controller.gateway.addresses(), "north's import gone at west"
                    )
                    # ...and clients go on calling the group's address for a while after the change.
                    after = sum(client.outcomes.values())
                    await eventually(lambda: sum(client.outcomes.values()) >= after + 50, "requests after the change")
                unmoved = w.controller.gateway.addresses().get(GROUP) == address
                return client.outcomes, unmoved, [g.describe() for g in w.controller.failover_groups()]
            finally:
                for runtime in reversed(runtimes):
                    await runtime.controller.stop()

        outcomes, unmoved, groups = asyncio.run(scenario())
    print(f"group shrinking to one source ({removal}): {dict(outcomes)}")
    assert set(outcomes) == {"ok"}, f"{outcomes['ok']} of {sum(outcomes.values())} requests ok: {dict(outcomes)}"
    assert unmoved, "the group's listener moved or went"
    assert groups == ["east"]  # listed with its one source
    assert len(east_backend.received) == 4 * outcomes["ok"]  # east served them all: first in failover order
    assert not north_backend.received


def egress_port_base() -> int:
    """A loopback port nothing listens on, nor on the two after it (egress ports go up from a base)."""
    while True:
        base = free_port()
        try:
            for port in (base + 1, base + 2):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base


def east_exports(version: int, *services: str) -> ServiceSnapshot:
    return ServiceSnapshot(
        zone="east",
        trust_domain="east.mesh",
        gateway_addresses=["127.0.0.1:9"],
        version=version,
        services=[
            ExportedService(name=name, namespace="default", ports={"tcp": 7}, healthy_endpoints=1, total_endpoints=1)
            for name in services
        ],
    )


def test_a_group_down_to_this_zone_keeps_its_port_across_restarts(make_zone) -> None:
    """echo runs in west and east; east's import goes. West's group of local endpoints keeps its port, restarted."""
    east, west = make_zone("east"), make_zone("west")
    trust_each_other(east, west)
    settings = ControllerSettings(gateway_address="127.0.0.1:0", egress_port_base=egress_port_base(), health_check=None)

    def controller() -> Controller:
        return Controller(west, settings, peer_trust_domains=lambda: {"east": east.trust_domain})

    def call(address: tuple[str, int]) -> bytes:
        with socket.create_connection(address, timeout=5) as sock:
            return round_trip(sock, b"local")

    with running_echo_server() as backend:
        register_echo(west, backend)

        async def scenario() -> None:
            async with controller() as first:
                await first.import_snapshot("east", east_exports(1, "echo"))
                (group,) = first.failover_groups()
                assert group.sources == ["local", "east"]
                address = first.gateway.addresses()[GROUP]
                await first.forget_peer("east")
                (group,) = first.failover_groups()
                assert group.sources == ["local"]
                assert first.gateway.addresses()[GROUP] == address
                assert await asyncio.to_thread(call, address) == b"local"
            # The stopped zone's files say the same: the group holds its port in state.db.
            listed = await asyncio.to_thread(meshfed_cli, "catalog", "list", "--dir", west.directory, "-o", "json")
            assert listed.returncode == 0, listed.stderr.decode()
            groups = orjson.loads(listed.stdout)["failover_groups"]
            assert [(g["name"], g["sources"]) for g in groups] == [("echo.default", ["local"])]
            async with controller() as second:
                (group,) = second.failover_groups()
                assert group.sources == ["local"]
                assert second.gateway.addresses()[GROUP] == address  # the same port, from state.db
                assert await asyncio.to_thread(call, address) == b"local"
                # No source left: the listener goes.
                with EmbeddedCatalog(west.directory) as catalog:
                    catalog.deregister("default", "echo")
                await eventually(lambda: GROUP not in second.gateway.addresses(), "the group's listener gone")
                assert second.failover_groups() == []

        asyncio.run(scenario())
    assert backend.received == b"local" * 2
