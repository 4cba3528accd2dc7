"""Failover groups: which services form one, in what order, and what the data plane gets (compiled by the core)."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from meshfed._core import validate_config
from meshfed.catalog import CatalogSnapshot, Endpoint, Service
from meshfed.federation.exchange import ExportedService, ServiceSnapshot
from meshfed.federation.exports import ExportIndex
from meshfed.federation.failover import failover_groups
from meshfed.federation.gateway_config import build_gateway_config
from meshfed.federation.imports import ImportedService, ImportOrigin
from meshfed.gateway import Cluster, OriginateListener
from meshfed.policy.failover import FailoverPolicy
from meshfed.trust.bundle import bundle_roots_pem
from meshfed.trust.spiffe import TrustDomain
from meshfed.zone import Zone
from tests.conftest import ZoneFactory, gateway_identity, trust_each_other

NORTH_FIRST = FailoverPolicy(order=["north"])
GATEWAYS = {"east": "10.0.1.1:15443", "north": "10.0.2.1:15443", "south": "10.0.3.1:15443"}


def imported(peer: str, *, healthy: int = 1, ports: dict[str, int] | None = None, name: str = "web") -> ImportedService:
    service = ExportedService(
        name=name,
        namespace="default",
        ports=ports if ports is not None else {"http": 8080},
        healthy_endpoints=healthy,
        total_endpoints=max(healthy, 1),
    )
    snapshot = ServiceSnapshot(
        zone=peer, trust_domain=f"{peer}.mesh", gateway_addresses=[GATEWAYS[peer]], version=1, services=[service]
    )
    return ImportedService(peer, ImportOrigin.of(snapshot), service)


def local_web(*endpoints: Endpoint) -> CatalogSnapshot:
    return CatalogSnapshot(version=1, services=[Service(name="web", ports={"http": 8080}, endpoints=list(endpoints))])


def test_a_group_needs_two_sources_and_orders_peers_as_configured():
    empty = CatalogSnapshot(version=1, services=[])
    assert failover_groups(empty, [imported("east")]) == []  # one source: the per-peer import is enough
    assert failover_groups(empty, [imported("east"), imported("north", name="api")]) == []

    imports = [imported("south"), imported("east"), imported("north")]
    (group,) = failover_groups(empty, imports, FailoverPolicy(order=["north"]))
    assert group.name == "web.default"
    assert group.sources == ["north", "east", "south"]  # listed first, the rest by name
    assert group.listener_name("http") == "failover:web.default:http"

    (group,) = failover_groups(local_web(Endpoint(address="10.9.0.1", port=8080)), [imported("east")])
    assert group.sources == ["local", "east"]


@pytest.fixture
def west(make_zone: ZoneFactory) -> Zone:
    west = make_zone("west")
    trust_each_other(west, make_zone("east"), make_zone("north"))
    return west


def _config(
    west: Zone,
    catalog: CatalogSnapshot,
    imports: list[ImportedService],
    policy: FailoverPolicy = NORTH_FIRST,
) -> dict[str, Cluster]:
    config = build_gateway_config(
        identity=gateway_identity(west),
        trust_bundles=bundle_roots_pem([stored.bundle for stored in west.trust.trusted_bundles()]),
        trust_domain=west.trust_domain,
        ingress_address="127.0.0.1:0",
        catalog=catalog,
        exports=ExportIndex([]),
        peer_trust_domains={},
        imports=imports,
        egress_address=lambda name: "127.0.0.1:0",
        failover=policy,
    )
    validate_config(config.to_json())  # the Rust core accepts what Python builds
    listeners = {listener.name: listener for listener in config.listeners}
    group = listeners["failover:web.default:http"]
    assert isinstance(group, OriginateListener)
    return {cluster.name: cluster for cluster in config.clusters if cluster.name == group.cluster}


def test_group_cluster_puts_local_first_then_peers_with_their_own_tls(west):
    catalog = local_web(Endpoint(address="10.9.0.1", port=8080), Endpoint(address="10.9.0.2", port=8080, healthy=False))
    (cluster,) = _config(west, catalog, [imported("east"), imported("north")]).values()
    by_address = {endpoint.address: endpoint for endpoint in cluster.endpoints}
    # The catalog's unhealthy local endpoint is left out; north comes before east as configured.
    assert list(by_address) == ["10.9.0.1:8080", GATEWAYS["north"], GATEWAYS["east"]]
    assert [endpoint.priority for endpoint in cluster.endpoints] == [0, 1, 2]
    assert by_address["10.9.0.1:8080"].tls is None
    north_tls = by_address[GATEWAYS["north"]].tls
    assert north_tls is not None
    assert north_tls.peer_spiffe_id == str(TrustDomain("north.mesh").gateway_id)
    assert north_tls.sni.endswith(".north.mesh")
    assert cluster.health_check is None  # as given: the controller passes the zone's setting


def test_sources_without_healthy_endpoints_leave_the_group_unless_none_is_healthy(west):
    (cluster,) = _config(
        west, CatalogSnapshot(version=1, services=[]), [imported("east"), imported("north", healthy=0)]
    ).values()
    assert [endpoint.address for endpoint in cluster.endpoints] == [GATEWAYS["east"]]

    # Nothing healthy anywhere: keep every source rather than black-hole the traffic.
    (cluster,) = _config(
        west, CatalogSnapshot(version=1, services=[]), [imported("east", healthy=0), imported("north", healthy=0)]
    ).values()
    assert [endpoint.address for endpoint in cluster.endpoints] == [GATEWAYS["north"], GATEWAYS["east"]]


def test_a_split_tier_shares_traffic_by_weight_across_its_peers(west):
    """``[failover] split = {east = 9, north = 1}``: one tier, 90/10, spread over each peer's gateways."""
    east = imported("east")
    two_gateways = dataclasses.replace(east.origin, gateway_addresses=(GATEWAYS["east"], "10.0.1.2:15443"))
    east = ImportedService("east", two_gateways, east.service)
    policy = FailoverPolicy(split={"east": 9, "north": 1})
    (cluster,) = _config(west, CatalogSnapshot(version=1, services=[]), [east, imported("north")], policy).values()
    assert cluster.lb == "weighted_round_robin"
    shares = {endpoint.address: (endpoint.priority, endpoint.weight) for endpoint in cluster.endpoints}
    # east's 9 over two gateways, north's 1 over one: the tier keeps the 9:1 ratio.
    assert shares == {GATEWAYS["east"]: (1, 9), "10.0.1.2:15443": (1, 9), GATEWAYS["north"]: (1, 2)}

    (group,) = failover_groups(CatalogSnapshot(version=1, services=[]), [east, imported("north")], policy)
    assert group.describe() == "east 9 / north 1"


def test_failover_policy_refuses_bad_peers_and_weights():
    for bad in ({"order": ["East"]}, {"order": ["a", "a"]}, {"split": {"east": 0}}, {"split": {"no_pe": 1}}):
        with pytest.raises(ValidationError, match="failover"):
            FailoverPolicy.model_validate(bad)
