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

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshfed.catalog.model import CatalogSnapshot, Service
from meshfed.federation.authz import AuthzIndex
from meshfed.federation.exchange import ExportedService
from meshfed.federation.exports import ExportIndex
from meshfed.federation.failover import FailoverGroup, failover_groups
from meshfed.federation.imports import ImportedService, ImportOrigin, egress_listener_name
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
from meshfed.places import changed_places
from meshfed.policy.egress import EgressPolicy, WorkloadTls
from meshfed.policy.failover import DEFAULT_POLICY, FailoverPolicy
from meshfed.policy.splits import SubsetSplit
from meshfed.trust.spiffe import TrustDomain

INGRESS_LISTENER = "ingress"
CONNECT_LISTENER = "egress-connect"
"""The one CONNECT listener of every import (``ControllerSettings.egress_connect_address``)."""

# Where an egress listener binds: (listener name) -> "host:port".
EgressAddress = Callable[[str], str]


@dataclass(frozen=True)
class _Local:
    """What one local service became in a config (nothing, if not exported), and what it was built from."""

    service: Service
    key: tuple[object, ...] | None
    clusters: list[Cluster]
    routes: list[Route]


@dataclass(frozen=True)
class _Import:
    """What one imported service became in a config, and what it was built from."""

    service: ExportedService
    origin: ImportOrigin
    key: tuple[object, ...]
    clusters: list[Cluster]
    listeners: list[Listener]
    connect_routes: list[ConnectRoute]
    # (peer, namespace, service): what the next build looks it up by.
    import_key: tuple[str, str, str]


@dataclass(frozen=True)
class _LocalSection:
    """What a build made of the local services: each one's pieces, in catalog order, and those joined."""

    services: Sequence[Service]
    pieces: list[_Local]
    by_key: dict[tuple[str, str], _Local]
    clusters: list[Cluster]
    routes: list[Route]
    # Where each service's clusters and routes start in ``clusters`` and ``routes``.
    cluster_offsets: list[int]
    route_offsets: list[int]
    # The inputs every service's pieces were built with (rules, policies, peers).
    context: tuple[object, ...] = ()


@dataclass(frozen=True)
class _ImportSection:
    """What a build made of the imports: each import's pieces, in order, and those joined."""

    imports: Sequence[ImportedService]
    pieces: list[_Import]
    by_key: dict[tuple[str, str, str], _Import]
    clusters: list[Cluster]
    listeners: list[Listener]
    connect_routes: dict[str, ConnectRoute]
    # Where each import's clusters start in ``clusters``; None when each has one, at its own index.
    cluster_offsets: list[int] | None
    # The inputs every import's pieces were built with (the egress policy, listeners per import or not).
    context: tuple[object, ...] = ()


