"""Peerings and their durable state: tables ``peerings``, ``peering_tokens`` and ``peering_listener`` in ``state.db``.

A peering is named locally (the acceptor names it when it issues a token; the
dialer names it when it establishes). Its life::

    PENDING      (acceptor) a token was issued; nobody has redeemed it yet
    ESTABLISHING bundles exchanged; the stream has not said hello yet
    ACTIVE       the stream is up and heartbeats arrive
    DISCONNECTED the stream dropped (the reason says why); the dialer is reconnecting
    FAILING      no message from the peer within its heartbeat deadline
    TERMINATED   the peer deleted the peering, or a local delete awaits the controller

A PENDING peering whose token expired unredeemed is gone: reads leave it out
at once, so ``peer list`` never shows an offer nobody can take any more, and
a new ``peer token`` starts a fresh one. The running peering service deletes
the row (with its tokens) :data:`EXPIRED_PENDING_KEPT` after the expiry; until
then a late redemption is told the token expired, not that it is unknown. A TERMINATED peering (the peer ended
it; its imports and the trust it brought are withdrawn already) no longer
holds its name or trust domain: ``peer token`` or ``peer establish`` with
either replaces it by a new peering. One being deleted locally
(``delete_requested``) waits for the running zone to tell the peer first.

``connected`` is whether the stream is up, as the running peering service
last wrote it (every poll); readers believe it only while that service's lease
is alive (:meth:`Listener.alive`), and otherwise say the zone is not running.

The CLI and the running controller share this store. The controller's peering
service polls it every second (see :mod:`meshfed.federation.service`), so a
peering established or deleted with the CLI is picked up without any call to
the running process; ``peering_listener`` tells the CLI where the service
listens and whether it is alive.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Literal

import orjson
from pydantic import ValidationError

from meshfed.errors import InvalidTokenError, PeeringError
from meshfed.federation.exchange import ServiceSnapshot
from meshfed.federation.token import DEFAULT_TOKEN_TTL, MAX_TOKEN_TTL, PeeringToken, hash_secret, new_secret
from meshfed.sqlite import SqliteStore, transaction
from meshfed.zone import STATE_FILE, Zone

COMPONENT = "peering"
# A running service refreshes its lease every poll (1 s); the CLI calls it dead after this long.
LEASE_TIMEOUT = dt.timedelta(seconds=5)
# How long an expired, unredeemed PENDING peering stays stored (hidden) before the running zone deletes it.
EXPIRED_PENDING_KEPT = dt.timedelta(days=1)

_MIGRATIONS = (
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
)

Role = Literal["acceptor", "dialer"]


class PeerState(StrEnum):
    PENDING = "PENDING"
    ESTABLISHING = "ESTABLISHING"
    ACTIVE = "ACTIVE"
    DISCONNECTED = "DISCONNECTED"
    FAILING = "FAILING"
    TERMINATED = "TERMINATED"


# States in which the peer's controller may hold a stream open with us.
LIVE_STATES = frozenset({PeerState.ESTABLISHING, PeerState.ACTIVE, PeerState.DISCONNECTED, PeerState.FAILING})


@dataclass(frozen=True)
class Peering:
    """One row of ``peerings``: what survives a restart."""

    name: str
    role: Role
    state: PeerState
    created_at: dt.datetime
    updated_at: dt.datetime
    state_reason: str = ""
    delete_requested: bool = False
    peer_zone: str | None = None
    peer_trust_domain: str | None = None
    peer_addresses: tuple[str, ...] = ()
    # Our exports to the peer: the newest version sent (with its content) and the newest it acked.
    sent_version: int = 0
    sent_snapshot: ServiceSnapshot | None = None
    acked_version: int = 0
    # The peer's exports to us: the newest version applied (acked), with its content.
    received_version: int = 0
    received_snapshot: ServiceSnapshot | None = None
    last_connected_at: dt.datetime | None = None
    last_heartbeat_sent_at: dt.datetime | None = None
    last_heartbeat_received_at: dt.datetime | None = None
    # Services in the two snapshots; kept even when the snapshots are not loaded (see PeeringStore.get).
    sent_services: int = 0
    received_services: int = 0
    # The export epoch of each direction (see the Snapshot message): versions grow within one.
    sent_epoch: str = ""
    received_epoch: str = ""
    # Why the peer's newest update was refused (empty when it was applied): its imports keep the
    # last good version meanwhile.
    refused_reason: str = ""
    # The sequence of this zone's bundle the peer confirmed holding (0: unknown).
    peer_bundle_sequence: int = 0
    # Whether the stream was up when the running peering service last looked (see the module docstring).
    connected: bool = False


@dataclass(frozen=True)
class Listener:
    """Where the zone's peering service listens, as recorded by its last run."""

    establish_addresses: tuple[str, ...]
    stream_addresses: tuple[str, ...]
    alive_at: dt.datetime

    def alive(self, now: dt.datetime | None = None) -> bool:
        return (now or _now()) - self.alive_at < LEASE_TIMEOUT


