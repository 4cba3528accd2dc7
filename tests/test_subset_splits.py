"""Subset splits: the exporting zone divides its peers' traffic to a service among subsets by weight."""

from __future__ import annotations

import asyncio
import tomllib

import pytest
import tomli_w
from pydantic import ValidationError

from meshfed.catalog import CatalogSnapshot, EmbeddedCatalog, Endpoint, Service
from meshfed.federation.exports import ExportIndex, ExportRule, ExportRules
from meshfed.federation.gateway_config import build_gateway_config
from meshfed.gateway import Route
from meshfed.gateway.handle import validate
from meshfed.policy.splits import SubsetSplit
from meshfed.runtime import assemble_zone
from meshfed.trust.bundle import bundle_roots_pem
from meshfed.zone import Zone
from tests.conftest import ZoneFactory, eventually, gateway_identity, running_echo_server, trust_each_other
from tests.test_e2e_federation import LOOPBACK, call


def web(*versions: tuple[str, int, bool]) -> Service:
    endpoints = [
        Endpoint(address="10.0.0.1", port=port, labels={"version": version}, healthy=healthy)
        for version, port, healthy in versions
    ]
    return Service(name="web", ports={"http": 8080}, endpoints=endpoints)


def ingress_routes(make_zone: ZoneFactory, service: Service, split: SubsetSplit) -> tuple[list[Route], set[str]]:
    east, west = make_zone("east"), make_zone("west")
    trust_each_other(east, west)
    config = build_gateway_config(
        identity=gateway_identity(east),
        trust_bundles=bundle_roots_pem([stored.bundle for stored in east.trust.trusted_bundles()]),
        trust_domain=east.trust_domain,
        ingress_address="127.0.0.1:0",
        catalog=CatalogSnapshot(version=1, services=[service]),
        exports=ExportIndex([ExportRule("default", "web", "west")]),
        peer_trust_domains={"west": west.trust_domain},
        imports=[],
        egress_address=lambda name: "127.0.0.1:0",
        splits=[split],
    )
    validate(config)  # the Rust core compiles it
    (ingress,) = config.listeners
    assert ingress.mode == "terminate"
    return ingress.routes, {cluster.name for cluster in config.clusters}


def test_the_route_splits_over_one_cluster_per_healthy_subset(make_zone):
    split = SubsetSplit(service="web", label="version", weights={"v1": 90, "v2": 10, "v3": 5})
    service = web(("v1", 8001, True), ("v2", 8002, True), ("v3", 8003, False))
    (route,), clusters = ingress_routes(make_zone, service, split)
    assert route.cluster is None
    assert route.weighted_clusters is not None
    # v3 has no healthy endpoint: it drops out of the split.
    assert [(share.cluster, share.weight) for share in route.weighted_clusters] == [
        ("local:default/web@version=v1", 90),
        ("local:default/web@version=v2", 10),
    ]
    assert clusters == {"local:default/web", "local:default/web@version=v1", "local:default/web@version=v2"}


def test_a_split_with_no_weighted_subset_left_falls_back_to_the_whole_service(make_zone):
    split = SubsetSplit(service="web", label="version", weights={"v1": 0, "v2": 1})
    (route,), _ = ingress_routes(make_zone, web(("v1", 8001, True), ("v2", 8002, False)), split)
    assert route.weighted_clusters is None
    assert route.cluster == "local:default/web"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"service": "Web", "label": "version", "weights": {"v1": 1}}, "DNS label"),
        ({"service": "web", "label": "version", "weights": {"v1": 0}}, "above 0"),
        ({"service": "web", "label": "version", "weights": {"v1": -1}}, "0-10000"),
        ({"service": "web", "label": "", "weights": {"v1": 1}}, "endpoint label"),
    ],
)
def test_bad_splits_are_refused_with_what_to_fix(fields, message):
    with pytest.raises(ValidationError, match=message):
        SubsetSplit.model_validate(fields)


def test_peers_traffic_follows_the_exporters_split(make_zone):
    """east runs web v1 and v2 and sends all of west's traffic to v2 (weights 0 / 1) through its ingress."""
    east, west = make_zone("east"), make_zone("west")
    toml = east.directory / "zone.toml"
    document = tomllib.loads(toml.read_text())
    document["split"] = [{"service": "web", "label": "version", "weights": {"v1": 0, "v2": 1}}]
    toml.write_text(tomli_w.dumps(document))
    east = Zone.open(east.directory)
    with running_echo_server() as v1, running_echo_server() as v2:
        with EmbeddedCatalog(east.directory) as catalog:
            catalog.register(
                Service(
                    name="web",
                    ports={"tcp": 7},
                    endpoints=[
                        Endpoint(address="127.0.0.1", port=v1.address[1], labels={"version": "v1"}),
                        Endpoint(address="127.0.0.1", port=v2.address[1], labels={"version": "v2"}),
                    ],
                )
            )
        with ExportRules(east.directory) as rules:
            rules.add("web", "default", ["west"])

        async def scenario() -> None:
            e, w = assemble_zone(east, LOOPBACK), assemble_zone(west, LOOPBACK)
            for runtime in (e, w):
                await runtime.controller.start()
            try:
                await w.peering.establish(e.peering.issue_token("west").encoded, "east")
                egress = "egress:web.default.east:tcp"
                await eventually(lambda: egress in w.controller.gateway.addresses(), "west's egress for web")
                for i in range(6):
                    payload = f"call {i}".encode()
                    assert await call(w, egress, payload) == payload
            finally:
                for runtime in (w, e):
                    await runtime.controller.stop()

        asyncio.run(scenario())
        assert not v1.received
        assert bytes(v2.received) == b"".join(f"call {i}".encode() for i in range(6))
