"""Ending trust: ``meshfed trust remove``, ``DELETE /v1/trust/bundles/{td}`` and ``DELETE /v1/trust/federations/{td}``.

Trusted bundles reach the gateway through one path: every reconfigure builds
``trust_bundles`` from the zone's stored bundles. The API reconfigures at
once; a change by the CLI (another process) is noticed by the rotation
service's check, which compares every bundle's revision.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import orjson
from fastapi.testclient import TestClient

from meshfed.controller import ControllerSettings
from meshfed.federation.peering_state import Peering, PeerState
from meshfed.federation.peering_store import PeeringStore
from meshfed.federation.settings import PeeringSettings
from meshfed.federation.trust_removal import remove_trust
from meshfed.gateway import GatewayConfig
from meshfed.gateway.handle import Compiled
from meshfed.runtime import ZoneSettings, assemble_zone
from meshfed.trust.bundle import parse_bundle
from meshfed.trust.endpoint import endpoint_spiffe_id
from meshfed.zone import Zone
from meshfed.zone.rotation import RotationService
from tests.test_trust_cli import _one_line_error, meshfed_cli

LOOPBACK = ZoneSettings(
    controller=ControllerSettings(gateway_address="127.0.0.1:0", egress_port_base=0, health_check=None),
    peering=PeeringSettings(listen_address="127.0.0.1:0", establish_address="127.0.0.1:0", advertise_host="127.0.0.1"),
)


def _import(importer: Zone, exporter: Zone) -> None:
    importer.trust.import_bundle(parse_bundle(exporter.trust_domain, exporter.trust.own_bundle().to_spiffe_json()))


def _federate(importer: Zone, exporter: Zone) -> None:
    importer.trust.federate(
        exporter.trust_domain,
        "https://127.0.0.1:9/",
        "https_spiffe",
        endpoint_spiffe_id=endpoint_spiffe_id(exporter.trust_domain),
        bootstrap_bundle=parse_bundle(exporter.trust_domain, exporter.trust.own_bundle().to_spiffe_json()),
    )


def _trusted(zone: Zone) -> set[str]:
    return {stored.bundle.trust_domain.name for stored in zone.trust.trusted_bundles()}


def test_trust_remove_drops_an_imported_and_a_federated_domain(make_zone):
    east, west, north = make_zone("east"), make_zone("west"), make_zone("north")
    _import(east, west)
    _federate(east, north)
    assert _trusted(east) == {"east.mesh", "west.mesh", "north.mesh"}

    imported = meshfed_cli("trust", "remove", "--dir", east.directory, "--trust-domain", "west.mesh")
    assert imported.returncode == 0, imported.stderr.decode()
    assert imported.stdout.decode().strip() == "no longer trusting west.mesh: removed its bundle"
    federated = meshfed_cli("trust", "remove", "--dir", east.directory, "--trust-domain", "north.mesh", "-o", "json")
    assert federated.returncode == 0, federated.stderr.decode()
    assert orjson.loads(federated.stdout) == {
        "trust_domain": "north.mesh",
        "bundle_removed": True,
        "federation_removed": True,
    }
    assert _trusted(east) == {"east.mesh"}
    assert east.trust.federations() == []


def test_trust_remove_refuses_the_own_domain_a_peers_domain_and_an_unknown_one(make_zone):
    east, west = make_zone("east"), make_zone("west")
    own = _one_line_error(meshfed_cli("trust", "remove", "--dir", east.directory, "--trust-domain", "east.mesh"))
    assert "east.mesh is this zone's own trust domain" in own
    assert "meshfed trust rotate" in own

    # A peering that has not been deleted depends on its domain's bundle, whoever brought it.
    _import(east, west)
    _add_peering(east, "west", "west.mesh", PeerState.ACTIVE)
    peer = _one_line_error(meshfed_cli("trust", "remove", "--dir", east.directory, "--trust-domain", "west.mesh"))
    assert "west.mesh is the trust domain of peering 'west' (ACTIVE)" in peer
    assert "meshfed peer delete west" in peer
    assert "west.mesh" in _trusted(east)

    unknown = _one_line_error(meshfed_cli("trust", "remove", "--dir", east.directory, "--trust-domain", "south.mesh"))
    assert "trusts no trust domain south.mesh" in unknown
    assert _trusted(east) == {"east.mesh", "west.mesh"}


def _add_peering(zone: Zone, name: str, trust_domain: str, state: PeerState) -> None:
    """A peering row as establishment leaves it, written with the peering store's own API."""
    now = dt.datetime.now(dt.UTC)
    with PeeringStore.of(zone) as store:
        store.put(Peering(name, "acceptor", state, now, now, peer_zone=name, peer_trust_domain=trust_domain))