@dataclass(frozen=True)
class IssuedToken:
    token: PeeringToken
    encoded: str = field(repr=False)


class PeeringStore(SqliteStore):
    """Typed access to the peering tables. Use as a context manager; each method is one transaction."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, COMPONENT, _MIGRATIONS)

    @classmethod
    def of(cls, zone: Zone) -> PeeringStore:
        return cls(zone.directory / STATE_FILE)

    # -- peerings --------------------------------------------------------

    def peerings(self, now: dt.datetime | None = None) -> list[Peering]:
        """Every peering, without its snapshots (``sent_services`` / ``received_services`` give their sizes).

        PENDING peerings whose tokens all expired unredeemed are left out (see the module docstring).
        """
        expired = self._expired_pending(now)
        rows = self._db.execute(f"SELECT {_LIGHT} FROM peerings ORDER BY name")  # noqa: S608
        return [peering for peering in map(_peering, rows) if peering.name not in expired]

    def get(self, name: str, *, snapshots: bool = False, now: dt.datetime | None = None) -> Peering | None:
        """One peering; its sent and received snapshots are parsed only if ``snapshots`` asks."""
        columns = _COLUMNS if snapshots else _LIGHT
        row = self._db.execute(f"SELECT {columns} FROM peerings WHERE name = ?", (name,)).fetchone()  # noqa: S608
        if row is None:
            return None
        peering = _peering(row)
        return None if peering.state is PeerState.PENDING and name in self._expired_pending(now) else peering

    def _expired_pending(self, now: dt.datetime | None = None) -> set[str]:
        """PENDING peerings without a token that can still be redeemed (at ``now``)."""
        moment = now or _now()
        rows = self._db.execute(
            "SELECT p.name, max(t.expires_at) FROM peerings p LEFT JOIN peering_tokens t "
            "ON t.peer_name = p.name AND t.used_at IS NULL WHERE p.state = 'PENDING' GROUP BY p.name"
        ).fetchall()
        return {str(name) for name, expires in rows if expires is None or _time(expires) <= moment}

    def drop_expired_pending(self, now: dt.datetime | None = None) -> list[str]:
        """Delete the PENDING peerings whose tokens expired unredeemed :data:`EXPIRED_PENDING_KEPT` ago.

        The running peering service calls it at each poll; returns the names dropped.
        """
        with transaction(self._db):
            names = sorted(self._expired_pending((now or _now()) - EXPIRED_PENDING_KEPT))
            self._db.executemany("DELETE FROM peerings WHERE name = ? AND state = 'PENDING'", [(n,) for n in names])
        return names

    def replace_terminated(self, name: str, trust_domain: str | None = None) -> None:
        """Make way for a new peering over a TERMINATED one with this ``name`` (or ``trust_domain``).

        The old peering's imports and trust went when it was terminated; its row (and its spent
        tokens) go now. A peering being deleted locally is refused: the running zone must first
        tell the peer.
        """
        rows = [self.get(name)]
        if trust_domain is not None:
            rows.append(self.by_trust_domain(trust_domain))
        for old in {p.name: p for p in rows if p is not None and p.state is PeerState.TERMINATED}.values():
            if old.delete_requested:
                raise PeeringError(
                    f"peering {old.name!r} is being deleted; once the running zone has told the peer "
                    "('meshfed up' if it is not running) peer again"
                )
            self.delete(old.name)

    def require(self, name: str, *, snapshots: bool = False) -> Peering:
        peering = self.get(name, snapshots=snapshots)
        if peering is None:
            known = ", ".join(p.name for p in self.peerings()) or "none"
            raise PeeringError(f"no peering named {name!r} (known: {known}); 'meshfed peer list' shows them")
        return peering

    def by_trust_domain(self, trust_domain: str) -> Peering | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM peerings WHERE peer_trust_domain = ?",  # noqa: S608
            (trust_domain,),
        ).fetchone()
        return None if row is None else _peering(row)

    def put(self, peering: Peering) -> None:
        with transaction(self._db):
            self._put(peering)

    def update(self, name: str, **changes: object) -> bool:
        """Change some fields of a peering, if it still exists (True if it does).

        Writes only the columns named: a heartbeat must not rewrite (or even read) snapshots of
        thousands of services.
        """
        values: dict[str, object] = {"updated_at": _iso(_now())}
        for field_name, value in changes.items():
            if field_name not in _WRITERS:
                raise TypeError(f"Peering has no updatable field {field_name!r}")
            values[field_name] = _WRITERS[field_name](value)
            if field_name in _COUNTED:
                snapshot = value if isinstance(value, ServiceSnapshot) else None
                values[_COUNTED[field_name]] = len(snapshot.services) if snapshot is not None else 0
        assignments = ", ".join(f"{column} = ?" for column in values)
        with transaction(self._db):
            cursor = self._db.execute(
                f"UPDATE peerings SET {assignments} WHERE name = ?",  # noqa: S608 -- column names from _WRITERS
                (*values.values(), name),
            )
        return cursor.rowcount > 0

    def delete(self, name: str) -> None:
        with transaction(self._db):
            self._db.execute("DELETE FROM peerings WHERE name = ?", (name,))

    def _put(self, p: Peering) -> None:
        self._db.execute(
            # An upsert, not INSERT OR REPLACE: a replace deletes the row first, which would
            # cascade to the peering's tokens and forget that a token was already spent.
            f"INSERT INTO peerings ({_COLUMNS}) VALUES ({', '.join('?' * _COLUMN_COUNT)}) "  # noqa: S608
            f"ON CONFLICT(name) DO UPDATE SET {_UPDATE_ALL}",
            (
                p.name,
                p.role,
                p.state.value,
                p.state_reason,
                int(p.delete_requested),
                p.peer_zone,
                p.peer_trust_domain,
                orjson.dumps(list(p.peer_addresses)).decode(),
                _iso(p.created_at),
                _iso(p.updated_at),
                p.sent_version,
                p.sent_snapshot.model_dump_json() if p.sent_snapshot else None,
                p.acked_version,
                p.received_version,
                p.received_snapshot.model_dump_json() if p.received_snapshot else None,
                _maybe_iso(p.last_connected_at),
                _maybe_iso(p.last_heartbeat_sent_at),
                _maybe_iso(p.last_heartbeat_received_at),
                len(p.sent_snapshot.services) if p.sent_snapshot else 0,
                len(p.received_snapshot.services) if p.received_snapshot else 0,
                p.sent_epoch,
                p.received_epoch,
                p.refused_reason,
                p.peer_bundle_sequence,
                int(p.connected),
            ),
        )

    # -- tokens ----------------------------------------------------------

    def issue_token(
        self, zone: Zone, peer_name: str, addresses: Sequence[str], ttl: dt.timedelta = DEFAULT_TOKEN_TTL
    ) -> IssuedToken:
        """Make a one-time token for zone ``peer_name`` and a PENDING peering; earlier unused tokens for it lapse.

        ``peer_name`` must be a zone name (a DNS label), and ``ttl`` at most :data:`MAX_TOKEN_TTL`.
        """
        check_peering_name(peer_name, "the peer's zone name")
        if ttl <= dt.timedelta(0):
            raise PeeringError(f"the token TTL must be positive, got {ttl}")
        if ttl > MAX_TOKEN_TTL:
            raise PeeringError(
                f"a token may be valid for at most {MAX_TOKEN_TTL.days} days, not {ttl}; "
                "issue one when the peer is ready to redeem it"
            )
        if peer_name == zone.name:
            raise PeeringError(f"{peer_name!r} is this zone's own name; a zone cannot peer with itself")
        if not addresses:
            raise PeeringError(
                "no establishment address for the token: start the zone ('meshfed up') once so it records "
                "where it listens, or pass --address HOST:PORT"
            )
        now = _now()
        secret = new_secret()
        token = PeeringToken(
            peer_name=peer_name,
            zone=zone.name,
            trust_domain=str(zone.trust_domain),
            addresses=list(addresses),
            ca_bundle=zone.own_bundle().to_spiffe_json().decode(),
            secret=secret,
            expires_at=(now + ttl).replace(microsecond=0),
        )
        with transaction(self._db):
            self.replace_terminated(peer_name)
            existing = self.get(peer_name)
            if existing is not None and existing.state is not PeerState.PENDING:
                raise PeeringError(
                    f"a peering named {peer_name!r} already exists ({existing.state}); "
                    f"'meshfed peer delete {peer_name}' first to peer again"
                )
            if existing is None:
                self._put(Peering(peer_name, "acceptor", PeerState.PENDING, now, now))
            # One outstanding token per peer: issuing again revokes the one that may have leaked.
            self._db.execute("DELETE FROM peering_tokens WHERE peer_name = ? AND used_at IS NULL", (peer_name,))
            self._db.execute(
                "INSERT INTO peering_tokens VALUES (?, ?, ?, ?, NULL)",
                (hash_secret(secret), peer_name, _iso(now), _iso(token.expires_at)),
            )
        return IssuedToken(token, token.encode())

    def redeem_token(self, secret: str, *, dialer_zone: str, now: dt.datetime | None = None) -> Peering:
        """Check a presented secret and return its PENDING peering; the caller spends it with ``spend_token``."""
        now = now or _now()
        row = self._db.execute(
            "SELECT peer_name, expires_at, used_at FROM peering_tokens WHERE secret_hash = ?", (hash_secret(secret),)
        ).fetchone()
        if row is None:
            raise InvalidTokenError(
                "the token's secret is unknown to this zone: the token was altered, revoked by a newer token, "
                "or issued by another zone"
            )
        peer_name, expires_at, used_at = str(row[0]), _time(row[1]), row[2]
        if used_at is not None:
            raise InvalidTokenError(f"this peering token was already used at {used_at}; issue a new one")
        if now >= expires_at:
            raise InvalidTokenError(f"this peering token expired at {_iso(expires_at)}; issue a new one")
        if dialer_zone != peer_name:
            raise InvalidTokenError(
                f"this token was issued for zone {peer_name!r}, but zone {dialer_zone!r} presented it; "
                f"issue one with 'meshfed peer token --peer {dialer_zone}'"
            )
        peering = self.require(peer_name)
        if peering.state is not PeerState.PENDING:
            raise InvalidTokenError(f"peering {peer_name!r} is {peering.state}, not waiting for a token")
        return peering

    def spend_token(self, secret: str, established: Peering) -> None:
        """Mark the token used and store the established peering, atomically; fails if spent meanwhile."""
        with transaction(self._db):
            spent = self._db.execute(
                "UPDATE peering_tokens SET used_at = ? WHERE secret_hash = ? AND used_at IS NULL",
                (_iso(_now()), hash_secret(secret)),
            ).rowcount
            if spent != 1:
                raise InvalidTokenError("this peering token was used by another request at the same moment")
            self._put(established)

    # -- listener --------------------------------------------------------

    def listener(self) -> Listener | None:
        row = self._db.execute(
            "SELECT establish_addresses, stream_addresses, alive_at FROM peering_listener WHERE id = 1"
        ).fetchone()
        if row is None:
            return None
        return Listener(tuple(orjson.loads(row[0])), tuple(orjson.loads(row[1])), _time(row[2]))

    def record_listener(self, establish: Sequence[str], stream: Sequence[str]) -> None:
        with transaction(self._db):
            self._db.execute(
                "INSERT OR REPLACE INTO peering_listener VALUES (1, ?, ?, ?)",
                (orjson.dumps(list(establish)).decode(), orjson.dumps(list(stream)).decode(), _iso(_now())),
            )

    def renew_lease(self) -> None:
        with transaction(self._db):
            self._db.execute("UPDATE peering_listener SET alive_at = ? WHERE id = 1", (_iso(_now()),))

    def release_lease(self) -> None:
        with transaction(self._db):
            self._db.execute("UPDATE peering_listener SET alive_at = ? WHERE id = 1", (_iso(_EPOCH),))

    @property
    def connection(self) -> sqlite3.Connection:
        return self._db


_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def check_peering_name(name: str, what: str = "a peering name") -> str:
    """Refuse a name that is not a DNS label (peering names label metrics, imports and listeners)."""
    if not _NAME.fullmatch(name):
        raise PeeringError(
            f"{what} {name[:80]!r} is not a DNS label: use lowercase letters, digits and '-', at most 63 "
            "characters (a zone's name, as 'meshfed zone init --name' gave it)"
        )
    return name


def request_delete(store: PeeringStore, name: str) -> Peering:
    """Mark a peering for deletion; a running controller tears it down on both sides within a second."""
    store.require(name)
    store.update(name, state=PeerState.TERMINATED, delete_requested=True, state_reason="deleted locally")
    return store.require(name)


# Fixed column names, never user input: the f-strings below build no SQL from data.
_COLUMNS = (
    "name, role, state, state_reason, delete_requested, peer_zone, peer_trust_domain, peer_addresses, "
    "created_at, updated_at, sent_version, sent_snapshot, acked_version, received_version, received_snapshot, "
    "last_connected_at, last_heartbeat_sent_at, last_heartbeat_received_at, sent_services, received_services, "
    "sent_epoch, received_epoch, refused_reason, peer_bundle_sequence, connected"
)
# The same columns with the snapshots left out (NULL): what status reads need.
_LIGHT = _COLUMNS.replace("sent_snapshot", "NULL").replace("received_snapshot", "NULL")
_COLUMN_COUNT = _COLUMNS.count(",") + 1
_UPDATE_ALL = ", ".join(f"{c.strip()} = excluded.{c.strip()}" for c in _COLUMNS.split(",")[1:])
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _peering(row: tuple[object, ...]) -> Peering:
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
        created_at=_time(created),
        updated_at=_time(updated),
        sent_version=int(str(sent_version)),
        sent_snapshot=_stored_snapshot(sent_snapshot),
        acked_version=int(str(acked_version)),
        received_version=int(str(received_version)),
        received_snapshot=_stored_snapshot(received_snapshot),
        last_connected_at=_maybe_time(connected),
        last_heartbeat_sent_at=_maybe_time(hb_sent),
        last_heartbeat_received_at=_maybe_time(hb_received),
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


def _snapshot_json(value: object) -> str | None:
    return value.model_dump_json() if isinstance(value, ServiceSnapshot) else None


def _moment(value: object) -> str | None:
    return _maybe_iso(value if isinstance(value, dt.datetime) else None)


def _state(value: object) -> str:
    return PeerState(str(value)).value


# How each updatable field is stored (the column has the field's name).
_WRITERS: dict[str, Callable[[object], object]] = {
    "state": _state,
    "state_reason": str,
    "delete_requested": lambda value: int(bool(value)),
    "sent_version": lambda value: int(str(value)),
    "sent_snapshot": _snapshot_json,
    "acked_version": lambda value: int(str(value)),
    "received_version": lambda value: int(str(value)),
    "received_snapshot": _snapshot_json,
    "last_connected_at": _moment,
    "last_heartbeat_sent_at": _moment,
    "last_heartbeat_received_at": _moment,
    "sent_epoch": str,
    "received_epoch": str,
    "refused_reason": str,
    "peer_bundle_sequence": lambda value: int(str(value)),
    "connected": lambda value: int(bool(value)),
}
# Snapshot fields and the count column kept with each.
_COUNTED = {"sent_snapshot": "sent_services", "received_snapshot": "received_services"}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _maybe_iso(moment: dt.datetime | None) -> str | None:
    return None if moment is None else _iso(moment)


def _time(text: object) -> dt.datetime:
    return dt.datetime.fromisoformat(str(text))


def _maybe_time(text: object) -> dt.datetime | None:
    return None if text is None else _time(text)


__all__ = [
    "EXPIRED_PENDING_KEPT",
    "LIVE_STATES",
    "IssuedToken",
    "Listener",
    "PeerState",
    "Peering",
    "PeeringStore",
    "check_peering_name",
    "request_delete",
]
