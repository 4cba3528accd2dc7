"""Snapshots kept in ``state.db`` as a head and rows of a few dozen services each, written by difference.

A snapshot of 10,000 services is 1.6 MB of JSON. Stored whole, every change of
one service cost each peering that much JSON to encode and write, on both
sides (what was sent, what was received, what is imported): the largest
single cost of a change at that size, and it competed for the CPU with
applying the change. Here a snapshot is its *head* (every field but the
services, a few hundred bytes, kept where the whole document was) and its
services spread over rows (*chunks*) by a hash of their key, about
:data:`CHUNK` services each, in a table of the store's own. A write encodes
and stores only the chunks holding a service that differs from the stored
ones. Not a row per service: a whole write of 10,000 rows held the zone's one
connection to ``state.db`` for 30 ms a snapshot, and what waited on it there
stalled the event loop; 160 chunks cost what one document did.

What is stored is known without reading it back: each process remembers the
last snapshot it wrote under each owner (:class:`ServiceRows` below), and a
write checks, in the transaction that stores the new head, that the stored
head is still that snapshot's. A head names its content (the sender's zone,
an epoch and a version, never reused for other content), so the same head
means the same rows, in whichever file. Any other head (another process or
zone wrote, a transaction rolled back, the process just started) makes the
write a whole one: a lost memory costs one whole write, never a wrong row.
The services compared are the same objects when unchanged (a delta keeps
them), so finding the change is a lookup per service, not an encoding.

A snapshot read back lists its services in no particular order (it never
carried one: peers key services by namespace and name).
"""

from __future__ import annotations

import math
import operator
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import TypeAdapter

from meshfed.federation.exchange import ExportedService, ServiceSnapshot
from meshfed.places import changed_places

ServiceKey = tuple[str, str]
"""A service's (namespace, name)."""

CHUNK = 64
"""Services per row, on average, when a snapshot is written whole."""

_SERVICES = TypeAdapter(list[ExportedService])
_KEY = operator.attrgetter("key")


def head_of(snapshot: ServiceSnapshot) -> str:
    """``snapshot`` without its services, as stored beside the rows."""
    return snapshot.model_dump_json(exclude={"services"})


def whole_document(head: str | bytes, chunks: Sequence[str]) -> str:
    """The whole snapshot document of a stored ``head`` and its chunks' rows (to parse as one)."""
    text = head.decode() if isinstance(head, bytes) else head
    if not text.endswith("}") or text.startswith("{}"):
        return text  # not a head this module wrote: parsing it reports it unreadable
    services = ",".join(inner for chunk in chunks if (inner := chunk.strip()[1:-1].strip()))
    return f'{text[:-1]},"services":[{services}]}}'


def _slot(key: ServiceKey, chunks: int) -> int:
    """The chunk of the service ``key`` among ``chunks``. ``hash`` differs between processes, and need not
    agree: slots matter only to the process that remembers its write; another one writes whole first."""
    return hash(key) % chunks


@dataclass(frozen=True)
class Prepared:
    """A write encoded ahead of its transaction (:meth:`ServiceRows.prepare`), off the store's connection."""

    owner: tuple[str, ...]
    head: str | None
    snapshot: ServiceSnapshot | None
    # The difference from the snapshot last written under this owner, whose head is ``base`` (None: whole).
    base: str | None
    # The chunks as they are after this write, and the ones to store: (chunk, its services as JSON).
    chunks: tuple[tuple[ExportedService, ...], ...] = ()
    rows: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Written:
    head: str
    services: Sequence[ExportedService]
    chunks: tuple[tuple[ExportedService, ...], ...]


