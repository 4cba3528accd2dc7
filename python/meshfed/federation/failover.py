"""Failover groups: one service offered by several sources, tried in a configured order.

A service imported from a peer and offered by at least one more source (this
zone, or another peer) is a group. Traffic goes to this zone's endpoints
first, then to the peers: those the zone's ``[failover] split`` names share
the next tier by weight (a canary across zones, say 90/10), then the peers of
``[failover] order`` one tier each, then the rest by name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from meshfed.catalog.model import CatalogSnapshot, Service
from meshfed.federation.imports import ImportedService
from meshfed.policy.failover import DEFAULT_POLICY, FailoverPolicy

LOCAL_SOURCE = "local"
"""How a failover group names this zone among its sources."""


@dataclass(frozen=True)
class FailoverGroup:
    """One service offered by several sources; ``tiers`` are the peers in the order traffic tries them."""

    namespace: str
    service: str
    local: Service | None
    tiers: tuple[tuple[ImportedService, ...], ...]
    weights: dict[str, int] = field(default_factory=dict)
    """Peer -> share within its tier (peers of a ``split``); 1 for the others."""

    @property
    def name(self) -> str:
        """``<service>.<namespace>``: the service, wherever it runs."""
        return f"{self.service}.{self.namespace}"

    @property
    def peers(self) -> list[ImportedService]:
        return [item for tier in self.tiers for item in tier]

    @property
    def sources(self) -> list[str]:
        """``local`` (if this zone runs the service), then peer names, in failover order."""
        return ([LOCAL_SOURCE] if self.local is not None else []) + [item.peer for item in self.peers]

    def describe(self) -> str:
        """``local → east 90 / north 10 → south``: tiers in order, shares where split."""
        tiers = [LOCAL_SOURCE] if self.local is not None else []
        for tier in self.tiers:
            if len(tier) > 1:
                tiers.append(" / ".join(f"{item.peer} {self.weights.get(item.peer, 1)}" for item in tier))
            else:
                tiers.append(tier[0].peer)
        return " → ".join(tiers)

    @property
    def port_names(self) -> list[str]:
        names = set(self.local.ports if self.local is not None else {})
        for item in self.peers:
            names.update(item.service.ports)
        return sorted(names)

    def listener_name(self, port_name: str) -> str:
        """``failover:<service>.<namespace>:<port name>``: stable across config generations."""
        return f"failover:{self.name}:{port_name}"


def failover_groups(
    catalog: CatalogSnapshot, imports: Iterable[ImportedService], policy: FailoverPolicy = DEFAULT_POLICY
) -> list[FailoverGroup]:
    """The services imported from a peer and offered by at least one more source, tiers per ``policy``."""
    rank = {peer: i for i, peer in enumerate(policy.order)}
    by_service: dict[tuple[str, str], list[ImportedService]] = {}
    for item in imports:
        by_service.setdefault(item.service.key, []).append(item)
    local = {service.key: service for service in catalog.services if service.endpoints}
    groups = []
    for (namespace, name), items in sorted(by_service.items()):
        ordered = sorted(items, key=lambda item: (rank.get(item.peer, len(rank)), item.peer))
        shared = tuple(item for item in ordered if item.peer in policy.split)
        tiers = ((shared,) if shared else ()) + tuple((item,) for item in ordered if item.peer not in policy.split)
        weights = {item.peer: policy.split[item.peer] for item in shared}
        group = FailoverGroup(namespace, name, local.get((namespace, name)), tiers, weights)
        if len(group.sources) > 1:
            groups.append(group)
    return groups