class Fragments:
    """The clusters, routes and listeners a build made per local service and per import, for the next build.

    A zone of 10,000 services builds its whole config again on every change.
    A service or an import whose inputs are equal to last time's (the same
    object, for the services a catalog shares across versions) gets last
    time's pieces back: a lookup instead of a build, and, since the pieces are
    frozen, the very same objects, so what changed between two configs shows
    by identity. When the inputs every service shares (rules, policies,
    peers) are those of last time as well, the very same service object is
    all a lookup checks: one change in 10,000 services costs one build and
    10,000 lookups, not 10,000 comparisons. Better still, when the services
    (or imports) are the last build's very objects in the same places but a
    few, those few are built again in place of their pieces in copies of the
    last build's joined lists (``_patched_local``, ``_patched_section``): one
    change costs one build and a copy of two lists, not 10,000 lookups; a
    change that moves anything (a service came or went, a piece has other
    counts) joins them all again. Each build keeps only what it
    used: one config's worth. A build beside another (the API's) may leave
    this with either's pieces; every entry is whole, and a lost one only
    costs building it again.
    """

    def __init__(self) -> None:
        # Each with what its pieces were built with: a section of one build beside a section of
        # another (two builds at once) is still reused only where its own inputs are this build's.
        self._local: _LocalSection | None = None
        self._imports: _ImportSection | None = None

    def _keep(self, local: _LocalSection, imports: _ImportSection) -> None:
        self._local, self._imports = local, imports


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
    fragments: Fragments | None = None,
) -> GatewayConfig:
    """The whole gateway config for this state; the same inputs always give the same config.

    ``proxy_protocol`` holds the (namespace, service) whose backends get a PROXY v2 header
    naming the original caller (``meshfed export add --proxy-protocol``). ``sticky`` holds the
    (namespace, service) that were failover groups: each keeps its group listener with one source.
    ``connect_address`` adds one CONNECT listener there naming every import and group by authority;
    ``per_import_listeners`` (default on) gives each import port and group port a listener of its own.
    ``fragments`` (kept by the caller across builds) reuses the pieces of unchanged services and imports.
    """
    authz = authz or AuthzIndex()
    egress = egress or EgressPolicy()
    fragments = fragments if fragments is not None else Fragments()
    routes: list[Route] = []
    clusters: list[Cluster] = []
    split_of = {split.key: split for split in splits}
    # The default rules depend only on which peers an export names: built once per set of peers and
    # shared (frozen) by every route with that set, instead of once per service.
    defaults: dict[tuple[str, ...], list[AuthzRule]] = {}
    # Rules and policies are compared by identity: a caller that keeps them across builds (the
    # gateway driver reads each version of the rules once) gets the fast path below.
    local_context: tuple[object, ...] = (
        exports,
        authz,
        dict(peer_trust_domains),
        tuple(splits),
        proxy_protocol,
        health_check,
        trust_domain,
    )
    last_local = fragments._local
    same_local_context = last_local is not None and _same(last_local.context, local_context)
    held_local = last_local.by_key if last_local is not None else {}

    def local_piece_of(service: Service) -> _Local:
        """What one local service becomes: last time's pieces when its inputs are equal, else built."""
        held = held_local.get(service.key)
        if same_local_context and held is not None and held.service is service:
            return held
        allowed = exports.peers_allowed(service, peer_trust_domains)
        has_rules = authz.has_rules(service)
        if not (allowed or has_rules) or not any(e.healthy for e in service.endpoints):
            return _Local(service, None, [], [])
        named = tuple(sorted(allowed))
        ports = sorted(set(service.ports.values()))
        split = split_of.get(service.key)
        key: tuple[object, ...] = (
            tuple(str(peer_trust_domains[peer]) for peer in named),
            tuple(tuple((r.action, r.pattern) for r in authz.rules_for(service, port)) for port in ports)
            if has_rules
            else None,
            split,
            service.key in proxy_protocol,
            health_check,
            str(trust_domain),
        )
        if held is None or held.key != key or (held.service is not service and held.service != service):
            default = defaults.get(named)
            if default is None:
                default = defaults[named] = [
                    AuthzRule(action="allow", id=f"{peer_trust_domains[peer].id}/*") for peer in named
                ]
            held = _Local(
                service,
                key,
                *_local_pieces(service, ports, split, default, authz, proxy_protocol, health_check, trust_domain),
            )
        return held

    local = (
        _patched_local(last_local, catalog.services, local_piece_of)
        if same_local_context and last_local is not None
        else None
    ) or _joined_local(catalog.services, [local_piece_of(service) for service in catalog.services])
    clusters.extend(local.clusters)
    routes.extend(local.routes)

    trusted_gateways = sorted({str(domain.gateway_id) for domain in peer_trust_domains.values()})
    # By authority: two port names of one service with the same number are one authority (the first name's).
    connect_routes: dict[str, ConnectRoute] = {}
    listeners: list[Listener] = [
        TerminateListener(
            name=INGRESS_LISTENER, address=ingress_address, routes=routes, trusted_gateways=trusted_gateways
        )
    ]
    # Without a listener per import an import's pieces depend on the egress policy, its peer's trust
    # domain and gateways, and itself: with the same policy, the same service object and the same
    # peer as last time is all a lookup checks. (A listener per import also depends on its address.)
    import_context: tuple[object, ...] = (egress, per_import_listeners)
    last = fragments._imports
    same_import_context = not per_import_listeners and last is not None and _same(last.context, import_context)
    held_pieces = last.by_key if last is not None else {}

    def piece_of(imported: ImportedService) -> _Import:
        """The pieces of one import: last time's when its inputs are equal, else built."""
        offered = imported.service
        held = held_pieces.get((imported.peer, offered.namespace, offered.name))
        if (
            same_import_context
            and held is not None
            and held.service is offered
            and (held.origin is imported.origin or held.origin == imported.origin)
        ):
            return held
        workload_tls = egress.mode(offered.name, offered.namespace, imported.peer)
        names = [egress_listener_name(imported, port_name) for port_name in sorted(offered.ports)]
        key = (workload_tls, tuple(egress_address(name) for name in names) if per_import_listeners else None)
        if held is None or held.key != key or held.origin != imported.origin or held.service != offered:
            held = _Import(
                offered,
                imported.origin,
                key,
                *_import_pieces(imported, workload_tls, egress_address, per_import_listeners),
                (imported.peer, offered.namespace, offered.name),
            )
        return held

    section = (_patched_section(last, imports, piece_of) if same_import_context and last is not None else None) or (
        _joined_section(imports, [piece_of(item) for item in imports])
    )
    clusters.extend(section.clusters)
    listeners.extend(section.listeners)
    connect_routes.update(section.connect_routes)

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
    fragments._keep(
        dataclasses.replace(local, context=local_context), dataclasses.replace(section, context=import_context)
    )
    return GatewayConfig(identity=identity, trust_bundles=trust_bundles, listeners=listeners, clusters=clusters)


