"""What the CLI and the API show of a running zone is what the zone knows, not what its files suggest.

Real controllers (Rust gateway on loopback, real health checks), the real CLI
in process reading the zone directory, and the real API over ASGI: the
exporting zone's health column, the local address of each import and failover
group, and the zone not running said as such.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from meshfed.api import create_app
from meshfed.catalog import EmbeddedCatalog, Endpoint, Service
from meshfed.cli import app as cli
from meshfed.controller import Controller, ControllerSettings, health_check_every
from meshfed.federation.exchange import ExportedService, ServiceSnapshot
from meshfed.federation.exports import ExportRules
from meshfed.runstate import RunState
from meshfed.zone import Zone
from tests.conftest import EchoServer, dead_endpoint, eventually, trust_each_other

ADVERTISED = "10.20.30.40"  # the egress advertise host: what local clients are told, not what is bound


def catalog_list(zone: Zone) -> tuple[str, str]:
    result = CliRunner().invoke(cli, ["catalog", "list", "--dir", str(zone.directory)])
    assert result.exit_code == 0, result.output
    return result.stdout, result.stderr


def row(table: str, name: str) -> str:
    """The line of the row naming ``name``, tabs around each cell: piped, the table is tab-separated lines."""
    (line,) = [line for line in table.splitlines() if line.split("\t")[0] == name]
    return f"\t{line}\t"


async def api_get(controller: Controller, path: str) -> Any:
    transport = httpx.ASGITransport(app=create_app(controller))
    async with httpx.AsyncClient(transport=transport, base_url="http://zone") as client:
        response = await client.get(path, headers={"Authorization": f"Bearer {controller.zone.read_token()}"})
    assert response.status_code == 200, response.text
    return response.json()


def _register(zone: Zone, name: str, *endpoints: str) -> None:
    with EmbeddedCatalog(zone.directory) as catalog:
        catalog.register(
            Service(
                name=name,
                ports={"tcp": 7},
                endpoints=[
                    Endpoint(address=address.rpartition(":")[0], port=int(address.rpartition(":")[2]), zone=zone.name)
                    for address in endpoints
                ],
            )
        )


def test_the_exporting_zone_shows_what_its_health_checks_found(
    make_zone, echo_server: EchoServer, caplog: pytest.LogCaptureFixture
) -> None:
    east, west = make_zone("east"), make_zone("west")
    trust_each_other(east, west)
    dead = dead_endpoint()
    _register(east, "web", echo_server.endpoint, dead)
    with ExportRules(east.directory) as rules:
        rules.add("web", "default", ["west"])

    async def scenario() -> None:
        controller = Controller(
            east,
            ControllerSettings(
                gateway_address="127.0.0.1:0",
                egress_port_base=0,
                health_check=health_check_every(dt.timedelta(milliseconds=50)),
            ),
            peer_trust_domains=lambda: {"west": west.trust_domain},
        )
        async with controller:
            await eventually(lambda: bool(controller.unhealthy_endpoints), "the dead endpoint found failing")
            assert controller.unhealthy_endpoints == {("default", "web", dead)}
            # What the peer is told, the API and the CLI all say 1 of 2.
            assert controller.exported_snapshot("west").services[0].healthy_endpoints == 1
            table, _ = await asyncio.to_thread(catalog_list, east)
            web = row(table, "web.default")
            assert "\t1/2\t" in web
            assert f"{dead} (failing health checks)" in web
            assert f"{echo_server.endpoint} (failing" not in web
            view = await api_get(controller, "/v1/catalog")
            (service,) = view["services"]
            assert {e["port"]: e["healthy"] for e in service["endpoints"]} == {
                int(echo_server.endpoint.rpartition(":")[2]): True,
                int(dead.rpartition(":")[2]): False,
            }
            assert view["failing_health_checks"] == [{"service": "web", "namespace": "default", "endpoint": dead}]

        # Stopped: no gateway checks anything, and the CLI says so instead of showing a stale verdict.
        table, notes = await asyncio.to_thread(catalog_list, east)
        assert "\t2/2\t" in row(table, "web.default")
        assert "zone east is not running" in notes

    with caplog.at_level(logging.WARNING, logger="meshfed.controller"):
        asyncio.run(scenario())
    (warning,) = [r for r in caplog.records if "failing the gateway's health checks" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert f"endpoint {dead} of web.default" in warning.getMessage()
    assert "listening" in warning.getMessage()


def _west_exports(*names: str) -> ServiceSnapshot:
    return ServiceSnapshot(
        zone="west",
        trust_domain="west.mesh",
        gateway_addresses=["127.0.0.1:9"],
        version=1,
        services=[
            ExportedService(name=name, namespace="default", ports={"tcp": 7}, healthy_endpoints=1, total_endpoints=1)
            for name in names
        ],
    )


def test_imports_and_failover_groups_show_where_local_clients_connect(make_zone, echo_server: EchoServer) -> None:
    east, west = make_zone("east"), make_zone("west")
    trust_each_other(east, west)
    _register(east, "db", echo_server.endpoint)  # east runs db too: db is also a failover group

    async def scenario() -> None:
        controller = Controller(
            east,
            ControllerSettings(
                gateway_address="127.0.0.1:0",
                egress_port_base=0,  # ephemeral ports: only the running zone knows them
                egress_advertise_host=ADVERTISED,
                health_check=None,
            ),
            peer_trust_domains=lambda: {"west": west.trust_domain},
        )
        async with controller:
            await controller.import_snapshot("west", _west_exports("db", "cache"))
            ports = {name: port for name, (_, port) in controller.gateway.addresses().items()}
            cache = f"tcp={ADVERTISED}:{ports['egress:cache.default.west:tcp']}"
            await eventually(lambda: cache in catalog_list(east)[0], "the listeners recorded for the CLI")
            table, _ = await asyncio.to_thread(catalog_list, east)
            assert f"tcp={ADVERTISED}:{ports['egress:cache.default.west:tcp']}" in row(table, "cache.default.west")
            assert f"tcp={ADVERTISED}:{ports['egress:db.default.west:tcp']}" in row(table, "db.default.west")
            group = row(table, "db.default (failover group)")
            assert f"tcp={ADVERTISED}:{ports['failover:db.default:tcp']}" in group
            view = await api_get(controller, "/v1/catalog")
            assert {item["name"]: item["local_addresses"] for item in view["imports"]} == {
                "cache.default.west": {"tcp": f"{ADVERTISED}:{ports['egress:cache.default.west:tcp']}"},
                "db.default.west": {"tcp": f"{ADVERTISED}:{ports['egress:db.default.west:tcp']}"},
            }
            # A new import's listener is recorded once it is applied.
            await controller.import_snapshot(
                "west", _west_exports("db", "cache", "queue").model_copy(update={"version": 2})
            )
            port = controller.gateway.address("egress:queue.default.west:tcp")[1]

            def recorded() -> bool:
                return f"tcp={ADVERTISED}:{port}" in row(catalog_list(east)[0], "queue.default.west")

            await eventually(recorded, "the new listener recorded for the CLI")

        table, notes = await asyncio.to_thread(catalog_list, east)
        assert "unknown (zone not running)" in row(table, "cache.default.west")
        assert "unknown (zone not running)" in row(table, "db.default (failover group)")
        assert not re.search(rf"{ADVERTISED}:\d+", table)
        assert "local addresses are unknown" in notes

    asyncio.run(scenario())


def test_a_crashed_zone_is_not_running_once_its_lease_lapses(make_zone) -> None:
    east = make_zone("east")
    with RunState(east.directory) as runstate:
        started = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
        runstate.take_lease(started)
        runstate.record_listeners({"egress:db.default.west:tcp": ("127.0.0.1", 15500)})
        assert runstate.running(started + dt.timedelta(seconds=4))
        # Nobody renewed it (the process died without releasing): the CLI stops believing the addresses.
        assert not runstate.running(started + dt.timedelta(seconds=6))
        assert not runstate.running()
