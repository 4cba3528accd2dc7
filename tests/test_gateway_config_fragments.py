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
from hypothesis import given, settings
from hypothesis import strategies as st

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


# Changes for the in-place path: a service of a peer (its ports, its health), or removed; or a peer's
# gateways moved (south's two imports among 34 are changed in place, their clusters dial elsewhere).
_STEP = st.one_of(
    st.tuples(
        st.sampled_from(["west", "north", "south"]),
        st.integers(0, 15),
        st.sampled_from([{"tcp": 7}, {"alt": 7}, {"tcp": 7, "alt": 7}, {"tcp": 8}, {"tcp": 7, "web": 9}]),
        st.integers(0, 3),
        st.booleans(),
    ),
    st.tuples(st.just("moved"), st.sampled_from(["west", "south"]), st.integers(1, 9)),
)


@settings(max_examples=80, deadline=None)
@given(steps=st.lists(_STEP, min_size=1, max_size=8))
def test_imports_changed_in_place_build_what_a_build_from_nothing_builds(steps: list[Any]) -> None:
    """Imports changed a few at a time: a change of a few is made in place of the last build's pieces
    (the same imports at the same places), anything else by joining them all again; both give exactly
    the cold build. Ports of one number under two names share an authority (the first keeps it)."""

    def summary(index: int, ports: dict[str, int], healthy: int) -> ExportedService:
        return ExportedService(
            name=f"s{index:02d}", namespace="default", ports=ports, healthy_endpoints=healthy, total_endpoints=3
        )

    counts = {"west": 16, "north": 16, "south": 2}
    services = {peer: [summary(index, {"tcp": 7}, 1) for index in range(count)] for peer, count in counts.items()}
    gateways = dict.fromkeys(counts, "127.0.0.1:15443")

    def snapshot(peer: str, version: int) -> ServiceSnapshot:
        return ServiceSnapshot(
            zone=peer,
            trust_domain=f"{peer}.mesh",
            gateway_addresses=[gateways[peer]],
            version=version,
            services=services[peer],
        )

    # A peer's snapshot is replaced only when it changed (as a link delivers them), the others are kept.
    current = {peer: snapshot(peer, 1) for peer in counts}
    memory, fragments = ImportedServices(), Fragments()
    # One CONNECT listener for every import (the mode of many imports), where the in-place path applies.
    catalog = {
        "catalog": CatalogSnapshot(version=1, services=[]),
        "exports": ExportIndex([]),
        "per_import_listeners": False,
    }
    assert build(fragments, imports=memory.of(current), **catalog) == build(
        None, imports=services_of(current), **catalog
    )
    for version, step in enumerate(steps, start=2):
        if step[0] == "moved":
            _, peer, host = step
            gateways[peer] = f"127.0.0.{host}:15443"
        else:
            peer, index, ports, healthy, remove = step
            listed = [s for s in services[peer] if s.name != f"s{index:02d}"]
            if not remove:
                listed.append(summary(index, ports, healthy))
            # The unchanged summaries stay the same objects, in key order (as a delta keeps them).
            services[peer] = sorted(listed, key=lambda s: s.key)
        current = {**current, peer: snapshot(peer, version)}
        remembered = memory.of(current)
        assert remembered == services_of(current)  # the entries too: served imports show their health
        assert build(fragments, imports=remembered, **catalog) == build(None, imports=services_of(current), **catalog)


# Changes of one local service among sixteen: its endpoints (more, fewer, unhealthy), its ports, gone or back.
_LOCAL_STEP = st.tuples(
    st.integers(0, 15),
    st.sampled_from(["hosts", "unhealthy", "ports", "gone"]),
    st.integers(1, 4),
)


@settings(max_examples=80, deadline=None)
@given(steps=st.lists(_LOCAL_STEP, min_size=1, max_size=8))
def test_local_services_changed_in_place_build_what_a_build_from_nothing_builds(steps: list[Any]) -> None:
    """The local services' pieces changed in place of the last build's (a few services, the same ones at the
    same places) or joined again: both give exactly the cold build, with a split giving some services
    subset clusters and some services not exported at all."""
    names = [f"l{index:02d}" for index in range(16)]
    services = {name: service(name, 1, 2, version="v1" if index % 2 else "v2") for index, name in enumerate(names)}
    exported = {
        "exports": ExportIndex([ExportRule("default", name, "*") for name in names[:12]]),
        "splits": (SubsetSplit(service="l03", label="version", weights={"v1": 1, "v2": 1}),),
        "imports": [],
    }

    def catalog(version: int) -> CatalogSnapshot:
        return CatalogSnapshot(version=version, services=[services[name] for name in names if name in services])

    fragments = Fragments()
    assert build(fragments, catalog=catalog(1), **exported) == build(None, catalog=catalog(1), **exported)
    for version, (index, change, count) in enumerate(steps, start=2):
        name = names[index]
        if change == "gone":
            services.pop(name, None) if name in services else services.update({name: service(name, 1)})
        elif change == "hosts":
            services[name] = service(name, *range(1, count + 1), version="v1")
        elif change == "unhealthy":
            services[name] = Service(
                name=name,
                ports={"tcp": 8080},
                endpoints=[Endpoint(address="127.0.1.1", port=8080, healthy=count % 2 == 0)],
            )
        else:
            services[name] = Service(
                name=name,
                ports={f"p{port}": 9000 + count + port for port in range(count)},
                endpoints=[Endpoint(address="127.0.1.1", port=8080)],
            )
        assert build(fragments, catalog=catalog(version), **exported) == build(
            None, catalog=catalog(version), **exported
        )
