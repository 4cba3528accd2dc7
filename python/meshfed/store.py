"""The zone's durable state in SQLite: what must survive a restart.

One file (``state.db``) per zone. Schema changes are numbered migrations keyed
on ``PRAGMA user_version`` so an old zone directory upgrades in place.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from meshfed.errors import ZoneError
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
)


@dataclass(frozen=True)
class StoredBundle:
    """A bundle with where it came from (``self``, ``import``, ...) and when it was stored."""

    bundle: TrustBundle
    source: str
    updated_at: dt.datetime


class StateStore:
    """Typed access to ``state.db``. Use as a context manager; each method commits."""

    def __init__(self, path: Path) -> None:
        try:
            self._db = sqlite3.connect(path, isolation_level=None)
        except sqlite3.Error as err:
            raise ZoneError(f"cannot open state database {path}: {err}") from None
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

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
                    dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                ),
            )

    def bundle(self, trust_domain: TrustDomain) -> StoredBundle | None:
        """The stored bundle of ``trust_domain``, if any."""
        row = self._db.execute("SELECT * FROM trust_bundles WHERE trust_domain = ?", (trust_domain.name,)).fetchone()
        return None if row is None else _stored_bundle(row)

    def bundles(self) -> list[StoredBundle]:
        """Every stored bundle, ordered by trust domain."""
        rows = self._db.execute("SELECT * FROM trust_bundles ORDER BY trust_domain").fetchall()
        return [_stored_bundle(row) for row in rows]

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > len(_MIGRATIONS):
            raise ZoneError(
                f"state database schema {version} is newer than this meshfed understands "
                f"({len(_MIGRATIONS)}); upgrade meshfed"
            )
        for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
            with self._transaction():
                self._db.execute(script)
                self._db.execute(f"PRAGMA user_version = {number}")


def _stored_bundle(row: tuple[str, bytes, str, str]) -> StoredBundle:
    # Bundles are stored in their SPIFFE wire form, so a stored bundle re-parses
    # with the same checks as one arriving from a peer.
    trust_domain, bundle_json, source, updated_at = row
    bundle = parse_bundle(TrustDomain.parse(trust_domain), bundle_json)
    return StoredBundle(bundle, source, dt.datetime.fromisoformat(updated_at))
