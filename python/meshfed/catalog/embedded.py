"""The embedded catalog: services registered by CLI or API, kept in SQLite.

It lives in the zone directory as ``catalog.db``, apart from ``state.db``: it
is a catalog *source*, like a Consul datacenter or a Kubernetes API would be,
so a zone that reads Consul simply has no such file. Every write bumps one
version number, and each service row keeps the version that last wrote it.
:class:`EmbeddedCatalog` is the store (the CLI and the API write it);
:class:`EmbeddedCatalogSource` is the running zone's source over its one
connection to the file: it follows the database's change feed and, when the
version moved, reads every row's key and version but the documents only of the
rows written since its last read, and parses only those (the others are the
previous snapshot's objects, shared: one endpoint registered in a catalog of
10,000 services reads and parses one service, not 10,000 — 48 ms before —,
and holds one catalog in memory, not two).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

from pydantic import ValidationError

from meshfed.catalog.model import CatalogSnapshot, LocalImport, Service
from meshfed.database import Database
from meshfed.errors import CatalogError
from meshfed.sqlite import SqliteStore, transaction
from meshfed.validation import describe_validation_error

CATALOG_FILE = "catalog.db"

_MIGRATIONS = (
    """
    CREATE TABLE services (
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        document BLOB NOT NULL,
        PRIMARY KEY (namespace, name)
    ) STRICT;
    CREATE TABLE catalog_version (only INTEGER PRIMARY KEY CHECK (only = 1), version INTEGER NOT NULL) STRICT;
    INSERT INTO catalog_version VALUES (1, 0);
    """,
    # The catalog version that last wrote each row (0: before this column), so a reader that holds
    # the catalog at version v reads the documents of the rows written after v only.
    """
    ALTER TABLE services ADD COLUMN changed INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX services_by_change ON services (changed);
    """,
)

Key = tuple[str, str]
"""(namespace, name) of a service."""


class EmbeddedCatalog(SqliteStore):
    """The embedded catalog of one zone directory. Use as a context manager."""

    COMPONENT, MIGRATIONS = "catalog", _MIGRATIONS

    def __init__(self, zone_directory: Path) -> None:
        super().__init__(zone_directory / CATALOG_FILE)

    def register(self, service: Service) -> int:
        """Add or replace ``service`` (with all its endpoints). Returns the new catalog version."""
        with transaction(self._db):
            version = self._bump()
            self._db.execute(
                "INSERT INTO services (namespace, name, document, changed) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(namespace, name) DO UPDATE SET document = excluded.document, changed = excluded.changed",
                # Defaults left out: half the bytes, and parsed endpoints share the default values.
                (service.namespace, service.name, service.model_dump_json(exclude_defaults=True).encode(), version),
            )
            return version

    def deregister(self, namespace: str, name: str) -> int:
        """Remove a service. Returns the new catalog version."""
        with transaction(self._db):
            removed = self._db.execute(
                "DELETE FROM services WHERE namespace = ? AND name = ?", (namespace, name)
            ).rowcount
            if not removed:
                raise CatalogError(f"no service {name}.{namespace} in the embedded catalog; see 'meshfed service list'")
            return self._bump()

    def load(self) -> CatalogSnapshot:
        """Every service, consistently at one version."""
        return parse_catalog(*self.documents())

    def documents(self) -> tuple[int, list[bytes]]:
        """The version and every service's document, consistently, unparsed (see :func:`parse_catalog`)."""
        with transaction(self._db):
            (version,) = self._db.execute("SELECT version FROM catalog_version").fetchone()
            rows = self._db.execute("SELECT document FROM services ORDER BY namespace, name").fetchall()
        return int(version), [bytes(document) for (document,) in rows]

    def written_since(self, since: int) -> tuple[int, list[Key], dict[Key, bytes]]:
        """Consistently: the version, every service's key in order, and the documents of the services
        written after version ``since`` (all of them for -1)."""
        with transaction(self._db):
            (version,) = self._db.execute("SELECT version FROM catalog_version").fetchone()
            keys = self._db.execute("SELECT namespace, name FROM services ORDER BY namespace, name").fetchall()
            written = self._db.execute(
                "SELECT namespace, name, document FROM services WHERE changed > ?", (since,)
            ).fetchall()
        return int(version), keys, {(namespace, name): bytes(document) for namespace, name, document in written}

    def version(self) -> int:
        (version,) = self._db.execute("SELECT version FROM catalog_version").fetchone()
        return int(version)

    def _bump(self) -> int:
        self._db.execute("UPDATE catalog_version SET version = version + 1")
        return self.version()


