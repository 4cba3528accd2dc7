"""From federation state to one complete gateway config (DESIGN §6: one snapshot per generation).

Ingress: one terminate listener; a route per exported service port, keyed by
the federated SNI of this zone's trust domain, allowing exactly the gateways
of the peers an export names. Egress: one originate listener per imported
service port, opening mTLS to the exporting peer's gateway with that
service's SNI and the peer gateway's SPIFFE ID pinned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from meshfed.catalog.model import CatalogSnapshot, Service
from meshfed.federation.exports import ExportIndex
from meshfed.federation.imports import ImportedService
from meshfed.gateway import Cluster, Endpoint, GatewayConfig, Identity, OriginateListener, Route, TerminateListener
from meshfed.gateway.config import Listener
from meshfed.gateway.sni import service_sni
from meshfed.trust.spiffe import TrustDomain

INGRESS_LISTENER = "ingress"

# Where an import's egress listener binds: (import listener name) -> "host:port".
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
) -> GatewayConfig:
    """The whole gateway config for this state; the same inputs always give the same config."""
    routes: list[Route] = []
    clusters: list[Cluster] = []
    for service in catalog.services:
        allowed = exports.peers_allowed(service, peer_trust_domains)
        endpoints = [Endpoint(address=e.key, weight=e.weight) for e in service.healthy_endpoints]
        if not allowed or not endpoints:
            continue
        cluster = _local_cluster_name(service)
        clusters.append(Cluster(name=cluster, endpoints=endpoints))
        allow = sorted(str(peer_trust_domains[peer].gateway_id) for peer in allowed)
        for port in sorted(set(service.ports.values())):
            routes.append(
                Route(
                    sni=service_sni(service.name, service.namespace, port, trust_domain), cluster=cluster, allow=allow
                )
            )

    listeners: list[Listener] = [TerminateListener(name=INGRESS_LISTENER, address=ingress_address, routes=routes)]
    peer_clusters: dict[str, Cluster] = {}
    for imported in imports:
        if not imported.snapshot.gateway_addresses:
            continue  # the peer advertised no gateway: nothing to dial
        peer_cluster = f"gateway:{imported.peer}"
        peer_clusters[peer_cluster] = Cluster(
            name=peer_cluster,
            endpoints=[Endpoint(address=address) for address in imported.snapshot.gateway_addresses],
        )
        peer_domain = TrustDomain.parse(imported.snapshot.trust_domain)
        for port_name, port in sorted(imported.service.ports.items()):
            name = egress_listener_name(imported, port_name)
            listeners.append(
                OriginateListener(
                    name=name,
                    address=egress_address(name),
                    cluster=peer_cluster,
                    sni=service_sni(imported.service.name, imported.service.namespace, port, peer_domain),
                    peer_spiffe_id=str(peer_domain.gateway_id),
                )
            )
    clusters.extend(peer_clusters.values())
    return GatewayConfig(identity=identity, trust_bundles=trust_bundles, listeners=listeners, clusters=clusters)


def egress_listener_name(imported: ImportedService, port_name: str) -> str:
    """``egress:<service>.<namespace>.<peer>:<port name>``: stable across config generations."""
    return f"egress:{imported.name}:{port_name}"


def _local_cluster_name(service: Service) -> str:
    return f"local:{service.namespace}/{service.name}"
