"""A running zone's database: one connection, owned by one thread, and a change feed.

The zone process reads and writes each database file (``state.db``,
``catalog.db``) through one :class:`Database`: a single connection that only
its own thread touches, running units of work one at a time in the order they
were submitted. A unit is a function of the connection — typically a typed
store borrowed over it (``ExportRules.on``) — so a transaction never
interleaves with another unit's statements, and nothing reads or writes SQLite
on the event loop.

The change feed replaces per-table polling: :meth:`Database.changed` returns
once the file's content may have changed since a version the caller saw. It
learns of the zone's own commits from the connection's change count and of
other processes' commits (the CLI writing while the zone was thought down, or
a restored backup) from ``PRAGMA data_version``, which SQLite bumps exactly
when another connection commits; checking it reads no table.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from meshfed.sqlite import SqliteStore, connect

T = TypeVar("T")
S = TypeVar("S", bound=SqliteStore)

# How often a waiter on the change feed asks SQLite whether another process committed.
FEED_INTERVAL = 0.1


class Database:
    """One database file as the zone process uses it (see the module docstring); close it when done."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"db-{path.name}")
        self._db: sqlite3.Connection | None = None
        self._owner: int | None = None
        self._total_changes = 0
        self._data_version = 0
        # The version of the content as this process last knew it; grows on every change seen.
        self._version = 0
        self._closed = False
        # Opened on the owner thread: errors (a damaged file) surface here, to the caller.
        self._executor.submit(self._open).result()

    @property
    def version(self) -> int:
        """The content's version as last seen (compare with a later :meth:`changed`)."""
        return self._version

    async def run(self, unit: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``unit(connection)`` on the owner thread, after every unit submitted before it.

        Cancel-safe: a cancelled caller stops waiting; a unit already running
        finishes, and the connection is never closed under it.
        """
        return await asyncio.wrap_future(self._executor.submit(self._unit, unit))

    async def using(self, store: type[S], unit: Callable[[S], T]) -> T:
        """Run ``unit`` on ``store`` borrowed over the connection (one store's unit of work)."""
        return await self.run(lambda db: unit(store.on(db, self.path)))

    def call(self, unit: Callable[[sqlite3.Connection], T]) -> T:
        """:meth:`run` for code in a worker thread (blocking; inline on the owner thread). Never on the event loop."""
        if threading.get_ident() == self._owner:
            return self._unit(unit)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._executor.submit(self._unit, unit).result()
        raise RuntimeError(f"{self.path.name}: Database.call on the event loop would block it; await run() instead")

    async def changed(self, seen: int, timeout: float) -> int:
        """The version once it passes ``seen`` (what the caller last saw), or as it is after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._version <= seen:
            await self.run(self._check_others)
            remaining = deadline - loop.time()
            if self._version > seen or remaining <= 0:
                break
            await asyncio.sleep(min(FEED_INTERVAL, remaining))
        return self._version

    def close(self) -> None:
        """Close the connection after the units already submitted; later ones are refused."""
        if not self._closed:
            self._closed = True
            self._executor.submit(self._close)
            self._executor.shutdown(wait=True)

    # -- on the owner thread ---------------------------------------------------------------

    def _open(self) -> None:
        self._owner = threading.get_ident()
        self._db = connect(self.path)
        self._total_changes = self._db.total_changes
        self._data_version = self._read_data_version(self._db)

    def _unit(self, unit: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db
        assert db is not None, "the database is closed"
        try:
            return unit(db)
        finally:
            if db.total_changes != self._total_changes:
                self._total_changes = db.total_changes
                self._version += 1  # an int store: readers on the loop see the old or the new value

    def _check_others(self, db: sqlite3.Connection) -> None:
        data_version = self._read_data_version(db)
        if data_version != self._data_version:
            self._data_version = data_version
            self._version += 1

    @staticmethod
    def _read_data_version(db: sqlite3.Connection) -> int:
        (version,) = db.execute("PRAGMA data_version").fetchone()
        return int(version)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
