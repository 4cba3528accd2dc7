"""Three zones assembled exactly as `meshfed up` runs them: tokens, the peering stream, exports, traffic."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from meshfed.catalog import EmbeddedCatalog, Endpoint, Service
from meshfed.controller import ControllerSettings
from meshfed.federation.exports import ExportRules
from meshfed.federation.settings import PeeringSettings
from meshfed.gateway import HealthCheck
from meshfed.runtime import ZoneRuntime, ZoneSettings, assemble_zone
from meshfed.zone import Zone
from tests.conftest import EchoServer, eventually, round_trip, running_echo_server
from tests.test_data_plane_logs import LOGGER as DATA_PLANE_LOGGER

LOOPBACK = ZoneSettings(
    controller=ControllerSettings(
        gateway_address="127.0.0.1:0", egress_port_base=0, failing_peer_grace=dt.timedelta(seconds=0.5)
    ),
    peering=PeeringSettings(listen_address="127.0.0.1:0", establish_address="127.0.0.1:0", heartbeat_interval=0.2),
)


async def call(runtime: ZoneRuntime, listener: str, payload: bytes) -> bytes:
    address = runtime.controller.gateway.addresses().get(listener)
    if address is None:
        return b""

    def once() -> bytes:
        try:
            with socket.create_connection(address, timeout=5) as sock:
                return round_trip(sock, payload)
        except OSError:
            return b""

    return await asyncio.to_thread(once)


def register_echo(zone: Zone, backend: EchoServer) -> None:
    with EmbeddedCatalog(zone.directory) as catalog:
        catalog.register(
            Service(name="echo", ports={"tcp": 7}, endpoints=[Endpoint(address="127.0.0.1", port=backend.address[1])])
        )


def test_peered_zones_call_exported_services_through_their_gateways(make_zone, echo_server, caplog):
    # At debug the data plane logs every connection; the libraries under it (h2, rustls) would log
    # every frame, and only theirs at info and above reach the zone's log.
    caplog.set_level(logging.DEBUG, logger=DATA_PLANE_LOGGER)
    east, west, north = make_zone("east"), make_zone("west"), make_zone("north")
    register_echo(east, echo_server)
    with ExportRules(east.directory) as rules:
        rules.add("echo", "default", ["west"])

    async def scenario() -> None:
        runtimes = [assemble_zone(zone, LOOPBACK) for zone in (east, west, north)]
        e, w, n = runtimes
        for runtime in runtimes:
            await runtime.controller.start()
        try:
            # Tokens travel out of band; each names the zone that will redeem it.
            await w.peering.establish(e.peering.issue_token("west").encoded, "east")
            await n.peering.establish(e.peering.issue_token("north").encoded, "east")

            def both_active() -> bool:
                return all(dialer.peering.peer("east").state == "ACTIVE" for dialer in (w, n))

            await eventually(both_active, "peerings ACTIVE")

            # west imports echo and calls it; north sees nothing (not exported to it).
            egress = "egress:echo.default.east:tcp"
            await eventually(lambda: egress in w.controller.gateway.addresses(), "west's egress for echo")
            assert await call(w, egress, b"across zones") == b"across zones"
            assert egress not in n.controller.gateway.addresses()

            # /metrics shows the peering and the gateway series. Each appears once its event is counted (the
            # first heartbeat, the gateway's close of the call), which need not have happened yet: wait for them.
            labels = f'listener="{egress}",namespace="default",peer="east",service="echo",trust_domain="east.mesh"'
            series = (
                'meshfed_peering_state{peer="east",state="ACTIVE"} 1.0',
                'meshfed_peering_heartbeat_age_seconds{peer="east"}',
                'meshfed_peering_imported_services{peer="east"} 1.0',
                # Labelled with what the listener serves: the service, and the peer with its trust domain.
                f"meshfed_gateway_connections_total{{{labels}}} 1.0",
                # The call rode the gateway tunnel: one tunnel connection to east, one stream on it.
                f"meshfed_gateway_tunnels_total{{{labels}}} 1.0",
                f"meshfed_gateway_tunnel_streams_total{{{labels}}} 1.0",
            )

            def missing_series() -> list[str]:
                metrics = w.controller.telemetry.render().decode()
                return [line for line in series if line not in metrics]

            await eventually(lambda: not missing_series(), "west's /metrics to show the peering and gateway series")

            # The call's own debug record arrived (the bridge keeps order), and no frame of h2's with it.
            def data_plane() -> list[str]:
                return [r.getMessage() for r in caplog.records if r.name == DATA_PLANE_LOGGER]

            await eventually(
                lambda: any("connection finished" in m and egress in m for m in data_plane()),
                "the data plane's debug record of west's call",
            )
            assert not [m for m in data_plane() if "frame=" in m], "h2's frames reached the zone's log"

            # Export to north too, as the CLI would (another process writing state.db): it arrives by stream.
            with ExportRules(east.directory) as rules:
                rules.add("echo", "default", ["north"])
            started = time.monotonic()
            await eventually(lambda: egress in n.controller.gateway.addresses(), "north's egress for echo")
            propagation = time.monotonic() - started
            assert await call(n, egress, b"north too") == b"north too"
            print(f"export → peer gateway serving: {propagation * 1000:.0f} ms")

            # Deleting the peering removes the import and the trust it brought.
            await n.peering.delete("east")
            await eventually(lambda: egress not in n.controller.gateway.addresses(), "north's egress removed")
            assert "east.mesh" not in {s.bundle.trust_domain.name for s in north.trust.trusted_bundles()}
        finally:
            for runtime in reversed(runtimes):
                await runtime.controller.stop()

    asyncio.run(scenario())
    assert bytes(echo_server.received) == b"across zonesnorth too"


GROUP = "failover:echo.default:tcp"


@contextlib.asynccontextmanager
async def west_calling_east_or_north(
    zones: tuple[Zone, Zone, Zone], backends: tuple[EchoServer, EchoServer], settings: ZoneSettings = LOOPBACK
) -> AsyncIterator[tuple[ZoneRuntime, ZoneRuntime, ZoneRuntime]]:
    """east and north (with ``backends``) export echo to west, which holds the failover group of the two."""
    east, _, north = zones
    for zone, backend in zip((east, north), backends, strict=True):
        register_echo(zone, backend)
        with ExportRules(zone.directory) as rules:
            rules.add("echo", "default", ["west"])
    runtimes = [assemble_zone(zone, settings) for zone in zones]
    e, w, n = runtimes
    for runtime in runtimes:
        await runtime.controller.start()
    try:
        await w.peering.establish(e.peering.issue_token("west").encoded, "east")
        await w.peering.establish(n.peering.issue_token("west").encoded, "north")
        await eventually(lambda: GROUP in w.controller.gateway.addresses(), "west's failover listener")
        yield e, w, n
    finally:
        for runtime in reversed(runtimes):
            await runtime.controller.stop()


@pytest.mark.parametrize("dies", ["east's backend", "east's gateway"])
def test_a_dead_source_fails_no_request_while_another_zone_serves_the_service(make_zone, dies: str):
    """Default settings (5 s health checks). A dead backend: east's ingress opens its upstream before
    it answers the caller hop, so west hears "unavailable" and opens north instead, before any client
    byte moves. A dead zone: west's connect to east's gateway fails, and it dials north. Not one
    request fails, long before any health check or heartbeat notices."""
    zones = make_zone("east"), make_zone("west"), make_zone("north")
    with running_echo_server() as east_backend, running_echo_server() as north_backend:

        async def scenario() -> list[int]:
            async with west_calling_east_or_north(zones, (east_backend, north_backend)) as (e, w, _):
                assert await call(w, GROUP, b"to east") == b"to east"
                if dies == "east's backend":
                    east_backend.stop()
                else:
                    await e.controller.stop()
                # A bounded loop, well inside the first health check interval after the stop.
                return [index for index in range(40) if await call(w, GROUP, b"x") != b"x"]

        failed = asyncio.run(scenario())
    assert failed == []
    assert north_backend.received == b"x" * 40


def test_failover_group_moves_to_the_next_zone_when_a_backend_stops(make_zone):
    """echo runs in east and north; west calls it through one failover listener.

    Traffic goes to east (first in failover order). When east's backend stops,
    east's gateway health checks fail, east tells its peers echo has no healthy
    endpoint, and west's group moves on to north. Requests may fail only within
    that detection window.
    """
    zones = make_zone("east"), make_zone("west"), make_zone("north")
    settings = replace(
        LOOPBACK,
        controller=replace(
            LOOPBACK.controller,
            health_check=HealthCheck(interval_ms=100, timeout_ms=100, healthy_threshold=1, unhealthy_threshold=2),
        ),
    )
    with running_echo_server() as east_backend, running_echo_server() as north_backend:

        async def scenario() -> list[float]:
            async with west_calling_east_or_north(zones, (east_backend, north_backend), settings) as (_, w, _):
                (listed,) = w.controller.failover_groups()
                assert listed.sources == ["east", "north"]
                assert await call(w, GROUP, b"to east") == b"to east"
                assert east_backend.received == b"to east"
                assert not north_backend.received

                east_backend.stop()
                stopped = time.monotonic()
                failures: list[float] = []
                served_by_north = 0
                while served_by_north < 20:  # 20 in a row after the last failure
                    assert time.monotonic() - stopped < 15, f"no failover; failures at {failures}"
                    if await call(w, GROUP, b"x") == b"x":
                        served_by_north += 1
                    else:
                        failures.append(time.monotonic() - stopped)
                        served_by_north = 0
                    await asyncio.sleep(0.02)
                return failures

        failures = asyncio.run(scenario())
    assert north_backend.received == b"x" * 20
    # Only requests inside the detection window failed: health checks (2 x 100 ms), the
    # health poll (0.5 s), the stream and west's apply. Generous bound for a loaded machine.
    assert not failures or failures[-1] < 5.0, failures
    print(f"failover: {len(failures)} failed request(s), last at {failures[-1] if failures else 0:.2f} s")
