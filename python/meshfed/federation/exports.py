"""Export rules: which local services each peer may see and call.

Nothing is exported by default. A rule names a service (and namespace) and the
peers it goes to, by peering name or ``*`` for every peer. The rules decide two
things at once: what the peering stream tells each peer, and which peer
gateways the local ingress lets in (DESIGN §5: default deny unless an export
names the peer).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from meshfed.catalog.model import CatalogSnapshot, Service
from meshfed.errors import FederationError
from meshfed.federation.exchange import (
    MAX_LABEL_KEY,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_SUBSET_KEYS,
    MAX_SUBSET_VALUES,
    ExportedService,
    ServiceSnapshot,
)
from meshfed.sqlite import SqliteStore, transaction

ALL_PEERS = "*"
STATE_FILE = "state.db"
_PEER_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")

_MIGRATIONS = (
    """
    CREATE TABLE export_rules (
        namespace TEXT NOT NULL,
        service TEXT NOT NULL,
        peer TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (namespace, service, peer)
    ) STRICT;
    CREATE TABLE export_rules_version (only INTEGER PRIMARY KEY CHECK (only = 1), version INTEGER NOT NULL) STRICT;
    INSERT INTO export_rules_version VALUES (1, 0);
    """,
    # Bumped whenever the gateway's view of local endpoint health changes what peers are told. Kept on
    # disk because snapshot versions must only grow, across restarts too.
    """
    CREATE TABLE export_health_version (only INTEGER PRIMARY KEY CHECK (only = 1), version INTEGER NOT NULL) STRICT;
    INSERT INTO export_health_version VALUES (1, 0);
    """,
    # Per exported service, not per peer: whether its backends get a PROXY v2 header naming the caller.
    """
    CREATE TABLE export_options (
        namespace TEXT NOT NULL,
        service TEXT NOT NULL,
        proxy_protocol INTEGER NOT NULL CHECK (proxy_protocol IN (0, 1)),
        PRIMARY KEY (namespace, service)
    ) STRICT;
    """,
    # The local endpoints the gateway's health checks find failing, written with each health version
    # by the running controller alone, so that the CLI shows what the gateway found.
    """
    CREATE TABLE export_unhealthy_endpoints (
        namespace TEXT NOT NULL,
        service TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        PRIMARY KEY (namespace, service, endpoint)
    ) STRICT;
    """,
)

UnhealthyEndpoints = frozenset[tuple[str, str, str]]
"""(namespace, service, endpoint ``address:port``) the gateway sees failing, whatever the catalog says."""


@dataclass(frozen=True, order=True)
class ExportRule:
    namespace: str
    service: str
    peer: str


class ExportRules(SqliteStore):
    """The export rules of one zone, in its ``state.db``. Use as a context manager."""

    COMPONENT, MIGRATIONS = "exports", _MIGRATIONS

    def __init__(self, zone_directory: Path) -> None:
        super().__init__(zone_directory / STATE_FILE)

    def add(
        self, service: str, namespace: str, peers: Iterable[str], *, proxy_protocol: bool | None = None
    ) -> list[ExportRule]:
        """Export ``service`` to each of ``peers`` (names, or ``*``). Adding an existing rule is a no-op.

        ``proxy_protocol`` (when given) sets whether the service's backends get a PROXY v2 header
        with the original caller's SPIFFE ID; it applies to the service whoever calls.
        """
        _check_label(service, "service")
        _check_label(namespace, "namespace")
        rules = [ExportRule(namespace, service, _check_peer(peer)) for peer in peers]
        if not rules:
            raise FederationError("name at least one peer with --to (a peering name, or '*' for every peer)")
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        with transaction(self._db):
            self._db.executemany(
                "INSERT OR IGNORE INTO export_rules VALUES (?, ?, ?, ?)",
                [(rule.namespace, rule.service, rule.peer, now) for rule in rules],
            )
            if proxy_protocol is not None:
                self._db.execute(
                    "INSERT INTO export_options VALUES (?, ?, ?) "
                    "ON CONFLICT (namespace, service) DO UPDATE SET proxy_protocol = excluded.proxy_protocol",
                    (namespace, service, int(proxy_protocol)),
                )
            self._bump()
        return rules

    def proxy_protocol_services(self) -> frozenset[tuple[str, str]]:
        """(namespace, service) of the exports whose backends get a PROXY v2 header."""
        rows = self._db.execute("SELECT namespace, service FROM export_options WHERE proxy_protocol = 1").fetchall()
        return frozenset((namespace, service) for namespace, service in rows)

    def remove(self, service: str, namespace: str, peers: Iterable[str] | None = None) -> int:
        """Remove the rules of ``service`` (only those to ``peers`` if given). Returns how many went."""
        with transaction(self._db):
            if peers is None:
                removed = self._db.execute(
                    "DELETE FROM export_rules WHERE namespace = ? AND service = ?", (namespace, service)
                ).rowcount
            else:
                removed = sum(
                    self._db.execute(
                        "DELETE FROM export_rules WHERE namespace = ? AND service = ? AND peer = ?",
                        (namespace, service, peer),
                    ).rowcount
                    for peer in peers
                )
            if not removed:
                raise FederationError(f"no export of {service}.{namespace} matches; see 'meshfed export list'")
            self._db.execute(
                "DELETE FROM export_options WHERE (namespace, service) NOT IN "
                "(SELECT namespace, service FROM export_rules)"
            )
            self._bump()
        return removed

    def rules(self) -> list[ExportRule]:
        rows = self._db.execute("SELECT namespace, service, peer FROM export_rules ORDER BY 1, 2, 3").fetchall()
        return [ExportRule(*row) for row in rows]

    def version(self) -> int:
        (version,) = self._db.execute("SELECT version FROM export_rules_version").fetchone()
        return int(version)

    def health_version(self) -> int:
        (version,) = self._db.execute("SELECT version FROM export_health_version").fetchone()
        return int(version)

    def bump_health_version(self, unhealthy: UnhealthyEndpoints | None = None) -> int:
        """Local endpoint health changed: a new generation of what peers are told. Returns it.

        ``unhealthy`` (when given) is the gateway's new verdict, kept with the version for readers
        in other processes (:meth:`unhealthy_endpoints`). Only the running controller calls this.
        """
        with transaction(self._db):
            self._db.execute("UPDATE export_health_version SET version = version + 1")
            if unhealthy is not None:
                self._replace_unhealthy(unhealthy)
            return self.health_version()

    def clear_unhealthy_endpoints(self) -> None:
        """Forget the last verdict (a starting controller: its gateway has checked nothing yet)."""
        with transaction(self._db):
            self._replace_unhealthy(frozenset())

    def unhealthy_endpoints(self) -> UnhealthyEndpoints:
        """The local endpoints the running controller's gateway last found failing its health checks.

        Meaningful only while the controller runs (see :mod:`meshfed.runstate`); a zone that is
        not running has no verdict, and what is stored is its last one.
        """
        rows = self._db.execute("SELECT namespace, service, endpoint FROM export_unhealthy_endpoints").fetchall()
        return frozenset((str(namespace), str(service), str(endpoint)) for namespace, service, endpoint in rows)

    def _replace_unhealthy(self, unhealthy: UnhealthyEndpoints) -> None:
        self._db.execute("DELETE FROM export_unhealthy_endpoints")
        self._db.executemany("INSERT INTO export_unhealthy_endpoints VALUES (?, ?, ?)", sorted(unhealthy))

    def _bump(self) -> None:
        self._db.execute("UPDATE export_rules_version SET version = version + 1")


class ExportIndex:
    """Export rules indexed by service, so matching costs one lookup per service, not one scan of every rule."""

    def __init__(self, rules: Iterable[ExportRule]) -> None:
        peers: dict[tuple[str, str], set[str]] = {}
        for rule in rules:
            peers.setdefault((rule.namespace, rule.service), set()).add(rule.peer)
        self._peers = {key: frozenset(names) for key, names in peers.items()}

    def allows(self, service: Service, peer: str) -> bool:
        """True if some rule exports ``service`` to ``peer`` (by name or ``*``)."""
        peers = self._peers.get(service.key)
        return peers is not None and (peer in peers or ALL_PEERS in peers)

    def peers_allowed(self, service: Service, peers: Iterable[str]) -> list[str]:
        """The peers (of ``peers``) that some rule lets call ``service``."""
        return [peer for peer in peers if self.allows(service, peer)]

    def peers_of(self, service: Service) -> frozenset[str] | None:
        """The peers (names, or ``*``) some rule exports ``service`` to; None if none does."""
        return self._peers.get(service.key)


_Entry = tuple[Service, frozenset[str], ExportedService]
"""An exported service, the peers its rules name (or ``*``), and its summary as peers see it."""


class ExportedCatalog:
    """The exported services of one catalog snapshot as peers see them, built once and shared by every peer.

    Building a peer's view of 10,000 services costs about 0.3 s; every peer
    sees the same summaries of the services exported to it, so they are built
    once per catalog and rules (off the event loop, with the gateway config),
    and a peer's snapshot is a filter over them. The summaries of services
    with endpoints the gateway finds failing are built again per health
    verdict: few, normally none.
    """

    def __init__(self, catalog: CatalogSnapshot, index: ExportIndex, previous: ExportedCatalog | None = None) -> None:
        self.catalog = catalog
        self.index = index
        # A summary depends on its service alone, and services are frozen and shared across catalog
        # versions (catalog/embedded.py): the summaries of ``previous`` are reused for the very same
        # service objects, so one changed service is summarised again, not 10,000.
        if previous is not None and previous.catalog is catalog and previous.index is index:
            self._services: list[_Entry] = previous._services  # a config with other imports
            return
        known = {id(entry[0]): entry for entry in previous._services} if previous is not None else {}
        same_rules = previous is not None and previous.index is index
        entries: list[_Entry] = []
        for service in catalog.services:
            held = known.get(id(service))
            if held is not None and same_rules:
                entries.append(held)
                continue
            peers = index.peers_of(service)
            if peers is not None:
                entries.append((service, peers, held[2] if held is not None else _exported(service, frozenset())))
        self._services = entries

    def snapshot(
        self,
        *,
        zone: str,
        trust_domain: str,
        gateway_addresses: list[str],
        peer: str,
        rules_version: int,
        health_version: int = 0,
        unhealthy: UnhealthyEndpoints = frozenset(),
    ) -> ServiceSnapshot:
        """What ``peer`` may see (see :func:`exported_snapshot`)."""
        failing = {(namespace, name) for namespace, name, _ in unhealthy}
        if failing:
            services = [
                _exported(service, unhealthy) if service.key in failing else summary
                for service, peers, summary in self._services
                if peer in peers or ALL_PEERS in peers
            ]
        else:
            services = [summary for _, peers, summary in self._services if peer in peers or ALL_PEERS in peers]
        # Not validated again: the summaries were built from this zone's catalog (one per service
        # key, each checked as it was made); validating 10,000 of them per peer and change cost 15 ms.
        return ServiceSnapshot.model_construct(
            zone=zone,
            trust_domain=trust_domain,
            gateway_addresses=gateway_addresses,
            version=self.catalog.version + rules_version + health_version,
            services=services,
        )


def exported_snapshot(
    *,
    zone: str,
    trust_domain: str,
    gateway_addresses: list[str],
    peer: str,
    catalog: CatalogSnapshot,
    index: ExportIndex,
    rules_version: int,
    health_version: int = 0,
    unhealthy: UnhealthyEndpoints = frozenset(),
) -> ServiceSnapshot:
    """What ``peer`` may see: the catalog services some rule exports to it, with health summaries.

    An endpoint counts as healthy when the catalog says so and the gateway does
    not see it failing (``unhealthy``). The version is the sum of the catalog's,
    the rules' and the health versions: each only grows, so the sum grows
    whenever any of them changes.
    """
    return ExportedCatalog(catalog, index).snapshot(
        zone=zone,
        trust_domain=trust_domain,
        gateway_addresses=gateway_addresses,
        peer=peer,
        rules_version=rules_version,
        health_version=health_version,
        unhealthy=unhealthy,
    )


def _exported(service: Service, unhealthy: UnhealthyEndpoints) -> ExportedService:
    subsets: dict[str, set[str]] = {}
    for endpoint in service.endpoints:
        for key, value in endpoint.labels.items():
            subsets.setdefault(key, set()).add(value)
    healthy = [e for e in service.healthy_endpoints if (service.namespace, service.name, e.key) not in unhealthy]
    return ExportedService(
        name=service.name,
        namespace=service.namespace,
        ports=service.ports,
        labels=_within_bounds(service.labels, MAX_LABELS),
        healthy_endpoints=len(healthy),
        total_endpoints=len(service.endpoints),
        subsets=_within_bounds(
            {key: sorted(values) for key, values in sorted(subsets.items()) if len(values) <= MAX_SUBSET_VALUES},
            MAX_SUBSET_KEYS,
        ),
    )


_V = TypeVar("_V", str, list[str])


def _within_bounds(entries: dict[str, _V], count: int) -> dict[str, _V]:
    """What a peer accepts of a label map: keys and values within the exchange's bounds, at most ``count``.

    Local catalogs have no such bounds; labels beyond them (a per-pod hash with
    a value per endpoint, say) say nothing useful to a peer, and sending them
    would get the whole snapshot refused.
    """

    def fits(value: str | list[str]) -> bool:
        values = [value] if isinstance(value, str) else value
        return all(len(item) <= MAX_LABEL_VALUE for item in values)

    kept = {key: value for key, value in entries.items() if 0 < len(key) <= MAX_LABEL_KEY and fits(value)}
    return dict(sorted(kept.items())[:count])


def _check_label(value: str, what: str) -> None:
    if not _PEER_NAME.fullmatch(value):
        raise FederationError(
            f"{what} {value[:80]!r} is not a DNS label (lowercase letters, digits and '-', at most 63); "
            f"give the {what} as the catalog names it"
        )


def _check_peer(peer: str) -> str:
    if peer != ALL_PEERS and not _PEER_NAME.fullmatch(peer):
        raise FederationError(f"peer {peer!r} is not a peering name (a DNS label) or '*'")
    return peer