def _joined_local(services: Sequence[Service], pieces: list[_Local]) -> _LocalSection:
    """The local services' pieces joined, in catalog order."""
    clusters: list[Cluster] = []
    routes: list[Route] = []
    cluster_offsets: list[int] = []
    route_offsets: list[int] = []
    for piece in pieces:
        cluster_offsets.append(len(clusters))
        route_offsets.append(len(routes))
        clusters.extend(piece.clusters)
        routes.extend(piece.routes)
    by_key = {piece.service.key: piece for piece in pieces}
    return _LocalSection(services, pieces, by_key, clusters, routes, cluster_offsets, route_offsets)


def _patched_local(
    last: _LocalSection, services: Sequence[Service], piece_of: Callable[[Service], _Local]
) -> _LocalSection | None:
    """The last build's local section with the services that are not the very same objects built again, in
    place (as :func:`_patched_section` does for imports); None when services came or went, or a changed one
    has another number of clusters or routes."""
    places = changed_places(last.services, services, at_most=0.25)
    if places is None:
        return None
    pieces, by_key = last.pieces.copy(), dict(last.by_key)
    clusters, routes = last.clusters.copy(), last.routes.copy()
    for place in places:
        old, piece = last.pieces[place], piece_of(services[place])
        if (
            piece.service.key != old.service.key
            or len(piece.clusters) != len(old.clusters)
            or len(piece.routes) != len(old.routes)
        ):
            return None
        start = last.cluster_offsets[place]
        clusters[start : start + len(old.clusters)] = piece.clusters
        start = last.route_offsets[place]
        routes[start : start + len(old.routes)] = piece.routes
        pieces[place] = by_key[piece.service.key] = piece
    return _LocalSection(services, pieces, by_key, clusters, routes, last.cluster_offsets, last.route_offsets)


def _joined_section(imports: Sequence[ImportedService], pieces: list[_Import]) -> _ImportSection:
    """The imports' pieces joined, in order; an authority two imports claim is the first one's."""
    clusters: list[Cluster] = []
    listeners: list[Listener] = []
    connect_routes: dict[str, ConnectRoute] = {}
    offsets: list[int] = []
    for piece in pieces:
        offsets.append(len(clusters))
        clusters.extend(piece.clusters)
        listeners.extend(piece.listeners)
        for route in piece.connect_routes:
            connect_routes.setdefault(route.authority, route)
    uniform = len(clusters) == len(pieces) and all(len(piece.clusters) == 1 for piece in pieces)
    by_key = {piece.import_key: piece for piece in pieces}
    return _ImportSection(imports, pieces, by_key, clusters, listeners, connect_routes, None if uniform else offsets)


def _patched_section(
    last: _ImportSection, imports: Sequence[ImportedService], piece_of: Callable[[ImportedService], _Import]
) -> _ImportSection | None:
    """The last build's section with the imports that are not the very same objects built again, in place;
    None when that cannot say it (imports came or went, or a changed one has other names or counts).

    A peer's delta keeps its unchanged services, and ImportedServices their entries: at 10,000 imports,
    one changed, the unchanged ones are found by the interpreter's own pass (``map``, ``compress``) and
    the joined lists are copied, not joined again.
    """
    places = changed_places(last.imports, imports, at_most=0.25)
    if places is None or last.listeners:
        return None
    pieces, by_key = last.pieces.copy(), dict(last.by_key)
    clusters, connect_routes = last.clusters.copy(), dict(last.connect_routes)
    for place in places:
        old, piece = last.pieces[place], piece_of(imports[place])
        if (
            piece.import_key != old.import_key
            or piece.listeners
            or len(piece.clusters) != len(old.clusters)
            or [route.authority for route in piece.connect_routes] != [route.authority for route in old.connect_routes]
        ):
            return None
        for before, after in zip(old.connect_routes, piece.connect_routes, strict=True):
            if connect_routes.get(before.authority) is not before:
                return None  # the authority was an earlier import's: the first one keeps it
            connect_routes[before.authority] = after
        start = place if last.cluster_offsets is None else last.cluster_offsets[place]
        clusters[start : start + len(old.clusters)] = piece.clusters
        pieces[place] = by_key[piece.import_key] = piece
    return _ImportSection(imports, pieces, by_key, clusters, [], connect_routes, last.cluster_offsets)


