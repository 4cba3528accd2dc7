"""From federation state to one complete gateway config (DESIGN §6: one snapshot per generation).

Ingress: one terminate listener; a route per exported service port, keyed by
the federated SNI of this zone's trust domain. Who may call a route is an
ordered list of rules over the caller's SPIFFE ID: the service's authorization
rules (``federation/authz.py``) when it has any, else every identity of the
trust domains of the peers an export names. A peer's gateway may vouch for the
workload behind it (``trusted_gateways``), within its own trust domain only, so
the rules see the workload that called, not just its zone. Local clusters are
health-checked so the zone can tell its peers when a service it exports has no
live endpoint.

Egress: one originate listener per imported service port, opening mTLS to the
exporting peer's gateway with that service's SNI and the peer gateway's SPIFFE
ID pinned, and conveying the calling workload's verified SPIFFE ID to it when
the listener requires workload SVIDs (``policy/egress.py``).
With ``connect_address``, one more listener, a CONNECT proxy, reaches every
import (``<service>.<namespace>.<peer>:<port>``) and group
(``<service>.<namespace>:<port>``) by name from one socket;
``per_import_listeners=False`` leaves it the only egress socket.

A service that several sources offer (this zone and peers, or several peers)
is also a *failover group* (``federation/failover.py``): one more originate
listener whose cluster holds the local endpoints at priority 0 and the peers'
gateways at the next priorities, tier by tier. The data plane
keeps traffic on the first priority with healthy endpoints (split by weight
within it) and retries the next one when a connect or handshake fails; sources
that report no healthy endpoint are left out while any other is healthy.
A group that shrinks to one source keeps its listener with that source alone
(``sticky``, see ``federation/failover.py``): clients keep the address they were given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from meshfed.catalog.model import CatalogSnapshot, Service
from meshfed.federation.authz import AuthzIndex
from meshfed.federation.exports import ExportIndex
from meshfed.federation.failover import FailoverGroup, failover_groups
from meshfed.federation.imports import ImportedService, egress_listener_name
from meshfed.gateway import (
    AuthzRule,
    Cluster,
    ConnectListener,
    ConnectRoute,
    Endpoint,
    GatewayConfig,
    HealthCheck,
    Identity,
    OriginateListener,
    Route,
    TerminateListener,
    UpstreamTls,
    WeightedCluster,
)
from meshfed.gateway.config import Listener
from meshfed.gateway.sni import service_sni
from meshfed.policy.egress import EgressPolicy
from meshfed.policy.failover import DEFAULT_POLICY, FailoverPolicy
from meshfed.policy.splits import SubsetSplit
from meshfed.trust.spiffe import TrustDomain

INGRESS_LISTENER = "ingress"
CONNECT_LISTENER = "egress-connect"
"""The one CONNECT listener of every import (``ControllerSettings.egress_connect_address``)."""

# Where an egress listener binds: (listener name) -> "host:port".
EgressAddress = Callable[[str], str]


def build_gateway_config(
    *,
    identity: Identity,
    trust_bundles: dict[str, str],
    trust_domain: TrustDomain,
    ingress_address: str,
    catalog: CatalogSnapshot,
    exports: ExportIndex,
    peer_trust_domains: Mapping[str, TrustDomain],
    imports: list[ImportedService],
    egress_address: EgressAddress,
    failover: FailoverPolicy = DEFAULT_POLICY,
    splits: Sequence[SubsetSplit] = (),
    health_check: HealthCheck | None = None,
    authz: AuthzIndex | None = None,
    egress: EgressPolicy | None = None,
    proxy_protocol: frozenset[tuple[str, str]] = frozenset(),
    sticky: frozenset[tuple[str, str]] = frozenset(),
    connect_address: str | None = None,
    per_import_listeners: bool = True,
) -> GatewayConfig:
    """The whole gateway config for this state; the same inputs always give the same config.

    ``proxy_protocol`` holds the (namespace, service) whose backends get a PROXY v2 header
    naming the original caller (``meshfed export add --proxy-protocol``). ``sticky`` holds the
    (namespace, service) that were failover groups: each keeps its group listener with one source.
    ``connect_address`` adds one CONNECT listener there naming every import and group by authority;
    ``per_import_listeners`` (default on) gives each import port and group port a listener of its own.
    """
    authz = authz or AuthzIndex()
    egress = egress or EgressPolicy()
    routes: list[Route] = []
    clusters: list[Cluster] = []
    split_of = {split.key: split for split in splits}
    # The default rules depend only on which peers an export names: built once per set of peers and
    # shared (frozen) by every route with that set, instead of once per service.
    defaults: dict[tuple[str, ...], list[AuthzRule]] = {}
    for service in catalog.services:
        allowed = exports.peers_allowed(service, peer_trust_domains)
        endpoints = [Endpoint(address=e.key, weight=e.weight) for e in service.healthy_endpoints]
        if not (allowed or authz.has_rules(service)) or not endpoints:
            continue
        cluster = local_cluster_name(service)
        clusters.append(Cluster(name=cluster, endpoints=endpoints, health_check=health_check))
        split = split_of.get(service.key)
        shares = _subset_clusters(service, split, clusters) if split is not None else []
        # Default: whatever the named peers' trust domains vouch for (their gateways, and the
        # workloads their gateways convey); a service with rules gets exactly its rules.
        named = tuple(sorted(allowed))
        default = defaults.get(named)
        if default is None:
            default = defaults[named] = [
                AuthzRule(action="allow", id=f"{peer_trust_domains[peer].id}/*") for peer in named
            ]
        for port in sorted(set(service.ports.values())):
            sni = service_sni(service.name, service.namespace, port, trust_domain)
            rules = (
                [AuthzRule(action=rule.action, id=rule.pattern) for rule in authz.rules_for(service, port)]
                if authz.has_rules(service)
                else default
            )
            target: dict[str, Any] = {"weighted_clusters": shares} if shares else {"cluster": cluster}
            routes.append(Route(sni=sni, rules=rules, proxy_protocol=service.key in proxy_protocol, **target))

    trusted_gateways = sorted({str(domain.gateway_id) for domain in peer_trust_domains.values()})
    # By authority: two port names of one service with the same number are one authority (the first name's).
    connect_routes: dict[str, ConnectRoute] = {}
    listeners: list[Listener] = [
        TerminateListener(
            name=INGRESS_LISTENER, address=ingress_address, routes=routes, trusted_gateways=trusted_gateways
        )
    ]
    for imported in imports:
        workload_tls = egress.mode(imported.service.name, imported.service.namespace, imported.peer)
        for port_name in sorted(imported.service.ports):
            endpoints = _peer_endpoints(imported, port_name, priority=0)
            if not endpoints:
                continue  # the peer advertised no gateway: nothing to dial
            name = egress_listener_name(imported, port_name)
            clusters.append(Cluster(name=name, endpoints=endpoints))
            if per_import_listeners:
                listeners.append(
                    OriginateListener(name=name, address=egress_address(name), cluster=name, workload_tls=workload_tls)
                )
            if workload_tls == "plain":
                offered = imported.service
                authority = f"{offered.name}.{offered.namespace}.{imported.peer}:{offered.ports[port_name]}"
                connect_routes.setdefault(authority, ConnectRoute(authority=authority, cluster=name))

    for group in failover_groups(catalog, imports, failover, sticky):
        for port_name in group.port_names:
            endpoints = _group_endpoints(group, port_name)
            if not endpoints:
                continue
            name = group.listener_name(port_name)
            clusters.append(
                Cluster(name=name, endpoints=endpoints, lb="weighted_round_robin", health_check=health_check)
            )
            workload_tls = egress.mode(group.service, group.namespace, None)
            if per_import_listeners:
                listeners.append(
                    OriginateListener(name=name, address=egress_address(name), cluster=name, workload_tls=workload_tls)
                )
            number = group.port_number(port_name)
            if workload_tls == "plain" and number is not None:
                authority = f"{group.name}:{number}"
                connect_routes.setdefault(authority, ConnectRoute(authority=authority, cluster=name))
    if connect_address is not None:
        # Plain clients only, the gateway the caller: an import whose egress requires workload SVIDs keeps
        # its own listener, where the workload's identity is verified and conveyed.
        listeners.append(
            ConnectListener(
                name=CONNECT_LISTENER, address=connect_address, connect_routes=list(connect_routes.values())
            )
        )
    return GatewayConfig(identity=identity, trust_bundles=trust_bundles, listeners=listeners, clusters=clusters)


def _subset_clusters(service: Service, split: SubsetSplit, clusters: list[Cluster]) -> list[WeightedCluster]:
    """One cluster per weighted subset with healthy endpoints (added to ``clusters``); none if no share is left."""
    shares = []
    for value, weight in sorted(split.weights.items()):
        members = [e for e in service.healthy_endpoints if e.labels.get(split.label) == value]
        if not members:
            continue
        name = f"{local_cluster_name(service)}@{split.label}={value}"
        clusters.append(Cluster(name=name, endpoints=[Endpoint(address=e.key, weight=e.weight) for e in members]))
        shares.append(WeightedCluster(cluster=name, weight=weight))
    return shares if any(share.weight for share in shares) else []


def _peer_endpoints(imported: ImportedService, port_name: str, *, priority: int, weight: int = 1) -> list[Endpoint]:
    """The peer's gateways, each dialed with the service's SNI and the peer gateway's SPIFFE ID pinned."""
    port = imported.service.ports.get(port_name)
    if port is None:
        return []
    peer_domain = TrustDomain.parse(imported.snapshot.trust_domain)
    tls = UpstreamTls(
        sni=service_sni(imported.service.name, imported.service.namespace, port, peer_domain),
        peer_spiffe_id=str(peer_domain.gateway_id),
        convey_caller=True,
    )
    addresses = imported.snapshot.gateway_addresses
    return [Endpoint(address=address, priority=priority, weight=weight, tls=tls) for address in addresses]


