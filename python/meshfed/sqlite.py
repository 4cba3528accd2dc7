"""SQLite the way meshfed uses it: WAL, per-component numbered migrations, explicit transactions.

Several components keep tables in one file (``state.db`` holds trust, peering
and export state). Each component has its own ordered list of migration
scripts, and the ``meshfed_schema`` table records how many of each have run,
so components evolve independently, an old zone directory upgrades in place,
and a newer one is refused rather than misread.

Every database is created here, and only its owner may read it (0600; SQLite
gives the ``-wal`` and ``-shm`` files the database's mode): ``state.db`` holds
token hashes and peers' topology, ``catalog.db`` the zone's endpoints. A file
made more open by an older meshfed is narrowed when it is next opened.
"""

from __future__ import annotations

import errno
import os
import secrets
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, closing, contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Protocol, Self

from meshfed.errors import ZoneError

DATABASE_MODE = 0o600
_SCHEMA_TABLE = "CREATE TABLE IF NOT EXISTS meshfed_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL)"


def open_database(path: Path, component: str, migrations: Sequence[str]) -> sqlite3.Connection:
    """Open (creating if needed) ``path`` and bring ``component``'s tables up to date.

    Refuses, in one line saying what to do, a file that is damaged (empty, not
    a database, corrupt) or that this process may not open.
    """
    db = connect(path)
    try:
        migrate(db, path, component, migrations)
    except BaseException:
        db.close()
        raise
    return db


def connect(path: Path) -> sqlite3.Connection:
    """A connection to ``path`` (created if missing) in WAL mode, with no component's tables brought up yet."""
    _create_if_missing(path)
    _refuse_empty(path)
    _restrict(path)
    db: sqlite3.Connection | None = None
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA foreign_keys=ON")
        # The CLI and the running controller may write the same file.
        db.execute("PRAGMA busy_timeout=5000")
        db.execute(_SCHEMA_TABLE)
    except sqlite3.Error as err:
        if db is not None:
            db.close()
        raise ZoneError(f"cannot open {path}: {describe_error(err, path)}") from None
    return db


def migrate(db: sqlite3.Connection, path: Path, component: str, migrations: Sequence[str]) -> None:
    """Bring ``component``'s tables in ``db`` (the file ``path``) up to date; refuse a newer schema."""
    try:
        row = db.execute("SELECT version FROM meshfed_schema WHERE component = ?", (component,)).fetchone()
    except sqlite3.Error as err:
        raise ZoneError(f"cannot open {path}: {describe_error(err, path)}") from None
    version = 0 if row is None else int(row[0])
    if version > len(migrations):
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
            raise ZoneError(
                f"cannot upgrade {path} ({component} schema {number}): {describe_error(err, path)}"
            ) from None


def describe_error(err: sqlite3.Error, path: Path | None = None) -> str:
    """What went wrong with a zone database and what to do about it, in one line.

    ``path`` is the file when known; errors raised by a query on an open
    connection (the CLI catches those) do not say which file they came from.
    """
    name = path.name if path is not None else "a zone database"
    primary = (err.sqlite_errorcode or 0) & 0xFF  # extended codes keep the primary one in the low byte
    if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return f"{name} is damaged ({err}): restore the zone directory from a backup"
    if primary == _SQLITE_FULL:
        return f"{err}: free space on the disk that holds the zone directory"
    if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return f"{err}: another meshfed process held a write for more than 5 s; retry"
    cause = _os_cause(path) if path is not None else None
    if cause is not None:
        return cause
    if primary == _SQLITE_READONLY:
        return f"{name} is read-only ({err}): give this user write access to the zone directory and its files"
    return f"{err}; is the zone directory readable and writable by this user?"


# SQLite's primary result codes (https://sqlite.org/rescode.html).
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 5, 6, 8
_SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_NOTADB = 11, 13, 26
_ERRNO_HINTS = {
    errno.EMFILE: "raise the open-file limit (ulimit -n)",
    errno.ENFILE: "the system is out of file handles; raise fs.file-max or close other programs",
    errno.EACCES: "run meshfed as the user that owns the zone directory",
    errno.EPERM: "run meshfed as the user that owns the zone directory",
    errno.EROFS: "the zone directory is on a read-only file system; mount it read-write",
    errno.ENOENT: "is --dir the zone directory?",
}


def _os_cause(path: Path) -> str | None:
    """Why the OS refuses ``path`` (SQLite only says "unable to open"), or None if it does not."""
    try:
        fd = os.open(path if path.exists() else path.parent, os.O_RDWR if path.exists() else os.O_RDONLY)
    except OSError as err:
        return _os_reason(err)
    os.close(fd)
    if not os.access(path.parent, os.W_OK):
        # WAL mode keeps state.db-wal and state.db-shm beside the file: the directory must be writable too.
        return f"{path.parent} is not writable by this user: {_ERRNO_HINTS[errno.EACCES]}"
    return None


def _os_reason(err: OSError) -> str:
    return f"{(err.strerror or str(err)).lower()}: {_ERRNO_HINTS.get(err.errno or 0, 'check the zone directory')}"


