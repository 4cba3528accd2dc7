"""The zone's durable state in SQLite: what must survive a restart.

One file (``state.db``) per zone; this module owns its trust tables (the
``trust`` component of :mod:`meshfed.sqlite`'s numbered migrations).
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from meshfed.sqlite import SqliteStore, transaction
from meshfed.trust.bundle import TrustBundle, parse_bundle
from meshfed.trust.spiffe import TrustDomain

_MIGRATIONS = (
    """
    CREATE TABLE trust_bundles (
        trust_domain TEXT PRIMARY KEY,
        bundle_json BLOB NOT NULL,
        source TEXT NOT NULL,
        updated_at TEXT NOT NULL
    ) STRICT;
    """,
    # 2: CA rotation phases and federation relationships (trust bridging, issue 3).
    """
    CREATE TABLE ca_generations (
        generation INTEGER PRIMARY KEY,
        directory TEXT NOT NULL,
        root_fingerprint TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('published', 'active', 'retiring', 'retired')),
        created_at TEXT NOT NULL,
        activate_at TEXT,
        retire_at TEXT,
        longest_svid_ttl_seconds INTEGER
    ) STRICT;
    CREATE TABLE federations (
        trust_domain TEXT PRIMARY KEY,
        endpoint_url TEXT NOT NULL,
        profile TEXT NOT NULL CHECK (profile IN ('https_web', 'https_spiffe')),
        endpoint_spiffe_id TEXT,
        web_ca_pem TEXT,
        created_at TEXT NOT NULL,
        last_success_at TEXT,
        last_error TEXT
    ) STRICT;
    """,
    # 3: who the zone is, so an edit of zone.toml's name or trust_domain is caught (zone/__init__.py).
    """
    CREATE TABLE zone_identity (
        only INTEGER PRIMARY KEY CHECK (only = 1),
        name TEXT NOT NULL,
        trust_domain TEXT NOT NULL
    ) STRICT;
    """,
    # 4: a counter every change of trust_bundles moves, so a reader holding parsed bundles in memory
    # (zone/trust_store.py) asks one row whether they are current, whichever process wrote.
    """
    CREATE TABLE trust_revision (
        only INTEGER PRIMARY KEY CHECK (only = 1),
        revision INTEGER NOT NULL
    ) STRICT;
    INSERT INTO trust_revision VALUES (1, 0);
    CREATE TRIGGER trust_bundles_inserted AFTER INSERT ON trust_bundles
        BEGIN UPDATE trust_revision SET revision = revision + 1; END;
    CREATE TRIGGER trust_bundles_updated AFTER UPDATE ON trust_bundles
        BEGIN UPDATE trust_revision SET revision = revision + 1; END;
    CREATE TRIGGER trust_bundles_deleted AFTER DELETE ON trust_bundles
        BEGIN UPDATE trust_revision SET revision = revision + 1; END;
    """,
)

GenerationState = Literal["published", "active", "retiring", "retired"]
FederationProfile = Literal["https_web", "https_spiffe"]


@dataclass(frozen=True)
class CaGeneration:
    """One root + intermediate of the zone's CA and where it stands in its life.

    ``published``: in the bundle, not signing yet; ``active``: signs SVIDs;
    ``retiring``: still in the bundle while SVIDs it signed live; ``retired``:
    gone from the bundle, keys deleted.
    """

    generation: int
    directory: str
    root_fingerprint: str
    state: GenerationState
    created_at: dt.datetime
    activate_at: dt.datetime | None = None
    retire_at: dt.datetime | None = None
    longest_svid_ttl_seconds: int | None = None


@dataclass(frozen=True)
class Federation:
    """A relationship with another trust domain's bundle endpoint."""

    trust_domain: TrustDomain
    endpoint_url: str
    profile: FederationProfile
    endpoint_spiffe_id: str | None
    web_ca_pem: str | None
    created_at: dt.datetime
    last_success_at: dt.datetime | None = None
    last_error: str | None = None


@dataclass(frozen=True)
class StoredBundle:
    """A bundle with where it came from (``self``, ``import``, ...) and when it was stored."""

    bundle: TrustBundle
    source: str
    updated_at: dt.datetime


