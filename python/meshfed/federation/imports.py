"""Imported services: what peers export to this zone, kept across restarts.

Each peer's latest :class:`ServiceSnapshot` is stored, its services in chunks
(``federation/service_rows.py``); an import is named
``<service>.<namespace>.<peer>``. Within one export epoch of the peer, a
snapshot no newer than the stored one is a duplicate (a resumed stream may
resend) and changes nothing; a snapshot of a new epoch replaces whatever is
stored (the peer's history went backwards and it resent everything).

A stored snapshot that no longer parses (damaged, or written under looser rules)
is reported per peer by :meth:`ImportStore.read` and left out: one peer's bad
row never stops the zone from starting or serving the others.
"""

from __future__ import annotations

import datetime as dt
import itertools
import operator
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from meshfed.errors import FederationError
from meshfed.federation.exchange import ExportedService, ServiceSnapshot
from meshfed.federation.service_rows import ServiceRows, whole_document
from meshfed.places import changed_places
from meshfed.sqlite import SqliteStore, transaction

STATE_FILE = "state.db"
# The prefix of import listeners' names; failover groups' differ.
EGRESS_PREFIX = "egress:"

# Each peer's imported services, in chunks.
_SERVICE_ROWS = ServiceRows(
    "imported_services", ("peer TEXT NOT NULL REFERENCES imported_snapshots(peer) ON DELETE CASCADE",)
)

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
    # A stored snapshot's epoch beside its version: the pair names its content (a peer never sends
    # other content under a version of an epoch, and older versions are not stored), so a reader that
    # parsed that pair already need not read, hash or parse a megabyte of JSON again to know.
    """
    ALTER TABLE imported_snapshots ADD COLUMN epoch TEXT NOT NULL DEFAULT '';
    UPDATE imported_snapshots
    SET epoch = CASE WHEN json_valid(snapshot) THEN coalesce(json_extract(snapshot, '$.epoch'), '') ELSE '' END;
    """,
    # 3: a snapshot as its head (in the old column) and chunks of its services (federation/service_rows.py):
    # one service's change writes one chunk, not the peer's whole snapshot. What was stored is one chunk.
    _SERVICE_ROWS.ddl  # noqa: S608 -- fixed table and column names
    + """
    INSERT INTO imported_services
    SELECT peer, 0, json_extract(CAST(snapshot AS TEXT), '$.services') FROM imported_snapshots
    WHERE json_valid(CAST(snapshot AS TEXT)) AND json_type(CAST(snapshot AS TEXT), '$.services') = 'array';
    UPDATE imported_snapshots SET snapshot = CAST(json_remove(CAST(snapshot AS TEXT), '$.services') AS BLOB)
    WHERE json_valid(CAST(snapshot AS TEXT));
    """,
)

Head = tuple[str, int]
"""A stored snapshot's (epoch, version): what names its content."""


@dataclass(frozen=True, slots=True)
class ImportOrigin:
    """Where one peer's imports come from, shared by all of them: its zone, trust domain and gateways."""

    zone: str
    trust_domain: str
    gateway_addresses: tuple[str, ...]

    @classmethod
    def of(cls, snapshot: ServiceSnapshot) -> ImportOrigin:
        return cls(snapshot.zone, snapshot.trust_domain, tuple(snapshot.gateway_addresses))


@dataclass(frozen=True, slots=True)  # slots: a build makes one per import, 10,000 at a time
class ImportedService:
    """One service a peer exports to this zone."""

    peer: str
    origin: ImportOrigin
    service: ExportedService

    @property
    def name(self) -> str:
        """``<service>.<namespace>.<peer>``."""
        return f"{self.service.name}.{self.service.namespace}.{self.peer}"


