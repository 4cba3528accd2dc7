"""A running zone's database: one connection, owned by one thread, and a change feed.

The zone process reads and writes each database file (``state.db``,
``catalog.db``) through one :class:`Database`: a single connection, used by
one unit of work at a time in the order they were submitted, so a transaction
never interleaves with another's statements (one connection shared by threads
would let one thread's statement join another's transaction).

* :meth:`Database.run` and :meth:`Database.using` run a unit on the thread
  that owns the connection: what async code uses, so nothing waits on SQLite
  on the event loop.
* Every store made in the process while the Database is open
  (``with ExportRules(directory) as rules:`` in the zone, the API, the CLI
  code the API calls) borrows the connection for its ``with`` block
  (:meth:`Database.lease`): the owner thread hands it over and waits until
  the block ends. A store inside another's block, on the same thread, shares
  the lease. Synchronous code on the event loop waits for its turn, as it
  waited for SQLite before; it is meant for short reads.

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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from meshfed.sqlite import SqliteStore, connect, lend, migrate, stop_lending

T = TypeVar("T")
S = TypeVar("S", bound=SqliteStore)

# How often a waiter on the change feed asks SQLite whether another process committed (the CLI
# writing the embedded catalog, say). Each ask is one PRAGMA on the owner thread, some tens of
# microseconds: at 40 a second an idle zone spends well under 1 % of a core, and a change made
# elsewhere is seen 12 ms later on average (at 0.1 s it was 50 ms, a third of a change's way to peers).
FEED_INTERVAL = 0.025


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
        # The thread using the connection now (the owner's during a unit, a borrower's during a lease).
        self._holder: int | None = None
        self._migrated: set[str] = set()
        # Opened on the owner thread: errors (a damaged file) surface here, to the caller.
        self._executor.submit(self._open).result()
        lend(path, self)

    @property
    def version(self) -> int:
        """The content's version as last seen (compare with a later :meth:`changed`)."""
        return self._version

    async def run(self, unit: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``unit(connection)`` on the owner thread, after every unit submitted before it.

        Cancel-safe: a cancelled caller stops waiting; a unit already running
        finishes, and the connection is never closed under it.
        """
        return await asyncio.wrap_future(self._executor.submit(self._unit, unit, None))

    async def using(self, store: type[S], unit: Callable[[S], T]) -> T:
        """Run ``unit`` on ``store`` borrowed over the connection (one store's unit of work)."""
        return await self.run(lambda _: unit(self.store(store)))

    def store(self, cls: type[S]) -> S:
        """``cls`` over the connection, its tables brought up to date once per process: inside a unit
        (:meth:`run`) only, where the connection is the unit's."""
        assert threading.get_ident() == self._owner, "Database.store is for units (Database.run)"
        return cls.on(self._connection(cls.COMPONENT, cls.MIGRATIONS))

    @contextmanager
    def lease(self, component: str = "", migrations: Sequence[str] = ()) -> Iterator[sqlite3.Connection]:
        """The connection, for this thread alone until the block ends (after every unit submitted before).

        ``component``'s tables are brought up to date on first use. Blocking:
        on the event loop, only for short work (see the module docstring).
        """
        me = threading.get_ident()
        if self._holder == me:  # a store within another's block, or a store made inside a unit
            yield self._connection(component, migrations)
            return
        granted, released = threading.Event(), threading.Event()

        def hold(db: sqlite3.Connection) -> None:
            granted.set()
            released.wait()

        held = self._executor.submit(self._unit, hold, me)
        granted.wait()
        try:
            yield self._connection(component, migrations)
        finally:
            released.set()
            held.result()

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
            stop_lending(self.path, self)  # stores made from now on open connections of their own
            self._executor.submit(self._close)
            self._executor.shutdown(wait=True)

    # -- on the owner thread ---------------------------------------------------------------

    def _open(self) -> None:
        self._owner = threading.get_ident()
        self._db = connect(self.path)
        self._total_changes = self._db.total_changes
        self._data_version = self._read_data_version(self._db)

    def _unit(self, unit: Callable[[sqlite3.Connection], T], holder: int | None) -> T:
        db = self._db
        assert db is not None, "the database is closed"
        self._holder = self._owner if holder is None else holder
        try:
            return unit(db)
        finally:
            self._holder = None
            if db.total_changes != self._total_changes:
                self._total_changes = db.total_changes
                self._version += 1  # an int store: readers on the loop see the old or the new value

    def _connection(self, component: str, migrations: Sequence[str]) -> sqlite3.Connection:
        """The connection, ``component``'s tables up to date (by the thread holding it)."""
        assert self._db is not None, "the database is closed"
        if component and component not in self._migrated:
            migrate(self._db, self.path, component, migrations)
            self._migrated.add(component)
        return self._db

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
