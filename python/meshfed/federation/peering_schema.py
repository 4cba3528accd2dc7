"""The peering tables of ``state.db`` (``peerings``, ``peering_tokens``, ``peering_listener``): their
migrations, their columns, and how a :class:`~meshfed.federation.peering_state.Peering` becomes a row and back.

Only :mod:`meshfed.federation.peering_store` reads and writes them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import orjson
from pydantic import ValidationError

from meshfed.federation.exchange import ServiceSnapshot
from meshfed.federation.peering_state import Peering, PeerState
from meshfed.federation.service_rows import ServiceRows, head_of

COMPONENT = "peering"

# Each peering's sent and received snapshots' services, in chunks (``side``: 'sent' or 'received').
SERVICE_ROWS = ServiceRows(
    "peering_services",
    (
        "peer TEXT NOT NULL REFERENCES peerings(name) ON DELETE CASCADE",
        "side TEXT NOT NULL CHECK (side IN ('sent', 'received'))",
    ),
)
# Where the running peering service listens and whether it lives: not the zone's state, so a copy of
# the zone made for another process (meshfed.replica) leaves its rows out.
PROCESS_TABLES = ("peering_listener",)
# Columns of the zone's peerings that the running service rewrites every poll (its streams' connection
# and heartbeat times): writing them alone is no change of the peering (its updated_at stays), and a copy
# sets them to these values, so an idle zone's copies stay the same bytes.
PROCESS_COLUMNS: dict[str, dict[str, object]] = {
    "peerings": {
        "last_connected_at": None,
        "last_heartbeat_sent_at": None,
        "last_heartbeat_received_at": None,
        "connected": 0,
    }
}
SNAPSHOT_SIDES = {"sent_snapshot": "sent", "received_snapshot": "received"}

MIGRATIONS = (
    """
    CREATE TABLE peerings (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('acceptor', 'dialer')),
        state TEXT NOT NULL CHECK (state IN ('PENDING', 'ESTABLISHING', 'ACTIVE', 'FAILING', 'TERMINATED')),
        state_reason TEXT NOT NULL DEFAULT '',
        delete_requested INTEGER NOT NULL DEFAULT 0,
        peer_zone TEXT,
        peer_trust_domain TEXT UNIQUE,
        peer_addresses TEXT NOT NULL DEFAULT '[]',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        sent_version INTEGER NOT NULL DEFAULT 0,
        sent_snapshot TEXT,
        acked_version INTEGER NOT NULL DEFAULT 0,
        received_version INTEGER NOT NULL DEFAULT 0,
        received_snapshot TEXT,
        last_connected_at TEXT,
        last_heartbeat_sent_at TEXT,
        last_heartbeat_received_at TEXT
    ) STRICT;
    CREATE TABLE peering_tokens (
        secret_hash TEXT PRIMARY KEY,
        peer_name TEXT NOT NULL REFERENCES peerings(name) ON DELETE CASCADE,
        issued_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        used_at TEXT
    ) STRICT;
    CREATE TABLE peering_listener (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        establish_addresses TEXT NOT NULL,
        stream_addresses TEXT NOT NULL,
        alive_at TEXT NOT NULL
    ) STRICT;
    """,
    # Service counts beside the snapshots: status reads (every poll, every scrape) need only the
    # counts, and parsing a 10,000-service snapshot costs tens of milliseconds.
    """
    ALTER TABLE peerings ADD COLUMN sent_services INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE peerings ADD COLUMN received_services INTEGER NOT NULL DEFAULT 0;
    UPDATE peerings SET
        sent_services = coalesce(json_array_length(sent_snapshot, '$.services'), 0),
        received_services = coalesce(json_array_length(received_snapshot, '$.services'), 0);
    """,
    # 3: a DISCONNECTED state (the stream dropped; FAILING once the deadline passes), export epochs
    # (a sender whose history went backwards starts a new one), the peer's refusal of our exports,
    # and which of our bundles the peer confirmed holding (rotation must not partition it).
    # SQLite cannot alter a CHECK: the table is rebuilt. The tokens go first and come back after,
    # so dropping the old peerings cascades to nothing.
    """
    CREATE TEMP TABLE peering_tokens_kept AS SELECT * FROM peering_tokens;
    DROP TABLE peering_tokens;
    CREATE TABLE peerings_next (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('acceptor', 'dialer')),
        state TEXT NOT NULL CHECK (
            state IN ('PENDING', 'ESTABLISHING', 'ACTIVE', 'DISCONNECTED', 'FAILING', 'TERMINATED')
        ),
        state_reason TEXT NOT NULL DEFAULT '',
        delete_requested INTEGER NOT NULL DEFAULT 0,
        peer_zone TEXT,
        peer_trust_domain TEXT UNIQUE,
        peer_addresses TEXT NOT NULL DEFAULT '[]',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        sent_version INTEGER NOT NULL DEFAULT 0,
        sent_snapshot TEXT,
        acked_version INTEGER NOT NULL DEFAULT 0,
        received_version INTEGER NOT NULL DEFAULT 0,
        received_snapshot TEXT,
        last_connected_at TEXT,
        last_heartbeat_sent_at TEXT,
        last_heartbeat_received_at TEXT,
        sent_services INTEGER NOT NULL DEFAULT 0,
        received_services INTEGER NOT NULL DEFAULT 0,
        sent_epoch TEXT NOT NULL DEFAULT '',
        received_epoch TEXT NOT NULL DEFAULT '',
        refused_reason TEXT NOT NULL DEFAULT '',
        peer_bundle_sequence INTEGER NOT NULL DEFAULT 0
    ) STRICT;
    INSERT INTO peerings_next (
        name, role, state, state_reason, delete_requested, peer_zone, peer_trust_domain, peer_addresses,
        created_at, updated_at, sent_version, sent_snapshot, acked_version, received_version, received_snapshot,
        last_connected_at, last_heartbeat_sent_at, last_heartbeat_received_at, sent_services, received_services
    ) SELECT
        name, role, state, state_reason, delete_requested, peer_zone, peer_trust_domain, peer_addresses,
        created_at, updated_at, sent_version, sent_snapshot, acked_version, received_version, received_snapshot,
        last_connected_at, last_heartbeat_sent_at, last_heartbeat_received_at, sent_services, received_services
    FROM peerings;
    DROP TABLE peerings;
    ALTER TABLE peerings_next RENAME TO peerings;
    CREATE TABLE peering_tokens (
        secret_hash TEXT PRIMARY KEY,
        peer_name TEXT NOT NULL REFERENCES peerings(name) ON DELETE CASCADE,
        issued_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        used_at TEXT
    ) STRICT;
    INSERT INTO peering_tokens SELECT * FROM peering_tokens_kept;
    DROP TABLE peering_tokens_kept;
    """,
    # 4: whether the stream is up now, written by the running peering service for readers in other processes.
    """
    ALTER TABLE peerings ADD COLUMN connected INTEGER NOT NULL DEFAULT 0;
    """,
    # 5: the sent and received snapshots as a head (in the old columns) and chunks of their services
    # (federation/service_rows.py): a change of one service writes one chunk, not the whole snapshot.
    # What was stored becomes one chunk.
    # The rows go with their peering (a rebuild of peerings, as in 3, must keep them aside first).
    SERVICE_ROWS.ddl  # noqa: S608 -- fixed table and column names
    + """
    INSERT INTO peering_services SELECT name, 'sent', 0, json_extract(sent_snapshot, '$.services') FROM peerings
    WHERE json_valid(sent_snapshot) AND json_type(sent_snapshot, '$.services') = 'array';
    INSERT INTO peering_services
    SELECT name, 'received', 0, json_extract(received_snapshot, '$.services') FROM peerings
    WHERE json_valid(received_snapshot) AND json_type(received_snapshot, '$.services') = 'array';
    UPDATE peerings SET sent_snapshot = json_remove(sent_snapshot, '$.services') WHERE json_valid(sent_snapshot);
    UPDATE peerings SET received_snapshot = json_remove(received_snapshot, '$.services')
    WHERE json_valid(received_snapshot);
    """,
)

# Fixed column names, never user input: the store's f-strings build no SQL from data.
COLUMNS = (
    "name, role, state, state_reason, delete_requested, peer_zone, peer_trust_domain, peer_addresses, "
    "created_at, updated_at, sent_version, sent_snapshot, acked_version, received_version, received_snapshot, "
    "last_connected_at, last_heartbeat_sent_at, last_heartbeat_received_at, sent_services, received_services, "
    "sent_epoch, received_epoch, refused_reason, peer_bundle_sequence, connected"
)
# The same columns with the snapshots left out (NULL): what status reads need.
LIGHT = COLUMNS.replace("sent_snapshot", "NULL").replace("received_snapshot", "NULL")
COLUMN_COUNT = COLUMNS.count(",") + 1
COLUMN_INDEX = {column.strip(): index for index, column in enumerate(COLUMNS.split(","))}
UPDATE_ALL = ", ".join(f"{c.strip()} = excluded.{c.strip()}" for c in COLUMNS.split(",")[1:])
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def peering_row(p: Peering) -> tuple[object, ...]:
    """The values of :data:`COLUMNS` for ``p``, in that order (the snapshots' heads: their services are
    rows of :data:`SERVICE_ROWS`)."""
    return (
        p.name,
        p.role,
        p.state.value,
        p.state_reason,
        int(p.delete_requested),
        p.peer_zone,
        p.peer_trust_domain,
        orjson.dumps(list(p.peer_addresses)).decode(),
        iso(p.created_at),
        iso(p.updated_at),
        p.sent_version,
        head_of(p.sent_snapshot) if p.sent_snapshot else None,
        p.acked_version,
        p.received_version,
        head_of(p.received_snapshot) if p.received_snapshot else None,
        maybe_iso(p.last_connected_at),
        maybe_iso(p.last_heartbeat_sent_at),
        maybe_iso(p.last_heartbeat_received_at),
        len(p.sent_snapshot.services) if p.sent_snapshot else 0,
        len(p.received_snapshot.services) if p.received_snapshot else 0,
        p.sent_epoch,
        p.received_epoch,
        p.refused_reason,
        p.peer_bundle_sequence,
        int(p.connected),
    )


def peering_from_row(row: tuple[object, ...]) -> Peering:
    """The peering of a row of :data:`COLUMNS` (or :data:`LIGHT`), each snapshot column a whole document."""
    (
        name,
        role,
        state,
        reason,
        delete_requested,
        peer_zone,
        peer_td,
        addresses,
        created,
        updated,
        sent_version,
        sent_snapshot,
        acked_version,
        received_version,
        received_snapshot,
        connected,
        hb_sent,
        hb_received,
        sent_services,
        received_services,
        sent_epoch,
        received_epoch,
        refused_reason,
        peer_bundle_sequence,
        connected_now,
    ) = row
    return Peering(
        name=str(name),
        role="acceptor" if role == "acceptor" else "dialer",
        state=PeerState(str(state)),
        state_reason=str(reason),
        delete_requested=bool(delete_requested),
        peer_zone=None if peer_zone is None else str(peer_zone),
        peer_trust_domain=None if peer_td is None else str(peer_td),
        peer_addresses=tuple(orjson.loads(str(addresses))),
        created_at=from_iso(created),
        updated_at=from_iso(updated),
        sent_version=int(str(sent_version)),
        sent_snapshot=_stored_snapshot(sent_snapshot),
        acked_version=int(str(acked_version)),
        received_version=int(str(received_version)),
        received_snapshot=_stored_snapshot(received_snapshot),
        last_connected_at=maybe_from_iso(connected),
        last_heartbeat_sent_at=maybe_from_iso(hb_sent),
        last_heartbeat_received_at=maybe_from_iso(hb_received),
        sent_services=int(str(sent_services)),
        received_services=int(str(received_services)),
        sent_epoch=str(sent_epoch),
        received_epoch=str(received_epoch),
        refused_reason=str(refused_reason),
        peer_bundle_sequence=int(str(peer_bundle_sequence)),
        connected=bool(connected_now),
    )


def _stored_snapshot(document: object) -> ServiceSnapshot | None:
    """A stored snapshot, or None if it no longer parses (written by an older meshfed with looser rules,
    or damaged): the link then asks the peer for everything again instead of failing to start."""
    if document is None:
        return None
    try:
        return ServiceSnapshot.model_validate_json(str(document))
    except ValidationError:
        return None


def _moment(value: object) -> str | None:
    return maybe_iso(value if isinstance(value, dt.datetime) else None)


def _state(value: object) -> str:
    return PeerState(str(value)).value


# How each updatable field is stored (the column has the field's name); the snapshots are
# SNAPSHOT_SIDES, stored by SERVICE_ROWS.
WRITERS: dict[str, Callable[[object], object]] = {
    "state": _state,
    "state_reason": str,
    "delete_requested": lambda value: int(bool(value)),
    "sent_version": lambda value: int(str(value)),
    "acked_version": lambda value: int(str(value)),
    "received_version": lambda value: int(str(value)),
    "last_connected_at": _moment,
    "last_heartbeat_sent_at": _moment,
    "last_heartbeat_received_at": _moment,
    "sent_epoch": str,
    "received_epoch": str,
    "refused_reason": str,
    "peer_bundle_sequence": lambda value: int(str(value)),
    "connected": lambda value: int(bool(value)),
    "peer_addresses": lambda value: orjson.dumps(list(value)).decode(),  # type: ignore[call-overload]
}
# Snapshot fields and the count column kept with each.
COUNTED = {"sent_snapshot": "sent_services", "received_snapshot": "received_services"}


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def maybe_iso(moment: dt.datetime | None) -> str | None:
    return None if moment is None else iso(moment)


def from_iso(text: object) -> dt.datetime:
    return dt.datetime.fromisoformat(str(text))


def maybe_from_iso(text: object) -> dt.datetime | None:
    return None if text is None else from_iso(text)


__all__ = [
    "COLUMNS",
    "COLUMN_COUNT",
    "COLUMN_INDEX",
    "COMPONENT",
    "COUNTED",
    "EPOCH",
    "LIGHT",
    "MIGRATIONS",
    "SERVICE_ROWS",
    "SNAPSHOT_SIDES",
    "UPDATE_ALL",
    "WRITERS",
    "from_iso",
    "iso",
    "maybe_from_iso",
    "maybe_iso",
    "now",
    "peering_from_row",
    "peering_row",
]
