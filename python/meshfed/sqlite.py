"""SQLite the way meshfed uses it: WAL, per-component numbered migrations, explicit transactions.

Several components keep tables in one file (``state.db`` holds trust, peering
and export state). Each component has its own ordered list of migration
scripts, and the ``meshfed_schema`` table records how many of each have run,
so components evolve independently, an old zone directory upgrades in place,
and a newer one is refused rather than misread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self

from meshfed.errors import ZoneError

_SCHEMA_TABLE = "CREATE TABLE IF NOT EXISTS meshfed_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL)"


def open_database(path: Path, component: str, migrations: Sequence[str]) -> sqlite3.Connection:
    """Open (creating if needed) ``path`` and bring ``component``'s tables up to date."""
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA foreign_keys=ON")
        # The CLI and the running controller may write the same file.
        db.execute("PRAGMA busy_timeout=5000")
        db.execute(_SCHEMA_TABLE)
        row = db.execute("SELECT version FROM meshfed_schema WHERE component = ?", (component,)).fetchone()
    except sqlite3.Error as err:
        raise ZoneError(f"cannot open database {path}: {err}; is the zone directory readable?") from None
    version = 0 if row is None else int(row[0])
    if version > len(migrations):
        db.close()
        raise ZoneError(
            f"{path}: {component} schema {version} is newer than this meshfed understands "
            f"({len(migrations)}); upgrade meshfed"
        )
    for number, script in enumerate(migrations[version:], start=version + 1):
        try:
            # executescript: a migration may hold several statements; it stays one transaction.
            db.executescript(
                f"BEGIN IMMEDIATE;\n{script}\n"
                f"INSERT INTO meshfed_schema VALUES ('{component}', {number}) "
                f"ON CONFLICT(component) DO UPDATE SET version = excluded.version;\nCOMMIT;"
            )
        except sqlite3.Error as err:
            if db.in_transaction:
                db.execute("ROLLBACK")
            db.close()
            raise ZoneError(f"cannot upgrade {path} ({component} schema {number}): {err}") from None
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, taken up front so concurrent writers queue instead of failing late.

    Nested use joins the outer transaction, which commits or rolls back for all.
    """
    if db.in_transaction:
        yield
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class SqliteStore:
    """Base of the typed stores: one connection to one component's tables, used as a context manager."""

    def __init__(self, path: Path, component: str, migrations: Sequence[str]) -> None:
        self._db = open_database(path, component, migrations)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()