class ServiceRows:
    """The chunk rows of one table, by owner: ``owner_columns`` are SQL column definitions (a name first)
    of the store's key, such as the peer."""

    def __init__(self, table: str, owner_columns: Sequence[str]) -> None:
        # Fixed names and definitions, never user input: the f-strings build no SQL from data.
        self._table = table
        self._definitions = list(owner_columns)
        self._owner = [definition.split()[0] for definition in owner_columns]
        self._where = " AND ".join(f"{column} = ?" for column in self._owner)
        self._lock = threading.Lock()
        self._written: dict[tuple[str, ...], _Written] = {}

    @property
    def ddl(self) -> str:
        """The migration creating the table: the owner's columns, then each chunk's number and its services
        as a JSON array, keyed by the owner and the number."""
        return (
            f"CREATE TABLE {self._table} ({', '.join(self._definitions)}, chunk INTEGER NOT NULL, "
            f"services TEXT NOT NULL, PRIMARY KEY ({', '.join(self._owner)}, chunk)) STRICT, WITHOUT ROWID;"
        )

    def prepare(self, owner: tuple[str, ...], snapshot: ServiceSnapshot | None) -> Prepared:
        """Encode what writing ``snapshot`` (None: no snapshot) under ``owner`` changes since this process's
        last write there. Cheap for a change of a few services."""
        if snapshot is None:
            return Prepared(owner, None, None, None)
        with self._lock:
            last = self._written.get(owner)
        count = 0 if last is None else len(last.chunks)
        if last is None or len(snapshot.services) > 2 * CHUNK * count:
            # Nothing known of what is stored, or the chunks grew to twice their size (a snapshot that was
            # empty and now holds 10,000 services): written whole, in chunks of the size it has now.
            return _whole(owner, snapshot)
        changed, removed = _difference(last.services, snapshot.services)
        touched: dict[int, dict[ServiceKey, ExportedService]] = {}
        for key in removed:
            members = touched.get(slot := _slot(key, count))
            if members is None:
                members = touched[slot] = {service.key: service for service in last.chunks[slot]}
            members.pop(key, None)
        for service in changed:
            members = touched.get(slot := _slot(service.key, count))
            if members is None:
                members = touched[slot] = {held.key: held for held in last.chunks[slot]}
            members[service.key] = service
        chunks = list(last.chunks)
        rows = []
        for slot, members in sorted(touched.items()):
            chunks[slot] = tuple(members.values())
            rows.append((slot, _SERVICES.dump_json(list(chunks[slot])).decode()))
        return Prepared(owner, head_of(snapshot), snapshot, last.head, tuple(chunks), rows)

    def write(self, db: sqlite3.Connection, prepared: Prepared, stored_head: str | None) -> None:
        """Store ``prepared``'s rows, inside the transaction that stores its head where ``stored_head`` was.

        By difference when ``stored_head`` is the head the difference was taken from; whole otherwise.
        """
        if prepared.snapshot is None:
            db.execute(f"DELETE FROM {self._table} WHERE {self._where}", prepared.owner)  # noqa: S608
            self._remember(prepared.owner, None)
            return
        if prepared.base is not None and prepared.base != stored_head:
            prepared = _whole(prepared.owner, prepared.snapshot)  # what is stored is not what this process wrote
        if prepared.base is None:
            db.execute(f"DELETE FROM {self._table} WHERE {self._where}", prepared.owner)  # noqa: S608
        marks = ", ".join("?" * (len(self._owner) + 2))
        db.executemany(
            f"INSERT OR REPLACE INTO {self._table} VALUES ({marks})",  # noqa: S608
            [(*prepared.owner, slot, services) for slot, services in prepared.rows],
        )
        self._remember(prepared.owner, prepared)

    def read(self, db: sqlite3.Connection, owner: tuple[str, ...]) -> list[str]:
        """The stored chunks under ``owner``: each a JSON array of services."""
        return [
            str(row[0])
            for row in db.execute(
                f"SELECT services FROM {self._table} WHERE {self._where} ORDER BY chunk",  # noqa: S608
                owner,
            )
        ]

    def forget(self, owner: tuple[str, ...]) -> None:
        """Nothing is known of what is stored under ``owner`` any more (its rows went with their owner)."""
        self._remember(owner, None)

    def _remember(self, owner: tuple[str, ...], prepared: Prepared | None) -> None:
        # Remembered before the caller's commit: should it roll back, the stored head is not this one,
        # and the next write (which checks) is a whole one.
        with self._lock:
            if prepared is None or prepared.snapshot is None or prepared.head is None:
                self._written.pop(owner, None)
            else:
                self._written[owner] = _Written(prepared.head, prepared.snapshot.services, prepared.chunks)


def _whole(owner: tuple[str, ...], snapshot: ServiceSnapshot) -> Prepared:
    """Every service of ``snapshot`` in :data:`CHUNK`-sized chunks (on average), each encoded in one call."""
    count = max(1, math.ceil(len(snapshot.services) / CHUNK))
    members: list[list[ExportedService]] = [[] for _ in range(count)]
    for service in snapshot.services:
        members[_slot(service.key, count)].append(service)
    rows = [(slot, _SERVICES.dump_json(chunk).decode()) for slot, chunk in enumerate(members)]
    return Prepared(owner, head_of(snapshot), snapshot, None, tuple(map(tuple, members)), rows)


def _difference(
    before: Sequence[ExportedService], now: Sequence[ExportedService]
) -> tuple[list[ExportedService], list[ServiceKey]]:
    """The services of ``now`` not in ``before`` as they are, and the keys ``before`` has and ``now`` not.

    Snapshots of one peering keep the objects of unchanged services in their places (a delta is applied in
    key order): then only the few places that hold other objects are compared (:mod:`meshfed.places`).
    Otherwise, by key.
    """
    places = changed_places(before, now, key=_KEY)
    if places is not None:
        return [now[place] for place in places if before[place] != now[place]], []
    held = {service.key: service for service in before}
    keys = {service.key for service in now}
    changed = [service for service in now if (old := held.get(service.key)) is not service and old != service]
    return changed, [key for key in held if key not in keys]
