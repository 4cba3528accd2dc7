"""SQLite the way meshfed uses it: WAL, numbered migrations, explicit transactions.

Each database file has one ordered list of migration scripts; ``PRAGMA
user_version`` records how many have run, so an old zone directory upgrades in
place and a newer one is refused rather than misread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from meshfed.errors import ZoneError


def open_database(path: Path, migrations: Sequence[str]) -> sqlite3.Connection:
    """Open (creating if needed) ``path`` and bring its schema up to date."""
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA foreign_keys=ON")
        # A CLI write and the running controller may meet on the same file.
        db.execute("PRAGMA busy_timeout=5000")
        (version,) = db.execute("PRAGMA user_version").fetchone()
    except sqlite3.Error as err:
        raise ZoneError(f"cannot open database {path}: {err}; is the zone directory readable?") from None
    if version > len(migrations):
        db.close()
        raise ZoneError(
            f"{path} has schema {version}, newer than this meshfed understands ({len(migrations)}); upgrade meshfed"
        )
    for number, script in enumerate(migrations[version:], start=version + 1):
        try:
            # executescript: a migration may hold several statements; it stays one transaction.
            db.executescript(f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")
        except sqlite3.Error as err:
            if db.in_transaction:
                db.execute("ROLLBACK")
            db.close()
            raise ZoneError(f"cannot upgrade {path} to schema {number}: {err}") from None
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, taken up front so concurrent writers queue instead of failing late."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
