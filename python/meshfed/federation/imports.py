"""Imported services: what peers export to this zone, kept across restarts.

Each peer's latest :class:`ServiceSnapshot` is stored whole; an import is named
``<service>.<namespace>.<peer>``. A snapshot with a version no newer than the
stored one is a duplicate (a resumed stream may resend) and changes nothing.
"""

from __future__ import annotations

import datetime as dt
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

    def egress_port(self, listener: str, base: int) -> int:
        """The port of an egress listener: the one it had before, else the lowest free one from ``base``."""
        with transaction(self._db):
            row = self._db.execute("SELECT port FROM egress_ports WHERE listener = ?", (listener,)).fetchone()
            if row is not None:
                return int(row[0])
            taken = {port for (port,) in self._db.execute("SELECT port FROM egress_ports")}
            port = next((candidate for candidate in range(base, 65536) if candidate not in taken), None)
            if port is None:
                raise FederationError(f"no free egress port at or above {base}; lower the egress port base")
            self._db.execute("INSERT INTO egress_ports VALUES (?, ?)", (listener, port))
        return port

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
