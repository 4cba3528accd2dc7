"""Builds that reuse the last build's pieces (``Fragments``) give exactly what a build from nothing gives.

A zone rebuilds its whole gateway config on every change; ``Fragments`` hands back
the clusters, routes and listeners of services and imports whose inputs did not
change. These tests change one input at a time and check that the warm build equals
a cold one, and that what did not change is the very same object (which is what
lets a config's changes be found by identity).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from meshfed.catalog import CatalogSnapshot, Endpoint, Service
from meshfed.federation.authz import AuthzIndex, AuthzRule
from meshfed.federation.exchange import ExportedService, ServiceSnapshot
from meshfed.federation.exports import ExportIndex, ExportRule
from meshfed.federation.gateway_config import Fragments, build_gateway_config
from meshfed.federation.imports import ImportedService, ImportedServices, ImportOrigin, services_of
from meshfed.gateway import Cluster, GatewayConfig, HealthCheck, Identity
from meshfed.policy.egress import EgressPolicy
from meshfed.policy.splits import SubsetSplit
from meshfed.trust.spiffe import TrustDomain

PEERS = {"west": TrustDomain("west.mesh"), "north": TrustDomain("north.mesh")}
# Never compiled here: the builds are compared, not run.
IDENTITY = Identity(cert_chain_pem="chain", private_key_pem="key")


def service(name: str, *hosts: int, version: str = "v1") -> Service:
    return Service(
        name=name,
        ports={"tcp": 8080},
        endpoints=[Endpoint(address=f"127.0.1.{host}", port=8080, labels={"version": version}) for host in hosts],
    )


def imported(
    peer: str, name: str, *, gateways: tuple[str, ...] = ("127.0.0.1:15443",), port: int = 7
) -> ImportedService:
    offered = ExportedService(
        name=name, namespace="default", ports={"tcp": port}, healthy_endpoints=1, total_endpoints=1
    )
    snapshot = ServiceSnapshot(
        zone=peer, trust_domain=f"{peer}.mesh", gateway_addresses=list(gateways), version=1, services=[offered]
    )
    return ImportedService(peer=peer, origin=ImportOrigin.of(snapshot), service=offered)


BASE: dict[str, Any] = {
    "catalog": CatalogSnapshot(version=1, services=[service("web", 1, 2), service("api", 3), service("db", 4)]),
    "exports": ExportIndex([ExportRule("default", name, "*") for name in ("web", "api", "db")]),
    "imports": [imported("west", "cart"), imported("north", "cart"), imported("west", "pay")],
    "authz": AuthzIndex(),
    "health_check": None,
    "splits": (),
    "egress": EgressPolicy(),
}


def build(fragments: Fragments | None, **changes: Any) -> GatewayConfig:
    inputs = {**BASE, **changes}
    return build_gateway_config(
        identity=IDENTITY,
        trust_bundles={},
        trust_domain=TrustDomain("east.mesh"),
        ingress_address="127.0.0.1:0",
        peer_trust_domains=PEERS,
        egress_address=lambda name: "127.0.0.1:0",
        connect_address="127.0.0.1:0",
        fragments=fragments,
        **inputs,
    )


def cluster(config: GatewayConfig, name: str) -> Cluster:
    (found,) = [item for item in config.clusters if item.name == name]
    return found


def catalog_with(replaced: Service) -> CatalogSnapshot:
    services = [replaced if s.name == replaced.name else s for s in BASE["catalog"].services]
    return CatalogSnapshot(version=2, services=services)


CHANGES: dict[str, Callable[[], dict[str, Any]]] = {
    "an endpoint added": lambda: {"catalog": catalog_with(service("web", 1, 2, 5))},
    "an endpoint unhealthy": lambda: {
        "catalog": catalog_with(
            Service(
                name="web",
                ports={"tcp": 8080},
                endpoints=[
                    Endpoint(address="127.0.1.1", port=8080),
                    Endpoint(address="127.0.1.2", port=8080, healthy=False),
                ],
            )
        )
    },
    # Left out of the config (no healthy endpoint), then back: the left-out entry must not stick.
    "every endpoint unhealthy": lambda: {
        "catalog": catalog_with(
            Service(
                name="api", ports={"tcp": 8080}, endpoints=[Endpoint(address="127.0.1.3", port=8080, healthy=False)]
            )
        )
    },
    "an export narrowed to one peer": lambda: {
        "exports": ExportIndex([ExportRule("default", "web", "west"), ExportRule("default", "api", "*")])
    },
    "an authorization rule": lambda: {
        "authz": AuthzIndex(
            [AuthzRule(1, "default", "api", None, "allow", "spiffe://west.mesh/ns/shop/sa/cart", "api")]
        )
    },
    "health checks on": lambda: {"health_check": HealthCheck(interval_ms=1000)},
    "a split": lambda: {"splits": (SubsetSplit(service="web", label="version", weights={"v1": 1}),)},
    "a peer's gateway moved": lambda: {
        "imports": [
            imported("west", "cart", gateways=("127.0.0.9:15443",)),
            imported("north", "cart"),
            imported("west", "pay"),
        ]
    },
    "an imported port renumbered": lambda: {
        "imports": [imported("west", "cart", port=8), imported("north", "cart"), imported("west", "pay")]
    },
    "an import gone": lambda: {"imports": [imported("north", "cart"), imported("west", "pay")]},
    "egress workload TLS strict": lambda: {"egress": EgressPolicy(workload_tls="strict")},
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_warm_build_equals_a_cold_one(change: str) -> None:
    fragments = Fragments()
    assert build(fragments) == build(None)
    changed = CHANGES[change]()
    assert build(fragments, **changed) == build(None, **changed)
    # And back: the pieces of the changed build do not stick.
    assert build(fragments) == build(None)


def test_what_did_not_change_is_the_same_object() -> None:
    fragments = Fragments()
    before = build(fragments)
    after = build(fragments, **CHANGES["an endpoint added"]())
    assert cluster(after, "local:default/api") is cluster(before, "local:default/api")
    assert cluster(after, "egress:cart.default.west:tcp") is cluster(before, "egress:cart.default.west:tcp")
    assert cluster(after, "local:default/web") is not cluster(before, "local:default/web")
    assert [e.address for e in cluster(after, "local:default/web").endpoints] == [
        "127.0.1.1:8080",
        "127.0.1.2:8080",
        "127.0.1.5:8080",
    ]


def test_imported_services_are_reused_for_the_snapshots_and_services_a_build_shares() -> None:
    """A delta keeps the unchanged summaries: the next build's imports of them are the very same objects,
    in the same order by name as a build from nothing gives; another origin makes new ones."""

    def snapshot(version: int, services: list[ExportedService], gateways: tuple[str, ...]) -> ServiceSnapshot:
        return ServiceSnapshot(
            zone="west",
            trust_domain="west.mesh",
            gateway_addresses=list(gateways),
            version=version,
            services=services,
        )

    def offered(name: str, endpoints: int = 1) -> ExportedService:
        return ExportedService(
            name=name, namespace="default", ports={"tcp": 7}, healthy_endpoints=endpoints, total_endpoints=endpoints
        )

    memory = ImportedServices()
    first_services = [offered("a"), offered("b"), offered("c")]
    first = {"west": snapshot(1, first_services, ("127.0.0.1:1",)), "east": snapshot(1, [offered("b")], ("x:1",))}
    before = memory.of(first)
    assert memory.of(first) is before
    assert before == services_of(first)
    assert [item.name for item in before] == ["a.default.west", "b.default.east", "b.default.west", "c.default.west"]

    changed = {**first, "west": snapshot(2, [first_services[0], offered("b", 2), first_services[2]], ("127.0.0.1:1",))}
    after = memory.of(changed)
    assert after == services_of(changed)
    by_name = {item.name: item for item in before}
    assert [item is by_name[item.name] for item in after] == [True, True, False, True]

    moved = {**changed, "west": snapshot(3, changed["west"].services, ("127.0.0.9:1",))}
    assert memory.of(moved) == services_of(moved)
    assert all(item.origin.gateway_addresses == ("127.0.0.9:1",) for item in memory.of(moved) if item.peer == "west")
