"""Authorization policies: who may call each exported service, by SPIFFE ID.

Export rules say which peers see a service; by default any identity those peers'
trust domains vouch for may call it (their gateways, and their workloads through
a strict or permissive egress). Authorization rules refine that per service, and
optionally per port: an ordered list of ``allow`` / ``deny`` rules over SPIFFE ID
patterns (``*``, an exact ID, or ``<id>/*`` for everything below it). The first
rule that matches the caller decides; once a service has rules, a caller no rule
allows is denied. Rules can name trust domains that are not peered zones at all
(a SPIRE deployment federated by bundle only): its workloads then call the
service at the ingress with their own SVIDs.

Rules come from two places: ``[[authz]]`` tables in ``zone.toml`` (the Helm
chart renders them; re-read at every start, listed first) and the CLI / API
(stored here, applied live). The gateway enforces them (``meshfed._core``):
this module only stores, orders and validates them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from meshfed.catalog.model import Service
from meshfed.errors import FederationError
from meshfed.policy.authz import Action, RuleSpec
from meshfed.sqlite import SqliteStore, transaction

STATE_FILE = "state.db"
MAX_RULES_PER_SERVICE = 256  # a route's rules are matched in order on every connection

Source = Literal["config", "api"]

_MIGRATIONS = (
    """
    CREATE TABLE authz_rules (
        rule_id INTEGER PRIMARY KEY AUTOINCREMENT,
        namespace TEXT NOT NULL,
        service TEXT NOT NULL,
        port INTEGER CHECK (port IS NULL OR port BETWEEN 1 AND 65535),
        position INTEGER NOT NULL,
        action TEXT NOT NULL CHECK (action IN ('allow', 'deny')),
        pattern TEXT NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('config', 'api')),
        created_at TEXT NOT NULL
    ) STRICT;
    CREATE INDEX authz_rules_by_service ON authz_rules (namespace, service, position);
    CREATE TABLE authz_version (only INTEGER PRIMARY KEY CHECK (only = 1), version INTEGER NOT NULL) STRICT;
    INSERT INTO authz_version VALUES (1, 0);
    """,
)


class ConfigRuleError(FederationError):
    """The rule comes from ``zone.toml``: only editing the file changes it."""


@dataclass(frozen=True)
class AuthzRule:
    """A stored rule; ``rule_id`` names it for ``meshfed authz remove``."""

    rule_id: int
    namespace: str
    service: str
    port: int | None
    action: Action
    pattern: str
    source: Source

    def applies_to(self, port: int) -> bool:
        return self.port is None or self.port == port


class RuleView(BaseModel):
    """A rule as ``GET /v1/authz`` and ``meshfed authz list -o json`` show it."""

    rule_id: int = Field(description="Names the rule for DELETE /v1/authz/{rule_id}.")
    service: str
    namespace: str
    port: int | None = Field(description="The service port the rule applies to; null for every port.")
    action: Action
    id: str = Field(description="SPIFFE ID pattern of the callers it matches.")
    source: Source = Field(description="config: zone.toml [[authz]] (read-only here); api: CLI or API.")

    @classmethod
    def of(cls, rule: AuthzRule) -> RuleView:
        return cls(
            rule_id=rule.rule_id,
            service=rule.service,
            namespace=rule.namespace,
            port=rule.port,
            action=rule.action,
            id=rule.pattern,
            source=rule.source,
        )


class AuthzRules(SqliteStore):
    """The authorization rules of one zone, in its ``state.db``. Use as a context manager."""

    COMPONENT, MIGRATIONS = "authz", _MIGRATIONS

    def __init__(self, zone_directory: Path) -> None:
        super().__init__(zone_directory / STATE_FILE)

    def add(self, spec: RuleSpec, *, position: int | None = None) -> AuthzRule:
        """Add a rule to its service's API rules: at ``position`` (1 = first of them) or last."""
        with transaction(self._db):
            rows = self._db.execute(
                "SELECT rule_id FROM authz_rules WHERE namespace = ? AND service = ? AND source = 'api' "
                "ORDER BY position",
                (spec.namespace, spec.service),
            ).fetchall()
            self._check_room(spec.namespace, spec.service, 1)
            order = [rule_id for (rule_id,) in rows]
            if position is not None and not 1 <= position <= len(order) + 1:
                raise FederationError(
                    f"position {position} is out of range: {spec.service}.{spec.namespace} has {len(order)} "
                    f"rule(s) from the CLI or API, so use 1 to {len(order) + 1}"
                )
            rule_id = self._insert(spec, "api", position=0)
            order.insert(len(order) if position is None else position - 1, rule_id)
            self._db.executemany(
                "UPDATE authz_rules SET position = ? WHERE rule_id = ?", [(i, rid) for i, rid in enumerate(order)]
            )
            self._bump()
        return self._get(rule_id)

    def remove(self, rule_id: int) -> AuthzRule:
        """Remove one rule added by the CLI or API."""
        with transaction(self._db):
            rule = self._get(rule_id)
            if rule.source == "config":
                raise ConfigRuleError(
                    f"rule {rule_id} comes from zone.toml ([[authz]]); edit zone.toml (or the Helm values) "
                    "and restart the zone to change it"
                )
            self._db.execute("DELETE FROM authz_rules WHERE rule_id = ?", (rule_id,))
            self._bump()
        return rule

    def remove_service(self, service: str, namespace: str) -> int:
        """Remove every CLI/API rule of a service; returns how many went."""
        with transaction(self._db):
            removed = self._db.execute(
                "DELETE FROM authz_rules WHERE namespace = ? AND service = ? AND source = 'api'", (namespace, service)
            ).rowcount
            if not removed:
                raise FederationError(f"no rule of {service}.{namespace} to remove; see 'meshfed authz list'")
            self._bump()
        return int(removed)

    def replace_config_rules(self, specs: Sequence[RuleSpec]) -> None:
        """Make the ``zone.toml`` rules exactly ``specs`` (in order); a no-op if they already are."""
        wanted = [(s.namespace, s.service, s.port, s.action, s.id) for s in specs]
        if self._config_order() == wanted:
            return  # unchanged since the last start: keep rule ids and the version
        with transaction(self._db):
            self._db.execute("DELETE FROM authz_rules WHERE source = 'config'")
            for spec in specs:
                self._check_room(spec.namespace, spec.service, 1)
                self._insert(spec, "config", position=-len(specs))
            # Config rules come first: negative positions, in file order.
            rows = self._db.execute(
                "SELECT rule_id FROM authz_rules WHERE source = 'config' ORDER BY rule_id"
            ).fetchall()
            self._db.executemany(
                "UPDATE authz_rules SET position = ? WHERE rule_id = ?",
                [(i - len(rows), rule_id) for i, (rule_id,) in enumerate(rows)],
            )
            self._bump()

    def rules(self) -> list[AuthzRule]:
        """Every rule, by service, in the order the gateway applies them."""
        rows = self._db.execute(
            "SELECT rule_id, namespace, service, port, action, pattern, source FROM authz_rules "
            "ORDER BY namespace, service, position"
        ).fetchall()
        return [AuthzRule(*row) for row in rows]

    def version(self) -> int:
        (version,) = self._db.execute("SELECT version FROM authz_version").fetchone()
        return int(version)

    def _config_order(self) -> list[tuple[str, str, int | None, str, str]]:
        rows = self._db.execute(
            "SELECT namespace, service, port, action, pattern FROM authz_rules WHERE source = 'config' "
            "ORDER BY position"
        ).fetchall()
        return [(row[0], row[1], row[2], row[3], row[4]) for row in rows]

    def _check_room(self, namespace: str, service: str, adding: int) -> None:
        (count,) = self._db.execute(
            "SELECT count(*) FROM authz_rules WHERE namespace = ? AND service = ?", (namespace, service)
        ).fetchone()
        if count + adding > MAX_RULES_PER_SERVICE:
            raise FederationError(
                f"{service}.{namespace} already has {count} rules; at most {MAX_RULES_PER_SERVICE} per service "
                "(use patterns ending in /* to cover many identities with one rule)"
            )

    def _insert(self, spec: RuleSpec, source: Source, *, position: int) -> int:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        cursor = self._db.execute(
            "INSERT INTO authz_rules (namespace, service, port, position, action, pattern, source, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (spec.namespace, spec.service, spec.port, position, spec.action, spec.id, source, now),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def _get(self, rule_id: int) -> AuthzRule:
        row = self._db.execute(
            "SELECT rule_id, namespace, service, port, action, pattern, source FROM authz_rules WHERE rule_id = ?",
            (rule_id,),
        ).fetchone()
        if row is None:
            raise FederationError(f"no authorization rule {rule_id}; see 'meshfed authz list'")
        return AuthzRule(*row)

    def _bump(self) -> None:
        self._db.execute("UPDATE authz_version SET version = version + 1")


class AuthzIndex:
    """Rules indexed by service: one lookup per route when the gateway config is built."""

    def __init__(self, rules: Iterable[AuthzRule] = ()) -> None:
        self._rules: dict[tuple[str, str], list[AuthzRule]] = {}
        for rule in rules:
            self._rules.setdefault((rule.namespace, rule.service), []).append(rule)

    def has_rules(self, service: Service) -> bool:
        """Whether the service's callers are decided by its rules (else by its export rules alone)."""
        return service.key in self._rules

    def rules_for(self, service: Service, port: int) -> list[AuthzRule]:
        """The service's rules that apply to ``port``, in order (the gateway denies what none allows)."""
        return [rule for rule in self._rules.get(service.key, ()) if rule.applies_to(port)]
