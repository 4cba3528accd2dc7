"""Imported services: what peers export to this zone, kept across restarts.

Each peer's latest :class:`ServiceSnapshot` is stored whole; an import is named
``<service>.<namespace>.<peer>``. A snapshot with a version no newer than the
stored one is a duplicate (a resumed stream may resend) and changes nothing.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from meshfed.errors import FederationError
from meshfed.federation.exchange import ExportedService, ServiceSnapshot
from meshfed.sqlite import SqliteStore, transaction

STATE_FILE = "state.db"

_MIGRATIONS = (
    """
    CREATE TABLE imported_snapshots (
        peer TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        snapshot BLOB NOT NULL,
        received_at TEXT NOT NULL
    ) STRICT;
    -- Egress ports are kept per listener so local clients keep their address across restarts.
    CREATE TABLE egress_ports (listener TEXT PRIMARY KEY, port INTEGER NOT NULL UNIQUE) STRICT;
    """,
)


@dataclass(frozen=True)
class ImportedService:
    """One service a peer exports to this zone."""

    peer: str
    snapshot: ServiceSnapshot
    service: ExportedService

    @property
    def name(self) -> str:
        """``<service>.<namespace>.<peer>``."""
        return f"{self.service.name}.{self.service.namespace}.{self.peer}"


class EgressPorts:
    """The port of each egress listener: the one it had before, else the lowest free one from ``base``.

    Loads the table once and assigns new ports from a cursor, so a config with
    10,000 imports costs one query, not one scan of the table per listener.
    """

    def __init__(self, db: sqlite3.Connection, base: int) -> None:
        self._db = db
        self._ports = {
            str(listener): int(port) for listener, port in db.execute("SELECT listener, port FROM egress_ports")
        }
        self._taken = set(self._ports.values())
        self._next = base
        self._new: dict[str, int] = {}

    def __call__(self, listener: str) -> int:
        port = self._ports.get(listener)
        if port is not None:
            return port
        while self._next in self._taken:
            self._next += 1
        if self._next > 65535:
            raise FederationError("no free egress port left above the base; lower the egress port base")
        port = self._ports[listener] = self._next
        self._taken.add(port)
        self._new[listener] = port
        return port

    def save(self) -> None:
        """Keep the ports assigned since the last save, so listeners keep their address across restarts."""
        if self._new:
            with transaction(self._db):
                self._db.executemany("INSERT OR IGNORE INTO egress_ports VALUES (?, ?)", self._new.items())
            self._new = {}


class ImportStore(SqliteStore):
    """Peers' snapshots in the zone's ``state.db``. Use as a context manager."""

    def __init__(self, zone_directory: Path) -> None:
        super().__init__(zone_directory / STATE_FILE, "imports", _MIGRATIONS)

    def put(self, peer: str, snapshot: ServiceSnapshot) -> bool:
        """Keep ``snapshot`` as ``peer``'s exports unless an equal or newer version is stored. True if stored."""
        with transaction(self._db):
            row = self._db.execute("SELECT version FROM imported_snapshots WHERE peer = ?", (peer,)).fetchone()
            if row is not None and row[0] >= snapshot.version:
                return False
            self._db.execute(
                "INSERT INTO imported_snapshots VALUES (?, ?, ?, ?) ON CONFLICT(peer) DO UPDATE SET "
                "version = excluded.version, snapshot = excluded.snapshot, received_at = excluded.received_at",
                (
                    peer,
                    snapshot.version,
                    snapshot.model_dump_json().encode(),
                    dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                ),
            )
        return True

    def remove(self, peer: str) -> bool:
        """Forget everything ``peer`` exported (the peering was deleted). True if anything went."""
        with transaction(self._db):
            return self._db.execute("DELETE FROM imported_snapshots WHERE peer = ?", (peer,)).rowcount > 0

    def egress_ports(self, base: int) -> EgressPorts:
        """Ports for egress listeners, from ``base`` up; call :meth:`EgressPorts.save` to keep new ones."""
        return EgressPorts(self._db, base)

    def snapshots(self) -> dict[str, ServiceSnapshot]:
        """The latest snapshot of every peer, by peer name."""
        rows = self._db.execute("SELECT peer, snapshot FROM imported_snapshots ORDER BY peer").fetchall()
        try:
            return {peer: ServiceSnapshot.model_validate_json(document) for peer, document in rows}
        except ValidationError as err:
            raise FederationError(
                f"a stored import is unreadable ({err.error_count()} errors); re-peer to refresh"
            ) from None

    def services(self) -> list[ImportedService]:
        """Every imported service, ordered by name."""
        imported = [
            ImportedService(peer, snapshot, service)
            for peer, snapshot in self.snapshots().items()
            for service in snapshot.services
        ]
        return sorted(imported, key=lambda item: item.name)
