"""Catalog continuity: a zone whose catalog comes up empty does not withdraw its exports from peers on its own.

A deleted or 0-byte ``catalog.db`` (or a Consul/Kubernetes source pointed at
the wrong place) looks like "every service is gone"; telling the peers so
would make each of them delete every import. The zone holds what its peers
last heard until the catalog has services again or an operator confirms.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace

import httpx

from meshfed.catalog import EmbeddedCatalog
from meshfed.federation.exports import ExportRules
from meshfed.runtime import ZoneRuntime, ZoneSettings, assemble_zone
from meshfed.zone import Zone
from tests.conftest import EchoServer, ZoneFactory, eventually, free_port, running_echo_server
from tests.test_e2e_federation import LOOPBACK, register_echo

EGRESS = "egress:echo.default.east:tcp"


def _fixed_ports() -> ZoneSettings:
    """LOOPBACK with fixed peering ports: a restarted zone must be where its peer dials."""
    ports = [free_port(), free_port()]
    return replace(
        LOOPBACK,
        peering=replace(
            LOOPBACK.peering, listen_address=f"127.0.0.1:{ports[0]}", establish_address=f"127.0.0.1:{ports[1]}"
        ),
    )


def _in_sync(runtime: ZoneRuntime, peer: str) -> bool:
    status = runtime.peering.peer(peer)
    return status.connected and status.acked_version == status.sent_version


async def _peer(east: ZoneRuntime, west: ZoneRuntime) -> None:
    await west.peering.establish(east.peering.issue_token("west").encoded, "east")
    await eventually(lambda: west.peering.peer("east").state == "ACTIVE", "west peered with east")


def _lose_catalog(zone: Zone) -> None:
    # Deleted: the zone starts with a new, empty catalog. (A 0-byte or damaged file is refused at
    # start with an error saying so; see tests/test_cli.py.)
    for name in ("catalog.db", "catalog.db-wal", "catalog.db-shm"):
        (zone.directory / name).unlink(missing_ok=True)


@contextlib.asynccontextmanager
async def _east_back_with_an_empty_catalog(east: Zone, west: Zone) -> AsyncIterator[tuple[ZoneRuntime, ZoneRuntime]]:
    """east exports echo to west; then east restarts with its catalog lost. Yields (east, west), both running."""
    settings = _fixed_ports()
    e, w = assemble_zone(east, settings), assemble_zone(west, LOOPBACK)
    await e.controller.start()
    await w.controller.start()
    try:
        await _peer(e, w)
        await eventually(lambda: EGRESS in w.controller.gateway.addresses(), "west imports echo")
        await e.controller.stop()
        _lose_catalog(east)
        e = assemble_zone(east, settings)
        await e.controller.start()
        yield e, w
    finally:
        await w.controller.stop()
        await e.controller.stop()


def _exporting_echo(make_zone: ZoneFactory, backend: EchoServer) -> tuple[Zone, Zone]:
    east, west = make_zone("east"), make_zone("west")
    register_echo(east, backend)
    with ExportRules(east.directory) as rules:
        rules.add("echo", "default", ["west"])
    return east, west


def test_an_empty_catalog_at_start_holds_exports_until_confirmed(make_zone):
    async def scenario(east: Zone, west: Zone) -> None:
        async with _east_back_with_an_empty_catalog(east, west) as (e, w):
            # east comes back with an empty catalog: west keeps its import, east says why.
            assert e.controller.catalog_held
            assert any("empty although this zone exported" in p for p in e.controller.problems())
            await eventually(lambda: w.peering.peer("east").state == "ACTIVE", "west reconnected")
            await eventually(lambda: _in_sync(e, "west"), "west holds what east sends")
            assert EGRESS in w.controller.gateway.addresses()
            assert w.peering.peer("east").imported_services == 1

            # The operator confirms (with the admin token): now west hears that echo is gone.
            transport = httpx.ASGITransport(app=e.app())
            async with httpx.AsyncClient(transport=transport, base_url="http://east") as api:
                assert (await api.post("/v1/catalog/confirm-empty")).status_code == 401
                token = {"Authorization": f"Bearer {east.admin_token()}"}
                confirmed = await api.post("/v1/catalog/confirm-empty", headers=token)
                assert confirmed.json() == {"released": True}
                assert (await api.post("/v1/catalog/confirm-empty", headers=token)).json() == {"released": False}
            await eventually(lambda: EGRESS not in w.controller.gateway.addresses(), "west drops echo")
            assert not e.controller.catalog_held

    with running_echo_server() as backend:
        asyncio.run(scenario(*_exporting_echo(make_zone, backend)))


def test_the_hold_ends_when_the_catalog_has_services_again(make_zone):
    async def scenario(east: Zone, west: Zone, backend: EchoServer) -> None:
        async with _east_back_with_an_empty_catalog(east, west) as (e, w):
            assert e.controller.catalog_held
            # The catalog is refilled (by the operator, or the source recovering): the hold ends by itself.
            register_echo(east, backend)
            await eventually(lambda: not e.controller.catalog_held, "hold released")
            assert not any("empty although" in p for p in e.controller.problems())
            with EmbeddedCatalog(east.directory) as catalog:
                catalog.deregister("default", "echo")
            await eventually(lambda: EGRESS not in w.controller.gateway.addresses(), "a real removal reaches west")

    with running_echo_server() as backend:
        asyncio.run(scenario(*_exporting_echo(make_zone, backend), backend))


def test_a_zone_that_never_exported_starts_empty_without_a_hold(make_zone):
    async def scenario() -> None:
        runtime = assemble_zone(make_zone("east"), LOOPBACK)
        await runtime.controller.start()
        try:
            assert not runtime.controller.catalog_held
            assert runtime.controller.problems() == []
        finally:
            await runtime.controller.stop()

    asyncio.run(scenario())