def test_a_deleted_peering_no_longer_holds_its_domain(make_zone):
    east, west = make_zone("east"), make_zone("west")
    _import(east, west)
    _add_peering(east, "west", "west.mesh", PeerState.TERMINATED)
    assert remove_trust(east, west.trust_domain).bundle


def test_a_cli_removal_reaches_a_running_zone_through_the_rotation_services_check(make_zone):
    east, west = make_zone("east"), make_zone("west")
    _import(east, west)

    async def scenario() -> int:
        calls = 0

        async def trust_changed() -> None:
            nonlocal calls
            calls += 1

        service = RotationService(east, trust_changed)
        await service.start()
        try:
            assert not await service.check()
            result = await asyncio.to_thread(
                meshfed_cli, "trust", "remove", "--dir", east.directory, "--trust-domain", "west.mesh"
            )
            assert result.returncode == 0, result.stderr.decode()
            # One pass of the check the service runs every DEFAULT_CHECK_INTERVAL: it sees the bundle gone.
            assert await service.check()
            return calls
        finally:
            await service.stop()

    assert asyncio.run(scenario()) == 1


def _applied(client: TestClient) -> list[GatewayConfig]:
    """Record every config the running zone's gateway applies from now on."""
    controller: Any = client.app.state.controller  # type: ignore[attr-defined]
    gateway = controller.gateway
    applied: list[GatewayConfig] = []
    apply = gateway.apply

    def recording(config: GatewayConfig | bytes | Compiled) -> None:
        # A change of trust bundles is applied whole (a patch cannot carry it), as the config compiled.
        assert isinstance(config, Compiled)
        assert config.config is not None
        applied.append(config.config)
        apply(config)

    gateway.apply = recording
    return applied


def test_the_api_removes_a_bundle_and_a_federation_and_the_running_gateway_stops_trusting_them(make_zone):
    east, west, north = make_zone("east"), make_zone("west"), make_zone("north")
    _import(east, west)
    _federate(east, north)
    admin = {"Authorization": f"Bearer {east.admin_token()}"}
    with TestClient(assemble_zone(east, LOOPBACK).app()) as client:
        applied = _applied(client)
        removed = client.delete("/v1/trust/bundles/west.mesh", headers=admin)
        assert removed.status_code == 200, removed.text
        assert removed.json() == {"trust_domain": "west.mesh", "bundle_removed": True, "federation_removed": False}
        assert set(applied[-1].trust_bundles) == {"east.mesh", "north.mesh"}

        ended = client.delete("/v1/trust/federations/north.mesh", headers=admin)
        assert ended.status_code == 200, ended.text
        assert ended.json() == {"trust_domain": "north.mesh", "bundle_removed": True, "federation_removed": True}
        assert set(applied[-1].trust_bundles) == {"east.mesh"}
        assert east.trust.federations() == []

        again = client.delete("/v1/trust/federations/north.mesh", headers=admin)
        assert again.status_code == 400
        assert "federates with no trust domain north.mesh" in again.json()["detail"]
        own = client.delete("/v1/trust/bundles/east.mesh", headers=admin)
        assert own.status_code == 400
        assert "own trust domain" in own.json()["detail"]
        assert client.delete("/v1/trust/bundles/west.mesh").status_code == 401


def test_ending_a_federation_keeps_an_imported_bundle(make_zone):
    east, west = make_zone("east"), make_zone("west")
    _federate(east, west)
    _import(east, west)  # the operator's import replaces the federated bundle; the relationship stays
    removed = east.trust.remove_trust(west.trust_domain, federation_only=True)
    assert (removed.bundle, removed.federation) == (False, True)
    assert "west.mesh" in _trusted(east)


def test_a_fetch_that_lands_after_the_removal_does_not_bring_the_domain_back(make_zone):
    east, west = make_zone("east"), make_zone("west")
    _federate(east, west)
    fetched = west.trust.own_bundle()
    east.trust.remove_trust(west.trust_domain)
    assert not east.trust.store_federated_bundle(fetched)
    assert "west.mesh" not in _trusted(east)


def test_removing_an_import_leaves_the_zone_restartable(make_zone):
    east, west = make_zone("east"), make_zone("west")
    _import(east, west)
    east.trust.remove_trust(west.trust_domain)
    reopened = Zone.open(east.directory)
    assert _trusted(reopened) == {"east.mesh"}
    assert reopened.trust.own_bundle().sequence == 1