def _same(before: tuple[object, ...] | None, now: tuple[object, ...]) -> bool:
    """The inputs shared by every piece are those of the last build: each the same object, or equal."""
    return before is not None and all(a is b or a == b for a, b in zip(before, now, strict=True))


def _local_pieces(
    service: Service,
    ports: list[int],
    split: SubsetSplit | None,
    default: list[AuthzRule],
    authz: AuthzIndex,
    proxy_protocol: frozenset[tuple[str, str]],
    health_check: HealthCheck | None,
    trust_domain: TrustDomain,
) -> tuple[list[Cluster], list[Route]]:
    """The cluster (and subset clusters) and the ingress routes of one exported local service."""
    clusters: list[Cluster] = []
    routes: list[Route] = []
    cluster = local_cluster_name(service)
    endpoints = [Endpoint(address=e.key, weight=e.weight) for e in service.healthy_endpoints]
    clusters.append(Cluster(name=cluster, endpoints=endpoints, health_check=health_check))
    shares = _subset_clusters(service, split, clusters) if split is not None else []
    # Default: whatever the named peers' trust domains vouch for (their gateways, and the
    # workloads their gateways convey); a service with rules gets exactly its rules.
    for port in ports:
        sni = service_sni(service.name, service.namespace, port, trust_domain)
        rules = (
            [AuthzRule(action=rule.action, id=rule.pattern) for rule in authz.rules_for(service, port)]
            if authz.has_rules(service)
            else default
        )
        target: dict[str, Any] = {"weighted_clusters": shares} if shares else {"cluster": cluster}
        routes.append(Route(sni=sni, rules=rules, proxy_protocol=service.key in proxy_protocol, **target))
    return clusters, routes


def _import_pieces(
    imported: ImportedService, workload_tls: WorkloadTls, egress_address: EgressAddress, per_import_listeners: bool
) -> tuple[list[Cluster], list[Listener], list[ConnectRoute]]:
    """The clusters, listeners and CONNECT routes of one imported service, a port each."""
    clusters: list[Cluster] = []
    listeners: list[Listener] = []
    connect_routes: list[ConnectRoute] = []
    offered = imported.service
    for port_name in sorted(offered.ports):
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
            authority = f"{offered.name}.{offered.namespace}.{imported.peer}:{offered.ports[port_name]}"
            connect_routes.append(ConnectRoute(authority=authority, cluster=name))
    return clusters, listeners, connect_routes


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
    """The peer's gateways, each dialed with the service's SNI and the peer gateway's SPIFFE ID pinned,
    over the gateway tunnel where the peer's gateway negotiates it (else per connection)."""
    port = imported.service.ports.get(port_name)
    if port is None:
        return []
    peer_domain, gateway_id = _peer_gateway(imported.origin.trust_domain)
    tls = UpstreamTls(
        sni=service_sni(imported.service.name, imported.service.namespace, port, peer_domain),
        peer_spiffe_id=gateway_id,
        convey_caller=True,
        tunnel=True,
    )
    addresses = imported.origin.gateway_addresses
    return [Endpoint(address=address, priority=priority, weight=weight, tls=tls) for address in addresses]


@functools.lru_cache(maxsize=1024)
def _peer_gateway(trust_domain: str) -> tuple[TrustDomain, str]:
    """A peer's trust domain and its gateway's SPIFFE ID: parsed once, and one string shared by the
    endpoints of all its imports (10,000 copies of it were a megabyte)."""
    domain = TrustDomain.parse(trust_domain)
    return domain, str(domain.gateway_id)


def _group_endpoints(group: FailoverGroup, port_name: str) -> list[Endpoint]:
    """Local endpoints at priority 0, then one priority per tier of peers; unhealthy sources only if
    nothing is healthy. Within a split tier each peer's share is spread over its gateway addresses."""
    offered: list[tuple[bool, list[Endpoint]]] = []
    if group.local is not None and port_name in group.local.ports:
        for local in group.local.endpoints:
            offered.append((local.healthy, [Endpoint(address=local.key, weight=local.weight, priority=0)]))
    for priority, tier in enumerate(group.tiers, start=1):
        # Scale so that every peer's share divides evenly among its addresses.
        scale = math.lcm(*(max(len(item.origin.gateway_addresses), 1) for item in tier))
        for imported in tier:
            share = group.weights.get(imported.peer, 1) * scale // max(len(imported.origin.gateway_addresses), 1)
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
