"""The peering store: the ``peerings``, ``peering_tokens`` and ``peering_listener`` tables of ``state.db``.

It keeps each peering (:class:`~meshfed.federation.peering_state.Peering`, whose
life that module describes), the hash of each token issued for one (spent
once), and the running peering service's listener and lease. The tables and
their row format are :mod:`meshfed.federation.peering_schema`.

The CLI and the running controller share this store. The controller's peering
service polls it every second (see :mod:`meshfed.federation.service`), so a
peering established or deleted with the CLI is picked up without any call to
the running process; ``peering_listener`` tells the CLI where the service
listens and whether it is alive.

A store reads the time from its :class:`~meshfed.clock.Clock` (tokens issued,
redeemed, expired; rows updated), except for the lease: other processes read
that on their own system clocks, so it is stamped with the real time.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import orjson

from meshfed.clock import SYSTEM_CLOCK, Clock
from meshfed.errors import InvalidTokenError, PeeringError
from meshfed.federation import peering_schema as schema
from meshfed.federation.exchange import ServiceSnapshot
from meshfed.federation.peering_state import EXPIRED_PENDING_KEPT, Listener, Peering, PeerState
from meshfed.federation.peering_tokens import IssuedToken, check_presented, check_waiting, new_token
from meshfed.federation.service_rows import Prepared, whole_document
from meshfed.federation.token import DEFAULT_TOKEN_TTL, hash_secret
from meshfed.sqlite import SqliteStore, transaction
from meshfed.zone import STATE_FILE, Zone


class PeeringStore(SqliteStore):
    """Typed access to the peering tables. Use as a context manager; each method is one transaction."""

    COMPONENT, MIGRATIONS = schema.COMPONENT, schema.MIGRATIONS
    _clock: Clock = SYSTEM_CLOCK  # a store made by ``on`` (over a borrowed connection) reads the system clock

    def __init__(self, path: Path, *, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(path, schema.COMPONENT, schema.MIGRATIONS)
        self._clock = clock

    @classmethod
    def of(cls, zone: Zone, *, clock: Clock = SYSTEM_CLOCK) -> PeeringStore:
        return cls(zone.directory / STATE_FILE, clock=clock)

    # -- peerings --------------------------------------------------------

    def peerings(self, now: dt.datetime | None = None) -> list[Peering]:
        """Every peering, without its snapshots (``sent_services`` / ``received_services`` give their sizes).

        PENDING peerings whose tokens all expired unredeemed are left out (see the module docstring).
        """
        expired = self._expired_pending(now)
        rows = self._db.execute(f"SELECT {schema.LIGHT} FROM peerings ORDER BY name")  # noqa: S608
        return [peering for peering in map(schema.peering_from_row, rows) if peering.name not in expired]

    def get(self, name: str, *, snapshots: bool = False, now: dt.datetime | None = None) -> Peering | None:
        """One peering; its sent and received snapshots are parsed only if ``snapshots`` asks."""
        columns = schema.COLUMNS if snapshots else schema.LIGHT
        row = self._db.execute(f"SELECT {columns} FROM peerings WHERE name = ?", (name,)).fetchone()  # noqa: S608
        if row is None:
            return None
        peering = schema.peering_from_row(self._whole(row) if snapshots else row)
        return None if peering.state is PeerState.PENDING and name in self._expired_pending(now) else peering

    def _expired_pending(self, now: dt.datetime | None = None) -> set[str]:
        """PENDING peerings without a token that can still be redeemed (at ``now``)."""
        moment = now or self._clock.now()
        rows = self._db.execute(
            "SELECT p.name, max(t.expires_at) FROM peerings p LEFT JOIN peering_tokens t "
            "ON t.peer_name = p.name AND t.used_at IS NULL WHERE p.state = 'PENDING' GROUP BY p.name"
        ).fetchall()
        return {str(name) for name, expires in rows if expires is None or schema.from_iso(expires) <= moment}

    def drop_expired_pending(self, now: dt.datetime | None = None) -> list[str]:
        """Delete the PENDING peerings whose tokens expired unredeemed :data:`EXPIRED_PENDING_KEPT` ago.

        The running peering service calls it at each poll; returns the names dropped.
        """
        with transaction(self._db):
            names = sorted(self._expired_pending((now or self._clock.now()) - EXPIRED_PENDING_KEPT))
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
            f"SELECT {schema.COLUMNS} FROM peerings WHERE peer_trust_domain = ?",  # noqa: S608
            (trust_domain,),
        ).fetchone()
        return None if row is None else schema.peering_from_row(self._whole(row))

    def _whole(self, row: tuple[object, ...]) -> tuple[object, ...]:
        """A row of :data:`~meshfed.federation.peering_schema.COLUMNS` with each snapshot head made the whole
        snapshot document (its services' rows added)."""
        whole = list(row)
        for column, side in schema.SNAPSHOT_SIDES.items():
            index = schema.COLUMN_INDEX[column]
            head = whole[index]
            if head is not None:
                services = schema.SERVICE_ROWS.read(self._db, (str(row[0]), side))
                whole[index] = whole_document(str(head), services)
        return tuple(whole)

    def put(self, peering: Peering) -> None:
        with transaction(self._db):
            self._put(peering)

    def update(self, name: str, **changes: object) -> bool:
        """Change some fields of a peering, if it still exists (True if it does).

        Writes only the columns named: a heartbeat must not rewrite (or even read) snapshots of
        thousands of services.
        """
        return self.write_encoded(name, encode_changes(name, changes))

    def write_encoded(self, name: str, values: dict[str, object]) -> bool:
        """:meth:`update` with the changes already encoded (:func:`encode_changes`, outside the store's block)."""
        if not values.keys() <= schema.PROCESS_COLUMNS["peerings"].keys():
            values = {"updated_at": schema.iso(self._clock.now()), **values}
        snapshots = {column: value for column, value in values.items() if isinstance(value, Prepared)}
        for column, prepared in snapshots.items():
            values[column] = prepared.head
        assignments = ", ".join(f"{column} = ?" for column in values)
        with transaction(self._db):
            if snapshots:
                heads = self._db.execute(
                    f"SELECT {', '.join(snapshots)} FROM peerings WHERE name = ?",  # noqa: S608 -- SNAPSHOT_SIDES
                    (name,),
                ).fetchone()
                if heads is None:
                    return False
                for prepared, head in zip(snapshots.values(), heads, strict=True):
                    schema.SERVICE_ROWS.write(self._db, prepared, None if head is None else str(head))
            cursor = self._db.execute(
                f"UPDATE peerings SET {assignments} WHERE name = ?",  # noqa: S608 -- column names from WRITERS
                (*values.values(), name),
            )
        return cursor.rowcount > 0

    def delete(self, name: str) -> None:
        with transaction(self._db):
            self._db.execute("DELETE FROM peerings WHERE name = ?", (name,))  # its service rows go with it
        for side in schema.SNAPSHOT_SIDES.values():
            schema.SERVICE_ROWS.forget((name, side))

    def _put(self, p: Peering) -> None:
        self._db.execute(
            # An upsert, not INSERT OR REPLACE: a replace deletes the row first, which would
            # cascade to the peering's tokens and forget that a token was already spent.
            f"INSERT INTO peerings ({schema.COLUMNS}) VALUES ({', '.join('?' * schema.COLUMN_COUNT)}) "  # noqa: S608
            f"ON CONFLICT(name) DO UPDATE SET {schema.UPDATE_ALL}",
            schema.peering_row(p),
        )
        for column, side in schema.SNAPSHOT_SIDES.items():
            snapshot = p.sent_snapshot if column == "sent_snapshot" else p.received_snapshot
            schema.SERVICE_ROWS.write(self._db, schema.SERVICE_ROWS.prepare((p.name, side), snapshot), None)

    # -- tokens ----------------------------------------------------------

    def issue_token(
        self, zone: Zone, peer_name: str, addresses: Sequence[str], ttl: dt.timedelta = DEFAULT_TOKEN_TTL
    ) -> IssuedToken:
        """Make a one-time token for zone ``peer_name`` and a PENDING peering; earlier unused tokens for it lapse.

        ``peer_name`` must be a zone name (a DNS label), and ``ttl`` at most
        :data:`~meshfed.federation.token.MAX_TOKEN_TTL` (see :func:`~meshfed.federation.peering_tokens.new_token`).
        """
        now = self._clock.now()
        token = new_token(zone, peer_name, addresses, ttl, now)
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
                (hash_secret(token.secret), peer_name, schema.iso(now), schema.iso(token.expires_at)),
            )
        return IssuedToken(token, token.encode())

    def redeem_token(self, secret: str, *, dialer_zone: str, now: dt.datetime | None = None) -> Peering:
        """Check a presented secret and return its PENDING peering; the caller spends it with ``spend_token``."""
        now = now or self._clock.now()
        row = self._db.execute(
            "SELECT peer_name, expires_at, used_at FROM peering_tokens WHERE secret_hash = ?", (hash_secret(secret),)
        ).fetchone()
        return check_waiting(self.require(check_presented(row, dialer_zone=dialer_zone, now=now)))

    def spend_token(self, secret: str, established: Peering) -> None:
        """Mark the token used and store the established peering, atomically; fails if spent meanwhile."""
        with transaction(self._db):
            spent = self._db.execute(
                "UPDATE peering_tokens SET used_at = ? WHERE secret_hash = ? AND used_at IS NULL",
                (schema.iso(self._clock.now()), hash_secret(secret)),
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
        return Listener(tuple(orjson.loads(row[0])), tuple(orjson.loads(row[1])), schema.from_iso(row[2]))

    def record_listener(self, establish: Sequence[str], stream: Sequence[str]) -> None:
        with transaction(self._db):
            self._db.execute(
                "INSERT OR REPLACE INTO peering_listener VALUES (1, ?, ?, ?)",
                (orjson.dumps(list(establish)).decode(), orjson.dumps(list(stream)).decode(), schema.iso(schema.now())),
            )

    def renew_lease(self) -> None:
        with transaction(self._db):
            self._db.execute("UPDATE peering_listener SET alive_at = ? WHERE id = 1", (schema.iso(schema.now()),))

    def release_lease(self) -> None:
        with transaction(self._db):
            self._db.execute("UPDATE peering_listener SET alive_at = ? WHERE id = 1", (schema.iso(schema.EPOCH),))

    @property
    def connection(self) -> sqlite3.Connection:
        return self._db


def request_delete(store: PeeringStore, name: str) -> Peering:
    """Mark a peering for deletion; a running controller tears it down on both sides within a second."""
    store.require(name)
    store.update(name, state=PeerState.TERMINATED, delete_requested=True, state_reason="deleted locally")
    return store.require(name)


def encode_changes(name: str, changes: dict[str, object]) -> dict[str, object]:
    """Peering ``name``'s changed fields as the columns that store them; a snapshot as the difference from the
    one last stored (:mod:`meshfed.federation.service_rows`), which the store writes with its head."""
    values: dict[str, object] = {}
    for field_name, value in changes.items():
        side = schema.SNAPSHOT_SIDES.get(field_name)
        if side is not None:
            snapshot = value if isinstance(value, ServiceSnapshot) else None
            values[field_name] = schema.SERVICE_ROWS.prepare((name, side), snapshot)
            values[schema.COUNTED[field_name]] = len(snapshot.services) if snapshot is not None else 0
        elif field_name in schema.WRITERS:
            values[field_name] = schema.WRITERS[field_name](value)
        else:
            raise TypeError(f"Peering has no updatable field {field_name!r}")
    return values


__all__ = ["PeeringStore", "encode_changes", "request_delete"]
