"""``meshfed status``: the running zone at a glance, as ``GET /v1/status`` serves it.

Read from the live zone (its controller and peering service), so it tells the
truth of the process, not of its files: peerings as the stream sees them,
listeners as the gateway bound them, health as its checks found it.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from meshfed.federation.imports import ImportedService, ImportStore, egress_listener_name

if TYPE_CHECKING:
    from meshfed.controller import Controller
    from meshfed.federation.peer_status import PeerStatus
    from meshfed.federation.service import PeeringService


class CaGenerationView(BaseModel):
    generation: int
    state: str
    root_fingerprint: str
    activate_at: dt.datetime | None
    retire_at: dt.datetime | None


class ImportStatus(BaseModel):
    name: str = Field(description="<service>.<namespace>.<peer>")
    peer: str
    healthy_endpoints: int = Field(description="As the peer last reported them.")
    total_endpoints: int
    local_addresses: dict[str, str] = Field(description="Port name -> host:port where local clients connect.")
    workload_tls: str = Field(description="plain, permissive or strict: what the egress asks of local clients.")


class GroupStatus(BaseModel):
    name: str = Field(description="<service>.<namespace>")
    sources: list[str]
    local_addresses: dict[str, str]


class PeeringSummary(BaseModel):
    name: str
    state: str
    connected: bool
    heartbeat_age_seconds: float | None
    propagation_lag_seconds: float
    exported_services: int
    imported_services: int
    problem: str = Field(description="Why the peering is not healthy, or empty.")


class ZoneStatus(BaseModel):
    """The zone at a glance; ``healthy`` is false when something needs attention (``problems``)."""

    zone: str
    trust_domain: str
    healthy: bool
    problems: list[str]
    gateway_svid_expires_at: dt.datetime | None
    ca_generations: list[CaGenerationView]
    catalog_mode: str
    catalog_error: str | None
    peerings: list[PeeringSummary]
    imports: list[ImportStatus]
    failover_groups: list[GroupStatus]


def peering_problem(status: PeerStatus) -> str:
    if status.state != "ACTIVE":
        reason = f": {status.state_reason}" if status.state_reason else ""
        return f"{status.state}{reason}"
    if status.import_error:
        return f"its last update was refused: {status.import_error}"
    if status.export_error:
        return f"it refused this zone's last update: {status.export_error}"
    return ""


def zone_status(controller: Controller, peering: PeeringService | None) -> ZoneStatus:
    """The status of the running zone behind ``controller``."""
    zone = controller.zone
    peers = peering.peers() if peering is not None else []
    problems = list(controller.problems())
    summaries = []
    for status in peers:
        problem = peering_problem(status)
        if problem and status.state != "TERMINATED":
            problems.append(f"peering {status.name}: {problem}")
        summaries.append(
            PeeringSummary(
                name=status.name,
                state=status.state,
                connected=status.connected,
                heartbeat_age_seconds=status.heartbeat_age_seconds,
                propagation_lag_seconds=status.propagation_lag_seconds,
                exported_services=status.exported_services,
                imported_services=status.imported_services,
                problem=problem,
            )
        )
    bound = {name: f"{host}:{port}" for name, (host, port) in controller.egress_addresses().items()}
    with ImportStore(zone.directory) as store:
        imported = store.services()
    svid = controller.gateway_svid
    return ZoneStatus(
        zone=zone.name,
        trust_domain=zone.trust_domain.name,
        healthy=not problems,
        problems=problems,
        gateway_svid_expires_at=svid.leaf.not_valid_after_utc if svid is not None else None,
        ca_generations=[
            CaGenerationView(
                generation=g.generation,
                state=g.state,
                root_fingerprint=g.root_fingerprint,
                activate_at=g.activate_at,
                retire_at=g.retire_at,
            )
            for g in zone.authority.generations()
        ],
        catalog_mode=zone.config.catalog,
        catalog_error=controller.catalog_error,
        peerings=summaries,
        imports=[_import_status(controller, item, bound) for item in imported],
        failover_groups=[
            GroupStatus(
                name=group.name,
                sources=group.sources,
                local_addresses={
                    port: bound[group.listener_name(port)]
                    for port in group.port_names
                    if group.listener_name(port) in bound
                },
            )
            for group in controller.failover_groups()
        ],
    )


def _import_status(controller: Controller, item: ImportedService, bound: dict[str, str]) -> ImportStatus:
    return ImportStatus(
        name=item.name,
        peer=item.peer,
        healthy_endpoints=item.service.healthy_endpoints,
        total_endpoints=item.service.total_endpoints,
        local_addresses={
            port: bound[egress_listener_name(item, port)]
            for port in sorted(item.service.ports)
            if egress_listener_name(item, port) in bound
        },
        workload_tls=controller.egress_policy.mode(item.service.name, item.service.namespace, item.peer),
    )


__all__ = [
    "CaGenerationView",
    "GroupStatus",
    "ImportStatus",
    "PeeringSummary",
    "ZoneStatus",
    "peering_problem",
    "zone_status",
]
