"""Snapshots kept in ``state.db`` as a head and a row per service, written by difference.

A snapshot of 10,000 services is 1.6 MB of JSON. Stored whole, every change of
one service cost each peering that much JSON to encode and write, on both
sides (what was sent, what was received, what is imported): the largest
single cost of a change at that size, and it competed for the CPU with
applying the change. Here a snapshot is its *head* (every field but the
services, a few hundred bytes, kept where the whole document was) and one
row per service in a table of the store's own; a write encodes and stores
only the services that differ from the stored ones.

What is stored is known without reading it back: each process remembers the
last snapshot it wrote under each owner (:class:`ServiceRows` below), and a
write checks, in the transaction that stores the new head, that the stored
head is still that snapshot's. A head names its content (the sender's zone,
an epoch and a version, never reused for other content), so the same head
means the same rows, in whichever file. Any other head (another process or
zone wrote, a transaction rolled back, the process just started) makes the
write a whole one: a lost memory costs one whole write, never a wrong row. The services compared are
the same objects when unchanged (a delta keeps them), so finding the change
is a lookup per service, not an encoding.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import TypeAdapter

from meshfed.federation.exchange import ExportedService, ServiceSnapshot

ServiceKey = tuple[str, str]
"""A service's (namespace, name)."""

_SERVICE = TypeAdapter(ExportedService)


def head_of(snapshot: ServiceSnapshot) -> str:
    """``snapshot`` without its services, as stored beside the rows."""
    return snapshot.model_dump_json(exclude={"services"})


def whole_document(head: str | bytes, services: Sequence[str]) -> str:
    """The whole snapshot document of a stored ``head`` and its services' rows (to parse as one)."""
    text = head.decode() if isinstance(head, bytes) else head
    if not text.endswith("}") or text.startswith("{}"):
        return text  # not a head this module wrote: parsing it reports it unreadable
    return f'{text[:-1]},"services":[{",".join(services)}]}}'


@dataclass(frozen=True)
class Prepared:
    """A write encoded ahead of its transaction (:meth:`ServiceRows.prepare`), off the store's connection."""

    owner: tuple[str, ...]
    head: str | None
    snapshot: ServiceSnapshot | None
    # The difference from the snapshot last written under this owner, whose head is ``base``.
    base: str | None
    upserts: list[tuple[str, str, str]] = field(default_factory=list)
    removed: list[ServiceKey] = field(default_factory=list)
    # ``snapshot``'s services by key, when the difference needed them (remembered as they are).
    by_key: Mapping[ServiceKey, ExportedService] | None = None


@dataclass(frozen=True)
class _Written:
    head: str
    services: Mapping[ServiceKey, ExportedService]


class ServiceRows:
    """The service rows of one table, by owner: ``owner_columns`` are SQL column definitions (a name first)
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
        """The migration creating the table: the owner's columns, then each service's namespace, name and
        JSON document, keyed by all but the document."""
        return (
            f"CREATE TABLE {self._table} ({', '.join(self._definitions)}, namespace TEXT NOT NULL, "
            f"name TEXT NOT NULL, document TEXT NOT NULL, PRIMARY KEY ({', '.join(self._owner)}, namespace, name)) "
            "STRICT, WITHOUT ROWID;"
        )

    def prepare(self, owner: tuple[str, ...], snapshot: ServiceSnapshot | None) -> Prepared:
        """Encode what writing ``snapshot`` (None: no snapshot) under ``owner`` changes since this process's
        last write there. Cheap for a change of a few services."""
        if snapshot is None:
            return Prepared(owner, None, None, None)
        with self._lock:
            last = self._written.get(owner)
        if last is None:
            return Prepared(owner, head_of(snapshot), snapshot, None)
        now = {service.key: service for service in snapshot.services}
        before = last.services
        upserts = [
            (service.namespace, service.name, _SERVICE.dump_json(service).decode())
            for key, service in now.items()
            if (held := before.get(key)) is not service and held != service
        ]
        removed = [key for key in before if key not in now]
        return Prepared(owner, head_of(snapshot), snapshot, last.head, upserts, removed, now)

    def write(self, db: sqlite3.Connection, prepared: Prepared, stored_head: str | None) -> None:
        """Store ``prepared``'s rows, inside the transaction that stores its head where ``stored_head`` was.

        By difference when ``stored_head`` is the head the difference was taken from; whole otherwise.
        """
        if prepared.snapshot is None:
            db.execute(f"DELETE FROM {self._table} WHERE {self._where}", prepared.owner)  # noqa: S608
            self._remember(prepared.owner, None)
            return
        if prepared.base is None or prepared.base != stored_head:
            db.execute(f"DELETE FROM {self._table} WHERE {self._where}", prepared.owner)  # noqa: S608
            rows = [
                (*prepared.owner, s.namespace, s.name, _SERVICE.dump_json(s).decode())
                for s in prepared.snapshot.services
            ]
        else:
            db.executemany(
                f"DELETE FROM {self._table} WHERE {self._where} AND namespace = ? AND name = ?",  # noqa: S608
                [(*prepared.owner, *key) for key in prepared.removed],
            )
            rows = [(*prepared.owner, *upsert) for upsert in prepared.upserts]
        marks = ", ".join("?" * (len(self._owner) + 3))
        db.executemany(f"INSERT OR REPLACE INTO {self._table} VALUES ({marks})", rows)  # noqa: S608
        self._remember(prepared.owner, prepared)

    def read(self, db: sqlite3.Connection, owner: tuple[str, ...]) -> list[str]:
        """The stored services' documents under ``owner``, ordered by namespace and name."""
        return [
            str(row[0])
            for row in db.execute(
                f"SELECT document FROM {self._table} WHERE {self._where} ORDER BY namespace, name",  # noqa: S608
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
                services = prepared.by_key
                if services is None:
                    services = {service.key: service for service in prepared.snapshot.services}
                self._written[owner] = _Written(prepared.head, services)