class EmbeddedCatalogSource:
    """The embedded catalog as the running zone's catalog source (see the module docstring)."""

    def __init__(self, zone_directory: Path) -> None:
        self._path = zone_directory / CATALOG_FILE
        self._db = Database(self._path)
        self._last: CatalogSnapshot | None = None
        # The last snapshot's services by key, and the catalog version they were read at.
        self._services: dict[Key, Service] = {}
        self._read_at = -1  # nothing read yet: every document
        self._feed_seen = -1  # never seen: the first watch reads the version

    async def snapshot(self) -> CatalogSnapshot:
        self._feed_seen = self._db.version
        read = await self._read(self._read_at)
        if read is None:  # the file went back (restored from a backup, say): read all of it again
            read = await self._read(-1)
            assert read is not None
        last, self._services = read
        self._last, self._read_at = last, last.version
        return last

    async def _read(self, since: int) -> tuple[CatalogSnapshot, dict[Key, Service]] | None:
        version, keys, written = await self._db.run(lambda _: self._db.store(EmbeddedCatalog).written_since(since))
        if version < since:
            return None
        # Parsed off the unit: thousands of services take a second, and the unit holds the connection.
        return await asyncio.to_thread(_parse_written, version, keys, written, self._services)

    async def watch(self, since: int, timeout: float) -> CatalogSnapshot:
        """Return once the version passes ``since``, or the current snapshot after ``timeout`` seconds.

        The services are read again only when the catalog's version moved: an
        idle zone with thousands of services reads one integer per change-feed beat.
        """
        if self._last is not None and self._last.version > since:
            return self._last
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._feed_seen = await self._db.changed(self._feed_seen, max(deadline - loop.time(), 0.0))
            version = await self._db.run(lambda _: self._db.store(EmbeddedCatalog).version())
            last = self._last
            if last is None or version != last.version:
                last = await self.snapshot()
            if last.version > since or loop.time() >= deadline:
                return last

    async def publish_imports(self, imports: list[LocalImport]) -> None:
        """Nothing to do: ``meshfed catalog list`` reads imports from the zone's state."""

    async def aclose(self) -> None:
        self._db.close()

    @property
    def last_error(self) -> str | None:
        """Never set: the embedded catalog is a local file, and a failed read raises at once."""
        return None


def parse_catalog(version: int, documents: list[bytes]) -> CatalogSnapshot:
    """The catalog at ``version`` from its services' stored documents."""
    try:
        return CatalogSnapshot(version=version, services=[Service.model_validate_json(d) for d in documents])
    except ValidationError as err:
        raise _unreadable(err) from None


def _parse_written(
    version: int, keys: list[Key], written: Mapping[Key, bytes], known: Mapping[Key, Service]
) -> tuple[CatalogSnapshot, dict[Key, Service]] | None:
    """The catalog at ``version``: the services of ``keys``, parsed from ``written`` where given, else those
    of ``known`` (services are frozen, so sharing them is safe); and the new map by key. None if a service
    is in neither (the file is not the one ``known`` was read from)."""
    services: dict[Key, Service] = {}
    try:
        for key in keys:
            document = written.get(key)
            if document is not None:
                services[key] = Service.model_validate_json(document)
            elif (held := known.get(key)) is not None:
                services[key] = held
            else:
                return None
    except ValidationError as err:
        raise _unreadable(err) from None
    return CatalogSnapshot(version=version, services=list(services.values())), services


def _unreadable(err: ValidationError) -> CatalogError:
    return CatalogError(
        f"the embedded catalog holds an unreadable service ({describe_validation_error(err)}); register "
        "it again with 'meshfed service register', or restore catalog.db from a backup"
    )
