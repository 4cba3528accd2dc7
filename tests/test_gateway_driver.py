"""``GET /v1/gateway/config`` is the config the gateway runs: the last one the gateway driver applied.

A real controller (Rust gateway on loopback) whose gateway records every config
it is given; the API is called in-process. Reading the config builds nothing and
writes nothing: an import stored since the last apply is neither in the answer
nor given an egress port until the controller applies it.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from meshfed.api import create_app
from meshfed.catalog import EmbeddedCatalog, Endpoint, Service
from meshfed.controller import Controller, ControllerSettings, gateway_driver
from meshfed.errors import GatewayConfigError
from meshfed.federation.exchange import ExportedService, ServiceSnapshot
from meshfed.federation.imports import ImportStore, egress_listener_name
from meshfed.gateway import Gateway, GatewayConfig, GatewayPatch
from meshfed.gateway.handle import Compiled
from meshfed.zone import STATE_FILE
from tests.conftest import free_port, trust_each_other

# Written on a clock by the running zone (its lease, import publication status), whatever the API is asked.
_TIMED_TABLES = ("controller_lease", "import_publication")


class RecordingGateway(Gateway):
    """The real gateway, keeping every config it was given.

    It refuses patches, as the core refuses one it cannot apply: the driver then applies the whole
    config, so every change reaches it (and this record) whole.
    """

    given: ClassVar[list[GatewayConfig]] = []

    def __init__(self, config: GatewayConfig | bytes | Compiled) -> None:
        assert isinstance(config, Compiled)  # the driver starts with what its build compiled
        assert config.config is not None
        started = config.config
        super().__init__(config)
        self.given.append(started)

    def apply_patch(self, patch: GatewayPatch | bytes) -> None:
        raise GatewayConfigError("gateway config rejected: this recording gateway takes whole configs only")

    def apply(self, config: GatewayConfig | bytes | Compiled) -> None:
        assert isinstance(config, Compiled)
        assert config.config is not None
        super().apply(config)
        self.given.append(config.config)


def peer_exports(peer: str, version: int, *services: str) -> ServiceSnapshot:
    return ServiceSnapshot(
        zone=peer,
        trust_domain=f"{peer}.mesh",
        gateway_addresses=["127.0.0.1:9"],
        version=version,
        services=[
            ExportedService(name=name, namespace="default", ports={"tcp": 7}, healthy_endpoints=1, total_endpoints=1)
            for name in services
        ],
    )


def free_port_pair() -> int:
    """A loopback port nothing listens on now, nor on the port after it (egress ports go up from a base)."""
    while True:
        base = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base


def state_db(directory: Path) -> list[str]:
    """Every row of the zone's state.db, as SQL, but those of the tables the zone writes on a clock."""
    with sqlite3.connect(directory / STATE_FILE) as db:
        return [line for line in db.iterdump() if not any(f'"{table}"' in line for table in _TIMED_TABLES)]


def redacted(config: GatewayConfig) -> dict[str, Any]:
    document = config.model_dump(mode="json", exclude_none=True)
    document["identity"]["private_key_pem"] = "<redacted>"
    return document


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> list[GatewayConfig]:
    given: list[GatewayConfig] = []
    monkeypatch.setattr(RecordingGateway, "given", given)
    monkeypatch.setattr(gateway_driver, "Gateway", RecordingGateway)
    return given


def test_the_route_answers_what_the_gateway_was_given_and_writes_nothing(
    make_zone, recording: list[GatewayConfig]
) -> None:
    east, west = make_zone("east"), make_zone("west")
    trust_each_other(east, west)
    with EmbeddedCatalog(east.directory) as catalog:
        catalog.register(
            Service(name="web", ports={"http": 8080}, endpoints=[Endpoint(address="127.0.0.1", port=8001, zone="east")])
        )
    controller = Controller(
        east,
        ControllerSettings(gateway_address="127.0.0.1:0", egress_port_base=free_port_pair(), health_check=None),
        peer_trust_domains=lambda: {"west": west.trust_domain},
    )
    admin = {"Authorization": f"Bearer {east.admin_token()}"}

    async def scenario() -> None:
        # No lifespan: the API does not start the controller, and the test does.
        transport = httpx.ASGITransport(app=create_app(controller))
        async with httpx.AsyncClient(transport=transport, base_url="http://east") as api:
            response = await api.get("/v1/gateway/config", headers=admin)
            assert response.status_code == 503
            assert "east: the gateway has not been configured yet" in response.json()["detail"]
            assert recording == []

            async with controller:
                await controller.import_snapshot("west", peer_exports("west", 1, "db"))
                served = recording[-1]
                assert controller.applied_gateway_config is served
                response = await api.get("/v1/gateway/config", headers=admin)
                assert response.status_code == 200
                assert response.json() == redacted(served)

                # Stored, not applied: the gateway does not serve it, so neither does the route, and asking
                # gives no egress port out (a fresh build would, and keep it in state.db).
                with ImportStore(east.directory) as imports:
                    assert await asyncio.to_thread(imports.put, "west", peer_exports("west", 2, "db", "cache"))
                    (cache,) = [item for item in imports.services() if item.service.name == "cache"]
                before = await asyncio.to_thread(state_db, east.directory)
                assert not any(egress_listener_name(cache, "tcp") in line for line in before)
                for _ in range(3):
                    response = await api.get("/v1/gateway/config", headers=admin)
                    assert response.json() == redacted(served)
                assert await asyncio.to_thread(state_db, east.directory) == before
                assert recording[-1] is served

                await controller.reconfigure()
                applied = recording[-1]
                assert applied is not served
                assert egress_listener_name(cache, "tcp") in {listener.name for listener in applied.listeners}
                response = await api.get("/v1/gateway/config", headers=admin)
                assert response.json() == redacted(applied)

    asyncio.run(scenario())
