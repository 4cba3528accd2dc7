"""Snapshots kept as a head and chunks of services (federation/service_rows.py), in both stores that keep them:
imports (ImportStore) and what each peering sent and received (PeeringStore).

A change of one service writes one chunk; whatever this process does not know of what is stored (another
writer, a rolled-back transaction, an old layout) costs a whole write, never a wrong row.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from meshfed.federation import peering_schema
from meshfed.federation.exchange import ExportedService, ServiceSnapshot
from meshfed.federation.imports import _MIGRATIONS as IMPORT_MIGRATIONS
from meshfed.federation.imports import ImportStore
from meshfed.federation.peering_state import Peering, PeerState
from meshfed.federation.peering_store import PeeringStore
from meshfed.federation.service_rows import head_of
from meshfed.sqlite import open_database, transaction

SERVICES = 1_000
_SERVICES = TypeAdapter(list[ExportedService])


def service(index: int, endpoints: int = 3) -> ExportedService:
    return ExportedService(
        name=f"svc-{index}",
        namespace="default",
        ports={"http": 8080},
        healthy_endpoints=endpoints,
        total_endpoints=endpoints,
    )


def snapshot(version: int, services: list[ExportedService], epoch: str = "e1") -> ServiceSnapshot:
    return ServiceSnapshot(
        zone="east",
        trust_domain="east.mesh",
        gateway_addresses=["127.0.0.1:15443"],
        version=version,
        services=services,
        epoch=epoch,
    )


def changed(old: ServiceSnapshot, index: int, endpoints: int) -> ServiceSnapshot:
    """``old`` with service ``index`` given ``endpoints``, the others the very same objects (as a delta keeps)."""
    services = list(old.services)
    services[index] = dataclasses.replace(services[index], healthy_endpoints=endpoints, total_endpoints=endpoints)
    return old.model_copy(update={"version": old.version + 1, "services": services})


def by_key(stored: ServiceSnapshot | None) -> ServiceSnapshot | None:
    """``stored`` with its services ordered by namespace and name: a snapshot's order carries nothing, and
    one read back lists them chunk by chunk."""
    if stored is None:
        return None
    return stored.model_copy(update={"services": sorted(stored.services, key=lambda s: s.key)})


def import_store(path: Path) -> tuple[sqlite3.Connection, ImportStore]:
    db = open_database(path, ImportStore.COMPONENT, ImportStore.MIGRATIONS)
    return db, ImportStore.on(db)


def test_an_import_change_of_one_service_writes_one_row(tmp_path):
    db, imports = import_store(tmp_path / "state.db")
    first = snapshot(1, [service(i) for i in range(SERVICES)])
    assert imports.put("east", first)
    second = changed(first, 7, 4)
    before = db.total_changes
    assert imports.put("east", second)
    assert db.total_changes - before == 2  # the head and svc-7's chunk, not all 16 chunks
    assert by_key(imports.snapshot("east")) == by_key(second)
    db.close()


def test_a_snapshot_that_grew_from_nothing_is_chunked_again(tmp_path):
    """A peer's first snapshot is often empty (it exports nothing yet): once it holds 1,000 services,
    a change of one of them still writes one chunk, not all of them in one."""
    db, imports = import_store(tmp_path / "state.db")
    assert imports.put("east", snapshot(1, []))
    full = snapshot(2, [service(i) for i in range(SERVICES)])
    assert imports.put("east", full)
    before = db.total_changes
    assert imports.put("east", changed(full, 3, 9))
    assert db.total_changes - before == 2
    (size,) = db.execute("SELECT max(length(services)) FROM imported_services WHERE peer = 'east'").fetchone()
    assert size < len(full.model_dump_json()) / 4, "one chunk holds a small part of the services"
    # The head changed under this process (a writer it does not know of), then a snapshot of three
    # services: written whole, and no chunk of the larger one stays.
    with transaction(db):
        db.execute(
            "UPDATE imported_snapshots SET snapshot = ?, epoch = 'e2', version = 9 WHERE peer = 'east'",
            (head_of(snapshot(9, [], epoch="e2")).encode(),),
        )
    small = snapshot(1, [service(i) for i in range(3)], epoch="e3")
    assert imports.put("east", small)
    assert by_key(imports.snapshot("east")) == by_key(small)
    db.close()


def test_import_rows_follow_additions_removals_and_a_refused_update_put_back(tmp_path):
    db, imports = import_store(tmp_path / "state.db")
    first = snapshot(1, [service(i) for i in range(5)])
    assert imports.put("east", first)
    grown = first.model_copy(update={"version": 2, "services": [*first.services[1:], service(9)]})
    assert imports.put("east", grown)
    assert by_key(imports.snapshot("east")) == by_key(grown)
    imports.restore("east", first)  # the update was refused
    assert by_key(imports.snapshot("east")) == by_key(first)
    assert imports.head("east") == ("e1", 1)
    assert not imports.put("east", first)  # a duplicate changes nothing
    assert imports.remove("east")
    assert imports.snapshot("east") is None
    assert db.execute("SELECT count(*) FROM imported_services").fetchone()[0] == 0
    db.close()


def test_a_head_written_by_another_writer_makes_the_next_write_whole(tmp_path):
    """What this process remembers is checked against the stored head: a write it did not make, or one
    rolled back, is never mistaken for what is stored."""
    db, imports = import_store(tmp_path / "state.db")
    first = snapshot(1, [service(i) for i in range(20)])
    assert imports.put("east", first)
    # Another writer stores other content (another process, or an older meshfed restoring a backup):
    # what this process remembers of the table is now wrong.
    other = snapshot(5, [service(i, endpoints=9) for i in range(20)], epoch="e2")
    with transaction(db):
        db.execute("DELETE FROM imported_services")
        db.execute("UPDATE imported_snapshots SET snapshot = ?, version = 5, epoch = 'e2'", (head_of(other).encode(),))
        db.execute(
            "INSERT INTO imported_services VALUES ('east', 0, ?)", (_SERVICES.dump_json(other.services).decode(),)
        )
    assert by_key(imports.snapshot("east")) == by_key(other)
    # This process still remembers `first`; its next write, a change of `first`, must not be a difference.
    third = changed(first, 3, 1).model_copy(update={"version": 6, "epoch": "e2"})
    assert imports.put("east", third)
    assert by_key(imports.snapshot("east")) == by_key(third)

    # A rolled-back write: remembered, never committed.
    fourth = changed(third, 4, 2)

    def failing_unit() -> None:
        with transaction(db):
            imports.put("east", fourth)
            raise RuntimeError("the unit failed after the write")

    with pytest.raises(RuntimeError, match="failed after the write"):
        failing_unit()
    assert by_key(imports.snapshot("east")) == by_key(third)
    fifth = changed(fourth, 5, 2)
    assert imports.put("east", fifth)
    assert by_key(imports.snapshot("east")) == by_key(fifth)
    db.close()


def test_imports_stored_whole_by_an_older_meshfed_read_back_the_same(tmp_path):
    path = tmp_path / "state.db"
    stored = snapshot(3, [service(i) for i in range(4)])
    old = open_database(path, ImportStore.COMPONENT, IMPORT_MIGRATIONS[:2])
    with transaction(old):
        old.execute(
            "INSERT INTO imported_snapshots (peer, version, snapshot, received_at, epoch) VALUES (?, ?, ?, ?, ?)",
            ("east", 3, stored.model_dump_json().encode(), "2026-01-01T00:00:00+00:00", "e1"),
        )
        old.execute(
            "INSERT INTO imported_snapshots (peer, version, snapshot, received_at, epoch) VALUES (?, ?, ?, ?, ?)",
            ("north", 1, b"not json", "2026-01-01T00:00:00+00:00", ""),
        )
    old.close()
    with ImportStore(tmp_path) as imports:
        snapshots, unreadable = imports.read()
        assert snapshots == {"east": stored}
        assert set(unreadable) == {"north"}  # still reported, still one peer's problem only
        assert imports.put("east", changed(stored, 0, 1))
        assert by_key(imports.snapshot("east")) == by_key(changed(stored, 0, 1))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["change", "add", "remove", "restore"]), st.integers(0, 30)),
        min_size=1,
        max_size=12,
    )
)
def test_any_sequence_of_import_writes_reads_back_the_last(tmp_path_factory, steps):
    db, imports = import_store(tmp_path_factory.mktemp("rows") / "state.db")
    current = snapshot(1, [service(i) for i in range(10)])
    assert imports.put("east", current)
    previous = current
    for action, index in steps:
        services = list(current.services)
        if action == "restore":
            imports.restore("east", previous)
            current = previous
            continue
        if action == "change" and services:
            at = index % len(services)
            services[at] = dataclasses.replace(services[at], healthy_endpoints=0, total_endpoints=index % 5)
        elif action == "add" and all(s.name != f"svc-{100 + index}" for s in services):
            services.append(service(100 + index))
        elif action == "remove" and services:
            services.pop(index % len(services))
        previous, current = current, current.model_copy(update={"version": current.version + 1, "services": services})
        assert imports.put("east", current)
    assert by_key(imports.snapshot("east")) == by_key(current)
    db.close()


def test_a_sent_snapshot_change_of_one_service_writes_one_row_and_rows_go_with_the_peering(tmp_path):
    path = tmp_path / "state.db"
    db = open_database(path, peering_schema.COMPONENT, peering_schema.MIGRATIONS)
    store = PeeringStore.on(db)
    now = dt.datetime.now(dt.UTC)
    store.put(Peering("west", "acceptor", PeerState.ACTIVE, now, now, peer_zone="west"))
    first = snapshot(1, [service(i) for i in range(SERVICES)])
    assert store.update("west", sent_version=1, sent_snapshot=first, received_snapshot=first)
    second = changed(first, 11, 7)
    before = db.total_changes
    assert store.update("west", sent_snapshot=second)
    assert db.total_changes - before == 2  # the peering's row and svc-11's chunk
    held = store.require("west", snapshots=True)
    assert by_key(held.sent_snapshot) == by_key(second)
    assert by_key(held.received_snapshot) == by_key(first)
    assert held.sent_services == SERVICES
    assert store.update("west", received_snapshot=None)
    assert store.require("west", snapshots=True).received_snapshot is None
    store.delete("west")
    assert db.execute("SELECT count(*) FROM peering_services").fetchone()[0] == 0
    db.close()


def test_peering_snapshots_stored_whole_by_an_older_meshfed_read_back_the_same(tmp_path):
    path = tmp_path / "state.db"
    sent = snapshot(2, [service(i) for i in range(3)])
    received = snapshot(5, [service(i) for i in range(2)], epoch="w1").model_copy(update={"zone": "west"})
    old = open_database(path, peering_schema.COMPONENT, peering_schema.MIGRATIONS[:4])
    now = peering_schema.iso(dt.datetime.now(dt.UTC))
    with transaction(old):
        old.execute(
            "INSERT INTO peerings (name, role, state, created_at, updated_at, sent_version, sent_snapshot, "
            "received_version, received_snapshot) VALUES ('west', 'dialer', 'ACTIVE', ?, ?, 2, ?, 5, ?)",
            (now, now, sent.model_dump_json(), received.model_dump_json()),
        )
    old.close()
    with PeeringStore(path) as store:
        held = store.require("west", snapshots=True)
        assert held.sent_snapshot == sent
        assert held.received_snapshot == received
