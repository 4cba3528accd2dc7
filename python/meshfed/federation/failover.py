"""Failover groups: one service offered by several sources, tried in a configured order.

A service imported from a peer and offered by at least one more source (this
zone, or another peer) is a group. Traffic goes to this zone's endpoints
first, then to the peers: those the zone's ``[failover] split`` names share
the next tier by weight (a canary across zones, say 90/10), then the peers of
``[failover] order`` one tier each, then the rest by name.

A group keeps its listener, and so its address, while any source offers the
service, even one (a peering deleted, an export removed): local clients were
given the group's address and the remaining source still serves. Which
services were groups is not remembered here: the caller passes them as
``sticky`` (the gateway driver: the groups whose listener holds an egress port,
or runs in the applied config), so this stays a function of its inputs.
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from meshfed.catalog.model import CatalogSnapshot, Service
from meshfed.federation.imports import ImportedService
from meshfed.policy.failover import DEFAULT_POLICY, FailoverPolicy

LOCAL_SOURCE = "local"
"""How a failover group names this zone among its sources."""

LISTENER_PREFIX = "failover:"
"""The prefix of failover groups' listener names (import listeners' is ``egress:``)."""


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

    def port_number(self, port_name: str) -> int | None:
        """The service port ``port_name`` names: this zone's, else the first source's that has it."""
        for service in ([self.local] if self.local is not None else []) + [item.service for item in self.peers]:
            port = service.ports.get(port_name)
            if port is not None:
                return port
        return None

    def listener_name(self, port_name: str) -> str:
        """``failover:<service>.<namespace>:<port name>``: stable across config generations."""
        return f"{LISTENER_PREFIX}{self.name}:{port_name}"


def group_of_listener(listener: str) -> tuple[str, str] | None:
    """The (namespace, service) of a ``failover:<service>.<namespace>:<port name>`` listener; None for others.

    Service and namespace names are DNS labels (no dots, no colons), so the name splits back unambiguously.
    """
    if not listener.startswith(LISTENER_PREFIX):
        return None
    service, dot, rest = listener.removeprefix(LISTENER_PREFIX).partition(".")
    namespace, colon, _port = rest.partition(":")
    if not (dot and colon and service and namespace):
        return None
    return namespace, service


def groups_of_listeners(listeners: Iterable[str]) -> frozenset[tuple[str, str]]:
    """The (namespace, service) of the failover groups among these listener names (others are ignored)."""
    return frozenset(group for group in map(group_of_listener, listeners) if group is not None)


_OFFERED = operator.attrgetter("service.namespace", "service.name")


def _no_service_offered_twice(catalog: CatalogSnapshot, imports: list[ImportedService]) -> bool:
    """True if no service is offered by two sources: no peer's import shares its key with another's, nor with
    a local service that has endpoints (so no group can form)."""
    if not imports:
        return True  # and no pass over a catalog of 10,000 services
    offered = set(map(_OFFERED, imports))
    if len(offered) != len(imports):
        return False
    return not any(service.key in offered for service in catalog.services if service.endpoints)


def failover_groups(
    catalog: CatalogSnapshot,
    imports: Iterable[ImportedService],
    policy: FailoverPolicy = DEFAULT_POLICY,
    sticky: Collection[tuple[str, str]] = (),
) -> list[FailoverGroup]:
    """The services offered by at least two sources (this zone's endpoints, peers' imports), tiers per ``policy``.

    A service of ``sticky`` (namespace, service) is a group with any one source: it was a group, and its
    listener stays while anything offers the service. A service no source offers is never a group.
    """
    imports = list(imports)
    if not sticky and _no_service_offered_twice(catalog, imports):
        return []  # the common case of 10,000 imports, each from one peer: settled by two set operations
    rank = {peer: i for i, peer in enumerate(policy.order)}
    by_service: dict[tuple[str, str], list[ImportedService]] = {}
    for item in imports:
        by_service.setdefault(item.service.key, []).append(item)
    if not by_service and not sticky:
        return []  # nothing imported: no group, and no pass over a catalog of 10,000 services
    local = {service.key: service for service in catalog.services if service.endpoints}
    # A group that shrank to this zone alone has no import left: it is found through ``sticky``.
    for key in sticky:
        if key in local:
            by_service.setdefault(key, [])
    # Most imports are offered by one peer alone: those are left out before any group is built.
    candidates = [(key, items) for key, items in by_service.items() if len(items) + (key in local) > 1 or key in sticky]
    groups = []
    for (namespace, name), items in sorted(candidates):
        ordered = sorted(items, key=lambda item: (rank.get(item.peer, len(rank)), item.peer))
        shared = tuple(item for item in ordered if item.peer in policy.split)
        tiers = ((shared,) if shared else ()) + tuple((item,) for item in ordered if item.peer not in policy.split)
        weights = {item.peer: policy.split[item.peer] for item in shared}
        group = FailoverGroup(namespace, name, local.get((namespace, name)), tiers, weights)
        if len(group.sources) > 1 or (group.sources and (namespace, name) in sticky):
            groups.append(group)
    return groups