class EgressPorts:
    """The port of each egress listener: the one it had before, else the lowest free one from ``base``.

    Loads the table once and assigns new ports from a cursor, so a config with
    10,000 imports costs one query, not one scan of the table per listener.

    Ports stay with their listener while there is room. Once the range is full,
    the ports (from ``base`` up) of import listeners that no stored import has
    any more (a peer renamed or dropped the service, or the peering went) are
    reused, lowest first: a peer that renames its services on every update must
    not use the range up for everyone. ``live`` names the listeners stored
    imports still have; it is asked only when the range is full.
    """

    def __init__(self, db: sqlite3.Connection, base: int, live: Callable[[], set[str]] | None = None) -> None:
        self._db = db
        self._ports = {
            str(listener): int(port) for listener, port in db.execute("SELECT listener, port FROM egress_ports")
        }
        self._taken = set(self._ports.values())
        self._base = self._next = base
        self._new: dict[str, int] = {}
        self._live = live
        self._stale: list[tuple[int, str]] | None = None
        self._reclaimed: list[str] = []
        self._used: set[str] = set()  # handed out by this object: never reclaimed

    def __call__(self, listener: str) -> int:
        self._used.add(listener)
        port = self._ports.get(listener)
        if port is not None:
            return port
        while self._next in self._taken:
            self._next += 1
        if self._next <= 65535:
            port = self._next
            self._taken.add(port)
        else:
            port = self._reclaim()
        self._ports[listener] = port
        self._new[listener] = port
        return port

    def listeners(self) -> set[str]:
        """The listeners that hold a port: the stored ones and those handed one since the last save.

        Failover groups' names among them are the zone's memory of which services were groups
        (``federation/failover.py``): a group keeps its listener and port while any source offers it.
        """
        return set(self._ports)

    def _reclaim(self) -> int:
        if self._stale is None:
            live = self._live() if self._live is not None else None
            self._stale = sorted(
                (port, name)
                for name, port in self._ports.items()
                if live is not None and port >= self._base and name.startswith(EGRESS_PREFIX) and name not in live
            )
            self._stale.reverse()  # popped from the end: lowest port first
        while self._stale:
            port, name = self._stale.pop()
            if name not in self._used:
                del self._ports[name]
                self._reclaimed.append(name)
                return port
        raise FederationError("no free egress port left above the base; lower the egress port base")

    def save(self, db: sqlite3.Connection | None = None) -> None:
        """Keep the ports assigned since the last save, so listeners keep their address across restarts.

        ``db``: the connection to write with, when the one these ports were read with was only borrowed
        for the reading (see :meth:`ImportStore.save_ports`).
        """
        db = db if db is not None else self._db
        if self._new or self._reclaimed:
            with transaction(db):
                db.executemany("DELETE FROM egress_ports WHERE listener = ?", [(n,) for n in self._reclaimed])
                db.executemany("INSERT OR IGNORE INTO egress_ports VALUES (?, ?)", self._new.items())
            self._new, self._reclaimed = {}, []


class ImportStore(SqliteStore):
    """Peers' snapshots in the zone's ``state.db``. Use as a context manager."""

    COMPONENT, MIGRATIONS = "imports", _MIGRATIONS

    def __init__(self, zone_directory: Path) -> None:
        super().__init__(zone_directory / STATE_FILE)

    def head(self, peer: str) -> Head | None:
        """The :data:`Head` of ``peer``'s stored snapshot, if any."""
        row = self._db.execute("SELECT epoch, version FROM imported_snapshots WHERE peer = ?", (peer,)).fetchone()
        return None if row is None else (str(row[0]), int(row[1]))

    def document(self, peer: str) -> bytes | None:
        """``peer``'s stored snapshot as one document, unparsed, if any."""
        row = self._db.execute("SELECT snapshot FROM imported_snapshots WHERE peer = ?", (peer,)).fetchone()
        return None if row is None else self._whole(peer, row[0])

    def snapshot(self, peer: str) -> ServiceSnapshot | None:
        """``peer``'s stored snapshot, if any and readable."""
        document = self.document(peer)
        return None if document is None else parse_documents([(peer, document)])[0].get(peer)

    def put(self, peer: str, snapshot: ServiceSnapshot) -> bool:
        """Keep ``snapshot`` as ``peer``'s exports unless it is a duplicate (see above). True if stored."""
        with transaction(self._db):
            row = self._db.execute(
                "SELECT version, epoch, snapshot FROM imported_snapshots WHERE peer = ?", (peer,)
            ).fetchone()
            if row is not None and row[1] == snapshot.epoch and row[0] >= snapshot.version:
                return False
            self._write(peer, snapshot, None if row is None else _text(row[2]))
        return True

    def restore(self, peer: str, previous: ServiceSnapshot | None) -> None:
        """Put back ``previous``, what was stored before an update that was refused (None: nothing was)."""
        with transaction(self._db):
            if previous is None:
                self._db.execute("DELETE FROM imported_snapshots WHERE peer = ?", (peer,))
                _SERVICE_ROWS.forget((peer,))
                return
            row = self._db.execute("SELECT snapshot FROM imported_snapshots WHERE peer = ?", (peer,)).fetchone()
            self._write(peer, previous, None if row is None else _text(row[0]))

    def _write(self, peer: str, snapshot: ServiceSnapshot, stored_head: str | None) -> None:
        prepared = _SERVICE_ROWS.prepare((peer,), snapshot)
        self._db.execute(
            "INSERT INTO imported_snapshots (peer, version, snapshot, received_at, epoch) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(peer) DO UPDATE SET version = excluded.version, snapshot = excluded.snapshot, "
            "received_at = excluded.received_at, epoch = excluded.epoch",
            (
                peer,
                snapshot.version,
                (prepared.head or "").encode(),
                dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                snapshot.epoch,
            ),
        )
        _SERVICE_ROWS.write(self._db, prepared, stored_head)

    def _whole(self, peer: str, head: object) -> bytes:
        return whole_document(_text(head), _SERVICE_ROWS.read(self._db, (peer,))).encode()

    def remove(self, peer: str) -> bool:
        """Forget everything ``peer`` exported (the peering was deleted). True if anything went."""
        with transaction(self._db):
            removed = self._db.execute("DELETE FROM imported_snapshots WHERE peer = ?", (peer,)).rowcount > 0
        _SERVICE_ROWS.forget((peer,))
        return removed

    def egress_ports(self, base: int, live: Callable[[], set[str]] | None = None) -> EgressPorts:
        """Ports for egress listeners, from ``base`` up; call :meth:`EgressPorts.save` to keep new ones.

        ``live`` names the listeners of the stored imports (default: read from this store when asked);
        give it when the ports are handed out after this store's block ended.
        """
        return EgressPorts(self._db, base, live or self._listeners)

    def save_ports(self, ports: EgressPorts) -> None:
        """Keep the new ports of ``ports``, read in an earlier block of this store."""
        ports.save(self._db)

    def _listeners(self) -> set[str]:
        """The egress listener names of every stored import (one per service port)."""
        return {egress_listener_name(item, port) for item in self.services() for port in item.service.ports}

    def read(self) -> tuple[dict[str, ServiceSnapshot], dict[str, str]]:
        """Every peer's latest snapshot by peer name, and why any peer's stored snapshot is unreadable."""
        return parse_documents(self.documents())

    def documents_unless(self, held: Mapping[str, Head]) -> tuple[dict[str, Head], dict[str, bytes]]:
        """Every peer's stored :data:`Head`, and the documents of the peers whose head is not the one ``held``."""
        heads = {
            str(peer): (str(epoch), int(version))
            for peer, epoch, version in self._db.execute(
                "SELECT peer, epoch, version FROM imported_snapshots ORDER BY peer"
            )
        }
        wanted = [peer for peer, head in heads.items() if held.get(peer) != head]
        documents = {peer: document for peer in wanted if (document := self.document(peer)) is not None}
        return heads, documents

    def documents(self) -> list[tuple[str, bytes]]:
        """Every peer's stored snapshot document, unparsed (parse with :func:`parse_documents`, outside the block)."""
        return [
            (str(peer), self._whole(str(peer), head))
            for peer, head in self._db.execute("SELECT peer, snapshot FROM imported_snapshots ORDER BY peer").fetchall()
        ]

    def snapshots(self) -> dict[str, ServiceSnapshot]:
        """The latest readable snapshot of every peer, by peer name."""
        return self.read()[0]

    def services(self) -> list[ImportedService]:
        """Every imported service, ordered by name."""
        return services_of(self.snapshots())


