"""A catalog that refuses the zone's imports never stops the zone: publication is retried on its own.

The refusing catalog here is a fault-injection double of an external server
(Consul with a token lacking write rights, an API server refusing a mirror):
the zone's own embedded catalog for reads, and ``publish_imports`` failing
until it is told to heal. The same failure against the real Consul is in
``tests/test_mixed_federation.py``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket

import pytest
from fastapi.testclient import TestClient

from meshfed.api import create_app
from meshfed.catalog import EmbeddedCatalog, EmbeddedCatalogSource, Endpoint, LocalImport, Service
from meshfed.catalog.publisher import PublicationStore
from meshfed.controller import Controller, ControllerSettings
from meshfed.errors import CatalogError
from meshfed.federation.exports import ExportRules
from meshfed.zone import STATE_FILE, Zone
from tests.conftest import EchoServer, eventually, round_trip, trust_each_other
from tests.test_cli import meshfed_cli


class RefusingCatalog(EmbeddedCatalogSource):
    """The embedded catalog, whose server-side publication refuses until :attr:`healed`."""

    def __init__(self, zone: Zone) -> None:
        super().__init__(zone.directory)
        self.healed = False
        self.attempts = 0
        self.published: list[list[LocalImport]] = []

    async def publish_imports(self, imports: list[LocalImport]) -> None:
        self.attempts += 1
        if not self.healed:
            raise CatalogError("cannot register imports: Consul at http://127.0.0.1:8500 denied access (403)")
        self.published.append(imports)


def _register(zone: Zone, name: str, backend: EchoServer) -> None:
    with EmbeddedCatalog(zone.directory) as catalog:
        catalog.register(
            Service(name=name, ports={"tcp": 7}, endpoints=[Endpoint(address="127.0.0.1", port=backend.address[1])])
        )


def test_a_refused_publication_neither_blocks_imports_nor_this_zones_own_exports(make_zone, echo_server, caplog):
    east, west = make_zone("east"), make_zone("west")
    trust_each_other(east, west)
    _register(east, "web", echo_server)
    _register(west, "cart", echo_server)
    with ExportRules(east.directory) as rules:
        rules.add("web", "default", ["west"])
    refusing = RefusingCatalog(west)
    caplog.set_level(logging.WARNING, logger="meshfed.catalog.publisher")

    async def scenario() -> None:
        east_ctl = Controller(
            east,
            ControllerSettings(gateway_address="127.0.0.1:0", egress_port_base=0),
            peer_trust_domains=lambda: {"west": west.trust_domain},
        )
        west_ctl = Controller(
            west,
            ControllerSettings(
                gateway_address="127.0.0.1:0", egress_port_base=0, publication_resync=dt.timedelta(hours=1)
            ),
            peer_trust_domains=lambda: {"east": east.trust_domain},
            catalog=refusing,
        )
        async with east_ctl, west_ctl:
            west_notified: list[int] = []
            west_ctl.on_exports_changed(lambda: west_notified.append(1))
            # The import is applied and served although the catalog refuses to publish it.
            await west_ctl.import_snapshot("east", east_ctl.exported_snapshot("west"))
            address = west_ctl.gateway.address("egress:web.default.east:tcp")

            def call() -> bytes:
                with socket.create_connection(address, timeout=5) as sock:
                    return round_trip(sock, b"ping")

            assert await asyncio.to_thread(call) == b"ping"
            await eventually(lambda: refusing.attempts >= 3, "publication retried on its own")
            assert not west_ctl.publication.ok
            assert "denied access" in (west_ctl.publication.last_error or "")

            # West's own export change still reaches its peers: the catalog watch is not stuck on publication.
            with ExportRules(west.directory) as rules:
                rules.add("cart", "default", ["east"])
            await eventually(lambda: bool(west_notified), "west's export change applied")
            assert [service.name for service in west_ctl.exported_snapshot("east").services] == ["cart"]

            # Visible where an operator looks: /readyz, /v1/catalog, and state.db for the CLI.
            api = TestClient(create_app(west_ctl))
            ready = api.get("/readyz")
            assert ready.status_code == 200
            assert ready.json()["status"] == "degraded"
            assert any("import publication" in problem for problem in ready.json()["problems"])
            reader = {"Authorization": f"Bearer {west.read_token()}"}
            publication = api.get("/v1/catalog", headers=reader).json()["publication"]
            assert publication["ok"] is False
            assert "denied access" in publication["error"]
            with PublicationStore(west.directory / STATE_FILE) as store:
                stored = store.get()
            assert stored is not None
            assert not stored.ok

            # Healed: the next retry publishes the current imports, and the status clears.
            refusing.healed = True
            await eventually(lambda: west_ctl.publication.ok, "publication healed", timeout=15)
            assert [item.name for item in refusing.published[-1]] == ["web.default.east"]
            ready = api.get("/readyz").json()
            assert (ready["status"], ready["problems"]) == ("ready", [])
            assert all(component["ready"] for component in ready["components"])

    asyncio.run(scenario())
    refusals = [record for record in caplog.records if "are not published" in record.getMessage()]
    assert len(refusals) == 1, "one warning per distinct failure, not one per retry"
    assert refusals[0].levelno == logging.WARNING


def test_publication_resyncs_what_was_removed_out_of_band(make_zone):
    zone = make_zone("west")
    source = RefusingCatalog(zone)
    source.healed = True

    async def scenario() -> None:
        controller = Controller(
            zone,
            ControllerSettings(
                gateway_address="127.0.0.1:0", egress_port_base=0, publication_resync=dt.timedelta(milliseconds=50)
            ),
            catalog=source,
        )
        async with controller:
            # Nothing changes in the zone, yet the catalog is told again every resync interval.
            await eventually(lambda: len(source.published) >= 3, "periodic republication")

    asyncio.run(scenario())


@pytest.mark.parametrize("verb", ["register", "deregister"])
def test_service_register_on_a_non_embedded_zone_is_refused(tmp_path, verb):
    zone_dir = tmp_path / "east"
    Zone.init(zone_dir, "east", "east.mesh")
    config = zone_dir / "zone.toml"
    config.write_text(
        config.read_text().replace('catalog = "embedded"', 'catalog = "consul"')
        + '\n[consul]\naddress = "http://127.0.0.1:1"\n'
    )
    args = ["service", verb, "--dir", zone_dir, "--name", "web"]
    if verb == "register":
        args += ["--port", "http=80", "--endpoint", "10.0.0.5:80"]
    result = meshfed_cli(*args)
    assert result.returncode == 1
    assert result.stderr.decode().startswith("meshfed: error: zone east reads its services from its consul catalog")
    assert result.stderr.count(b"\n") == 1


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::1"])
def test_up_refuses_a_loopback_egress_address_for_a_kubernetes_zone(tmp_path, host):
    zone_dir = tmp_path / "east"
    Zone.init(zone_dir, "east", "east.mesh")
    config = zone_dir / "zone.toml"
    config.write_text(config.read_text().replace('catalog = "embedded"', 'catalog = "kubernetes"'))
    result = meshfed_cli("up", "--dir", zone_dir, "--egress-host", host, "--api-address", "127.0.0.1:1")
    assert result.returncode == 1
    message = result.stderr.decode()
    assert message.startswith(f"meshfed: error: zone east mirrors imports as EndpointSlices at {host}")
    assert "--egress-advertise-host" in message
    assert message.count("\n") == 1