def _create_if_missing(path: Path) -> None:
    """Create a missing database beside its place, then link it in: a database never appears empty.

    SQLite creates an empty file at connect and writes its header a moment
    later; a process opening it in between could not tell it from a damaged
    one. Two processes creating at once both build one; the first link wins.
    """
    try:
        if path.exists():
            return
    except OSError as err:  # a directory on the way this user may not enter
        raise ZoneError(f"cannot open {path}: {_os_reason(err)}") from None
    staged = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.new")
    try:
        # Made 0600 before SQLite opens it, whatever the umask: SQLite keeps an existing file's mode.
        os.close(os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, DATABASE_MODE))
        with closing(sqlite3.connect(staged, isolation_level=None)) as db:
            db.execute("PRAGMA journal_mode=WAL")  # writes the header; the WAL goes when the connection closes
            db.execute(_SCHEMA_TABLE)
        try:
            os.link(staged, path)
        except FileExistsError:
            pass  # another process created it first: use theirs
        except OSError:
            # A file system without hard links (SMB, FAT): rename unless a creator got there first.
            if not path.exists():
                staged.rename(path)
    except sqlite3.Error as err:
        raise ZoneError(f"cannot create {path}: {_os_cause(path) or describe_error(err)}") from None
    except OSError as err:
        raise ZoneError(f"cannot create {path}: {_os_reason(err)}") from None
    finally:
        for leftover in (staged, staged.with_name(f"{staged.name}-wal"), staged.with_name(f"{staged.name}-shm")):
            with suppress(FileNotFoundError):
                leftover.unlink()


def _restrict(path: Path) -> None:
    """Narrow a database that others may read to 0600 (one made by an older meshfed, or copied in)."""
    for file in (path, path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")):
        try:
            if file.stat().st_mode & 0o777 & ~DATABASE_MODE:
                file.chmod(DATABASE_MODE)
        except FileNotFoundError:
            continue
        except OSError as err:  # another user's file: opening it says why, or works read-only
            if err.errno not in (errno.EPERM, errno.EACCES):
                raise ZoneError(f"cannot open {file}: {_os_reason(err)}") from None


def _refuse_empty(path: Path) -> None:
    """An existing empty file is damage, never a new database.

    SQLite would take it for an empty database and this component would
    recreate its tables in it, leaving a zone without its trust state.
    """
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ZoneError(f"cannot open {path}: {_os_reason(err)}") from None
    if size == 0:
        raise ZoneError(f"{path.name} is damaged (the file {path} is empty): restore the zone directory from a backup")


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


class Lender(Protocol):
    """What lends a store the one connection of a running zone to its file (:class:`meshfed.database.Database`)."""

    def lease(self, component: str, migrations: Sequence[str]) -> AbstractContextManager[sqlite3.Connection]: ...


# The lenders of the files a running zone holds open in this process, newest last, by absolute path.
_LENDERS: dict[str, list[Lender]] = {}


def lend(path: Path, lender: Lender) -> None:
    """From now on, stores of ``path`` made in this process borrow ``lender``'s connection."""
    _LENDERS.setdefault(str(path.absolute()), []).append(lender)


def stop_lending(path: Path, lender: Lender) -> None:
    key = str(path.absolute())
    lenders = _LENDERS.get(key, [])
    if lender in lenders:
        lenders.remove(lender)
    if not lenders:
        _LENDERS.pop(key, None)


class SqliteStore:
    """Base of the typed stores: one component's tables, used as a context manager.

    ``Store(path)`` opens a connection of its own (the CLI, while the zone is
    down), closed with the store. In the zone process, whose
    :class:`~meshfed.database.Database` lends its one connection to the file,
    the store borrows that connection for the ``with`` block instead, so every
    store of the process goes through it, one block at a time. :meth:`on`
    wraps a connection already in hand (a unit of work of that Database).
    """

    # Each store's component in meshfed_schema and its migrations (or passed to __init__).
    COMPONENT: ClassVar[str] = ""
    MIGRATIONS: ClassVar[Sequence[str]] = ()
    _db: sqlite3.Connection

    def __init__(self, path: Path, component: str | None = None, migrations: Sequence[str] | None = None) -> None:
        component = component or self.COMPONENT
        migrations = self.MIGRATIONS if migrations is None else migrations
        lenders = _LENDERS.get(str(path.absolute()))
        self._lease: AbstractContextManager[sqlite3.Connection] | None = None
        if lenders:
            self._lease, self._owned = lenders[-1].lease(component, migrations), False
        else:
            self._db, self._owned = open_database(path, component, migrations), True

    @classmethod
    def on(cls, db: sqlite3.Connection) -> Self:
        """This store over the borrowed connection ``db``, whose lender brought its tables up to date
        (:meth:`meshfed.database.Database.store`)."""
        assert cls.COMPONENT, f"{cls.__name__} names no COMPONENT"
        store = cls.__new__(cls)
        store._db, store._owned, store._lease = db, False, None
        return store

    def __enter__(self) -> Self:
        if self._lease is not None:
            self._db = self._lease.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._lease is not None:
            lease, self._lease = self._lease, None
            del self._db
            lease.__exit__(exc_type, exc, tb)
        self.close()

    def close(self) -> None:
        if self._owned:
            self._db.close()
