"""Imports reached by name through one CONNECT listener, with no listening socket per import.

Two and three zones assembled as `meshfed up` runs them; west has an egress
CONNECT listener and, in the first test, no per-import listeners at all.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import replace

from meshfed.catalog import EmbeddedCatalog, Endpoint, Service
from meshfed.federation.exports import ExportRules
from meshfed.federation.gateway_config import CONNECT_LISTENER, INGRESS_LISTENER
from meshfed.gateway import ConnectListener
from meshfed.runtime import ZoneRuntime, assemble_zone
from meshfed.zone import Zone
from tests.conftest import EchoServer, ZoneFactory, eventually, round_trip, running_echo_server
from tests.test_e2e_federation import LOOPBACK

CONNECTING = replace(
    LOOPBACK, controller=replace(LOOPBACK.controller, egress_connect_address="127.0.0.1:0", per_import_listeners=False)
)


def _export_echo(zone: Zone, backend: EchoServer, name: str = "echo", port: int = 7) -> None:
    with EmbeddedCatalog(zone.directory) as catalog:
        catalog.register(
            Service(name=name, ports={"tcp": port}, endpoints=[Endpoint(address="127.0.0.1", port=backend.address[1])])
        )
    with ExportRules(zone.directory) as rules:
        rules.add(name, "default", ["west"])


def _through_proxy(runtime: ZoneRuntime, authority: str, payload: bytes) -> tuple[str, bytes]:
    """CONNECT to ``authority`` through west's CONNECT listener: the status line, and the echo of ``payload``."""
    address = runtime.controller.gateway.address(CONNECT_LISTENER)
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            if not chunk:
                break
            head += chunk
        status = head.split(b"\r\n", 1)[0].decode()
        if not status.endswith(" 200 Connection established"):
            return status, b""
        return status, round_trip(sock, payload)


def _names(runtime: ZoneRuntime) -> set[str]:
    """The authorities the CONNECT listener of the running config names."""
    config = runtime.controller.applied_gateway_config
    listeners = [item for item in (config.listeners if config else []) if isinstance(item, ConnectListener)]
    return {route.authority for listener in listeners for route in listener.connect_routes}


async def _peer(importer: ZoneRuntime, *exporters: tuple[str, ZoneRuntime]) -> None:
    for name, exporter in exporters:
        await importer.peering.establish(exporter.peering.issue_token("west").encoded, name)

        def active(peer: str = name) -> bool:
            return importer.peering.peer(peer).state == "ACTIVE"

        await eventually(active, f"west peered with {name}")


def test_imports_are_reached_by_name_through_one_socket(make_zone: ZoneFactory) -> None:
    east, west, north = make_zone("east"), make_zone("west"), make_zone("north")
    with running_echo_server() as east_echo, running_echo_server() as north_echo:
        _export_echo(east, east_echo, "echo", 7)
        _export_echo(east, east_echo, "web", 8080)
        _export_echo(north, north_echo, "echo", 7)

        async def scenario() -> None:
            e, w, n = (
                assemble_zone(zone, settings)
                for zone, settings in ((east, LOOPBACK), (west, CONNECTING), (north, LOOPBACK))
            )
            for runtime in (e, w, n):
                await runtime.controller.start()
            try:
                await _peer(w, ("east", e), ("north", n))
                imported = ("echo.default.east:7", "web.default.east:8080", "echo.default.north:7")

                def served() -> bool:
                    return set(imported) <= _names(w)

                await eventually(served, "west's CONNECT listener names every import")
                # Three imports, and a failover group of two of them: one egress socket.
                assert set(w.controller.gateway.addresses()) == {INGRESS_LISTENER, CONNECT_LISTENER}
                for authority in imported:
                    status, back = await asyncio.to_thread(_through_proxy, w, authority, authority.encode() * 100)
                    assert status == "HTTP/1.1 200 Connection established", (authority, status)
                    assert back == authority.encode() * 100
                status, back = await asyncio.to_thread(_through_proxy, w, "echo.default:7", b"either zone")
                assert (status, back) == ("HTTP/1.1 200 Connection established", b"either zone")

                status, _ = await asyncio.to_thread(_through_proxy, w, "nope.default.east:7", b"x")
                assert status == "HTTP/1.1 404 Not Found"

                # An export withdrawn: its name goes, the others stay.
                with ExportRules(east.directory) as rules:
                    rules.remove("web", "default")
                await eventually(lambda: "web.default.east:8080" not in _names(w), "web withdrawn from west")

                status, _ = await asyncio.to_thread(_through_proxy, w, "web.default.east:8080", b"x")
                assert status == "HTTP/1.1 404 Not Found"
                status, back = await asyncio.to_thread(_through_proxy, w, "echo.default.east:7", b"still")
                assert (status, back) == ("HTTP/1.1 200 Connection established", b"still")
            finally:
                for runtime in (n, w, e):
                    await runtime.controller.stop()

        asyncio.run(scenario())


def test_imports_whose_egress_requires_workload_svids_are_not_offered_by_name(make_zone: ZoneFactory) -> None:
    """The CONNECT listener's caller is the gateway: an import that must see the workload's SVID keeps its own
    listener, and the CONNECT listener does not name it."""
    east, west = make_zone("east"), make_zone("west")
    strict = replace(
        CONNECTING, controller=replace(CONNECTING.controller, egress_workload_tls="strict", per_import_listeners=True)
    )
    with running_echo_server() as echo:
        _export_echo(east, echo)

        async def scenario() -> None:
            e, w = assemble_zone(east, LOOPBACK), assemble_zone(west, strict)
            for runtime in (e, w):
                await runtime.controller.start()
            try:
                await _peer(w, ("east", e))
                egress = "egress:echo.default.east:tcp"
                await eventually(lambda: egress in w.controller.gateway.addresses(), "west's own listener for echo")
                status, _ = await asyncio.to_thread(_through_proxy, w, "echo.default.east:7", b"x")
                assert status == "HTTP/1.1 404 Not Found"
            finally:
                for runtime in (w, e):
                    await runtime.controller.stop()

        asyncio.run(scenario())