def _text(stored: object) -> str:
    """A stored head as text (the column is a BLOB: older versions wrote bytes)."""
    return bytes(stored).decode(errors="replace") if isinstance(stored, (bytes, memoryview)) else str(stored)


def services_of(snapshots: Mapping[str, ServiceSnapshot]) -> list[ImportedService]:
    """The imported services of these peers' snapshots, ordered by name."""
    return ImportedServices().of(snapshots)


@dataclass(frozen=True)
class _Answer:
    """One answer of :class:`ImportedServices`, whole: what it was asked, what it gave, and what made it."""

    given: list[tuple[str, ServiceSnapshot]]
    imported: list[ImportedService]
    # Per peer, its snapshot and the entries made of it (in the snapshot's order).
    peers: dict[str, tuple[ServiceSnapshot, list[ImportedService]]]
    # Where each entry is in ``imported``, by id (the entries are held here, so no id is reused).
    positions: dict[int, int] | None = None


class ImportedServices:
    """:func:`services_of` with a memory, for a zone that asks it of 10,000 imports several times a change.

    The same snapshots give the very same list; a peer's new snapshot reuses
    the previous one's :class:`ImportedService` of every service object the two
    share (a delta keeps the unchanged ones) while its origin is unchanged.
    When one peer's new snapshot holds the previous one's services in the same
    places but a few (a delta that changed them, added and removed none), the
    few new entries take the old ones' places in a copy of the last answer: no
    sort, no pass of our own over 10,000. Holds one answer's worth, replaced
    whole; safe to share between threads (a lost answer costs a rebuild).
    """

    def __init__(self) -> None:
        self._answer: _Answer | None = None

    def of(self, snapshots: Mapping[str, ServiceSnapshot]) -> list[ImportedService]:
        """The imported services of these peers' snapshots, ordered by name (not to be changed: shared)."""
        given = list(snapshots.items())
        last = self._answer
        if (
            last is not None
            and len(last.given) == len(given)
            and all(p == q and a is b for (p, a), (q, b) in zip(last.given, given, strict=True))
        ):
            return last.imported
        answer = (_patched_answer(last, given) if last is not None else None) or _joined_answer(last, given)
        self._answer = answer
        return answer.imported