def _group_endpoints(group: FailoverGroup, port_name: str) -> list[Endpoint]:
    """Local endpoints at priority 0, then one priority per tier of peers; unhealthy sources only if
    nothing is healthy. Within a split tier each peer's share is spread over its gateway addresses."""
    offered: list[tuple[bool, list[Endpoint]]] = []
    if group.local is not None and port_name in group.local.ports:
        for local in group.local.endpoints:
            offered.append((local.healthy, [Endpoint(address=local.key, weight=local.weight, priority=0)]))
    for priority, tier in enumerate(group.tiers, start=1):
        # Scale so that every peer's share divides evenly among its addresses.
        scale = math.lcm(*(max(len(item.snapshot.gateway_addresses), 1) for item in tier))
        for imported in tier:
            share = group.weights.get(imported.peer, 1) * scale // max(len(imported.snapshot.gateway_addresses), 1)
            healthy = imported.service.healthy_endpoints > 0
            offered.append((healthy, _peer_endpoints(imported, port_name, priority=priority, weight=share)))
    chosen = [endpoints for healthy, endpoints in offered if healthy] or [endpoints for _, endpoints in offered]
    unique: dict[tuple[str, str | None], Endpoint] = {}
    for endpoints in chosen:
        for candidate in endpoints:
            # One endpoint per address and pinned identity (the first source wins): a peer that
            # advertises another peer's gateway address adds an endpoint of its own, which fails
            # its handshake there, and cannot replace the owner's.
            pinned = candidate.tls.peer_spiffe_id if candidate.tls is not None else None
            unique.setdefault((candidate.address, pinned), candidate)
    return list(unique.values())


def local_cluster_name(service: Service) -> str:
    """The cluster of a local service behind the ingress."""
    return f"local:{service.namespace}/{service.name}"