class StateStore(SqliteStore):
    """Typed access to ``state.db``. Use as a context manager; each method commits."""

    COMPONENT, MIGRATIONS = "trust", _MIGRATIONS

    def __init__(self, path: Path) -> None:
        super().__init__(path)

    def identity(self) -> tuple[str, str] | None:
        """The zone's name and trust domain as it was created (None: recorded by no version so far)."""
        row = self._db.execute("SELECT name, trust_domain FROM zone_identity").fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    def record_identity(self, name: str, trust_domain: str) -> None:
        """Record who the zone is; once, at its creation (or on the first open of a zone made before)."""
        with self._transaction():
            self._db.execute("INSERT INTO zone_identity VALUES (1, ?, ?)", (name, trust_domain))

    def put_bundle(self, bundle: TrustBundle, source: str) -> None:
        """Store ``bundle`` as the one bundle of its trust domain, replacing any earlier one."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO trust_bundles VALUES (?, ?, ?, ?) ON CONFLICT(trust_domain) DO UPDATE SET "
                "bundle_json=excluded.bundle_json, source=excluded.source, updated_at=excluded.updated_at",
                (
                    bundle.trust_domain.name,
                    bundle.to_spiffe_json(),
                    source,
                    _iso(dt.datetime.now(dt.UTC)),
                ),
            )

    def delete_bundle(self, trust_domain: TrustDomain, source: str) -> bool:
        """Remove ``trust_domain``'s bundle if it came from ``source``. True if one was removed."""
        with self._transaction():
            return (
                self._db.execute(
                    "DELETE FROM trust_bundles WHERE trust_domain = ? AND source = ?", (trust_domain.name, source)
                ).rowcount
                > 0
            )

    def bundle(self, trust_domain: TrustDomain) -> StoredBundle | None:
        """The stored bundle of ``trust_domain``, if any."""
        row = self._db.execute("SELECT * FROM trust_bundles WHERE trust_domain = ?", (trust_domain.name,)).fetchone()
        return None if row is None else _stored_bundle(row)

    def bundles(self) -> list[StoredBundle]:
        """Every stored bundle, ordered by trust domain."""
        rows = self._db.execute("SELECT * FROM trust_bundles ORDER BY trust_domain").fetchall()
        return [_stored_bundle(row) for row in rows]

    def trust_revision(self) -> int:
        """A number every insert, update or delete of a trust bundle moves on (in any process)."""
        return int(self._db.execute("SELECT revision FROM trust_revision").fetchone()[0])

    def ca_generations(self) -> list[CaGeneration]:
        """Every recorded CA generation, oldest first (none until the zone's first rotation)."""
        rows = self._db.execute("SELECT * FROM ca_generations ORDER BY generation").fetchall()
        return [
            CaGeneration(g, d, fp, state, _time(created), _maybe_time(act), _maybe_time(ret), ttl)
            for g, d, fp, state, created, act, ret, ttl in rows
        ]

    def put_ca_generation(self, generation: CaGeneration) -> None:
        """Insert or replace one generation's row."""
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO ca_generations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    generation.generation,
                    generation.directory,
                    generation.root_fingerprint,
                    generation.state,
                    _iso(generation.created_at),
                    _iso(generation.activate_at) if generation.activate_at else None,
                    _iso(generation.retire_at) if generation.retire_at else None,
                    generation.longest_svid_ttl_seconds,
                ),
            )

    def record_svid_ttl(self, generation: int, ttl_seconds: int) -> None:
        """Remember the longest TTL a generation has issued: its root must outlive those SVIDs."""
        with self._transaction():
            self._db.execute(
                "UPDATE ca_generations SET longest_svid_ttl_seconds = max(coalesce(longest_svid_ttl_seconds, 0), ?) "
                "WHERE generation = ?",
                (ttl_seconds, generation),
            )

    def put_federation(self, federation: Federation) -> None:
        """Create or replace the relationship with ``federation.trust_domain``."""
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO federations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    federation.trust_domain.name,
                    federation.endpoint_url,
                    federation.profile,
                    federation.endpoint_spiffe_id,
                    federation.web_ca_pem,
                    _iso(federation.created_at),
                    _iso(federation.last_success_at) if federation.last_success_at else None,
                    federation.last_error,
                ),
            )

    def federations(self) -> list[Federation]:
        """Every federation relationship, ordered by trust domain."""
        rows = self._db.execute("SELECT * FROM federations ORDER BY trust_domain").fetchall()
        return [
            Federation(TrustDomain.parse(td), url, profile, sid, web_ca, _time(created), _maybe_time(ok), error)
            for td, url, profile, sid, web_ca, created, ok, error in rows
        ]

    def federation(self, trust_domain: TrustDomain) -> Federation | None:
        """The relationship with ``trust_domain``, if any."""
        return next((f for f in self.federations() if f.trust_domain == trust_domain), None)

    def delete_federation(self, trust_domain: TrustDomain) -> bool:
        """End the relationship with ``trust_domain`` (its bundle stays). True if there was one."""
        with self._transaction():
            return self._db.execute("DELETE FROM federations WHERE trust_domain = ?", (trust_domain.name,)).rowcount > 0

    def federation_revision(self) -> tuple[tuple[object, ...], ...]:
        """What defines every relationship (not its poll outcomes): changes when one is added, re-pointed or ended."""
        return tuple(
            self._db.execute(
                "SELECT trust_domain, endpoint_url, profile, endpoint_spiffe_id, web_ca_pem, created_at "
                "FROM federations ORDER BY trust_domain"
            ).fetchall()
        )

    def record_poll(self, trust_domain: TrustDomain, at: dt.datetime, error: str | None) -> None:
        """Note the outcome of one poll: success time, or the error (the last success stays)."""
        with self._transaction():
            if error is None:
                self._db.execute(
                    "UPDATE federations SET last_success_at = ?, last_error = NULL WHERE trust_domain = ?",
                    (_iso(at), trust_domain.name),
                )
            else:
                self._db.execute(
                    "UPDATE federations SET last_error = ? WHERE trust_domain = ?", (error, trust_domain.name)
                )

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """Group several writes into one transaction (the methods called inside join it)."""
        with self._transaction():
            yield

    def _transaction(self) -> AbstractContextManager[None]:
        return transaction(self._db)


def _stored_bundle(row: tuple[str, bytes, str, str]) -> StoredBundle:
    trust_domain, bundle_json, source, updated_at = row
    return StoredBundle(_parsed_bundle(trust_domain, bytes(bundle_json)), source, dt.datetime.fromisoformat(updated_at))


@functools.lru_cache(maxsize=1024)
def _parsed_bundle(trust_domain: str, bundle_json: bytes) -> TrustBundle:
    # Bundles are stored in their SPIFFE wire form, so a stored bundle re-parses with the same checks as one
    # arriving from a peer. A parse depends on the bytes alone and a TrustBundle is immutable, so each
    # stored form is parsed once per process, not on every read (every reconfigure reads them all).
    return parse_bundle(TrustDomain.parse(trust_domain), bundle_json, check_root_names=False)


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat()


def _time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def _maybe_time(text: str | None) -> dt.datetime | None:
    return None if text is None else dt.datetime.fromisoformat(text)