def _joined_answer(last: _Answer | None, given: list[tuple[str, ServiceSnapshot]]) -> _Answer:
    """Every peer's entries (the unchanged ones reused), joined and sorted by name."""
    held_peers = last.peers if last is not None else {}
    peers: dict[str, tuple[ServiceSnapshot, list[ImportedService]]] = {}
    for peer, snapshot in given:
        held = held_peers.get(peer)
        if held is not None and held[0] is snapshot:
            items = held[1]
        else:
            origin = ImportOrigin.of(snapshot)
            known: dict[int, ImportedService] = {}
            if held is not None and held[1] and held[1][0].origin == origin:
                origin = held[1][0].origin  # one origin object per peer while it is the same
                known = {id(item.service): item for item in held[1]}
            items = [known.get(id(service)) or ImportedService(peer, origin, service) for service in snapshot.services]
        peers[peer] = (snapshot, items)
    imported = sorted(itertools.chain.from_iterable(items for _, items in peers.values()), key=lambda item: item.name)
    return _Answer(given, imported, peers)


def _patched_answer(last: _Answer, given: list[tuple[str, ServiceSnapshot]]) -> _Answer | None:
    """``last`` with one peer's few changed services' entries in place of the old ones; None when that cannot
    say it (peers came or went, more than one changed, its origin or its services' places changed)."""
    if [peer for peer, _ in given] != [peer for peer, _ in last.given]:
        return None
    changed = [
        (peer, snapshot) for (peer, snapshot), (_, held) in zip(given, last.given, strict=True) if snapshot is not held
    ]
    if len(changed) != 1:
        return None
    peer, snapshot = changed[0]
    held_snapshot, held_items = last.peers[peer]
    if not held_items or held_items[0].origin != ImportOrigin.of(snapshot):
        return None
    now = snapshot.services
    places = changed_places(held_snapshot.services, now, key=operator.attrgetter("key"), at_most=0.25)
    if places is None:
        return None
    held = last.positions
    positions = {id(item): index for index, item in enumerate(last.imported)} if held is None else dict(held)
    items, imported = held_items.copy(), last.imported.copy()
    for place in places:
        old = held_items[place]
        entry = items[place] = ImportedService(peer, old.origin, now[place])
        index = positions.pop(id(old))
        imported[index] = entry
        positions[id(entry)] = index
    return _Answer(given, imported, {**last.peers, peer: (snapshot, items)}, positions)


def egress_listener_name(imported: ImportedService, port_name: str) -> str:
    """``egress:<service>.<namespace>.<peer>:<port name>``: stable across config generations."""
    return f"{EGRESS_PREFIX}{imported.name}:{port_name}"


ParsedSnapshots = dict[str, tuple[Head, ServiceSnapshot]]
"""Per peer, the :data:`Head` of a stored snapshot and the snapshot parsed from it."""


def parse_documents(
    documents: Iterable[tuple[str, bytes]],
) -> tuple[dict[str, ServiceSnapshot], dict[str, str]]:
    """Stored snapshot documents parsed, by peer, and why any of them is unreadable."""
    snapshots: dict[str, ServiceSnapshot] = {}
    unreadable: dict[str, str] = {}
    for peer, document in documents:
        try:
            snapshots[peer] = ServiceSnapshot.model_validate_json(document)
        except ValidationError as err:
            unreadable[peer] = (
                f"its stored imports are unreadable ({err.error_count()} errors); they are withheld until "
                "the peer sends them again"
            )
    return snapshots, unreadable


def parse_stored(
    heads: Mapping[str, Head], documents: Mapping[str, bytes], known: ParsedSnapshots
) -> tuple[dict[str, ServiceSnapshot], dict[str, str]]:
    """What :meth:`ImportStore.documents_unless` read, parsed: ``known`` (updated in place) gives the
    snapshots of the heads it holds, ``documents`` the others. A build after a change of one peer's
    imports parses that peer's snapshot alone (a megabyte of JSON for 10,000 services), or none when
    the change came through the zone, which hands the driver the snapshot it stored."""
    snapshots, unreadable = parse_documents(documents.items())
    for peer, snapshot in snapshots.items():
        known[peer] = (heads[peer], snapshot)
    for peer, head in heads.items():
        held = known.get(peer)
        if peer not in documents and held is not None and held[0] == head:
            snapshots[peer] = held[1]
    for peer in [peer for peer in known if peer not in snapshots]:
        known.pop(peer, None)
    return dict(sorted(snapshots.items())), unreadable
