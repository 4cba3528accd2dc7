"""The zone's trust store holds parsed bundles in memory, and never a stale copy.

Each ``Zone`` object's :class:`~meshfed.zone.trust_store.TrustStore` keeps
what it read with ``state.db``'s trust revision; these tests check that a
write through another ``Zone`` object, or straight into the file as another
process would, is seen by the very next read, and that reads while nothing
changed do not read the bundles again.
"""

from __future__ import annotations

import sqlite3

import pytest

from meshfed.runstate import STATE_FILE
from meshfed.store import StateStore, StoredBundle
from meshfed.trust.bundle import parse_bundle
from meshfed.trust.spiffe import TrustDomain
from meshfed.zone import Zone
from tests.conftest import ZoneFactory


@pytest.fixture
def bundle_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times any store read every bundle row (the real method runs; this only counts)."""
    reads = [0]
    real = StateStore.bundles

    def counting(store: StateStore) -> list[StoredBundle]:
        reads[0] += 1
        return real(store)

    monkeypatch.setattr(StateStore, "bundles", counting)
    return reads


def test_a_second_zone_object_sees_an_import_and_a_removal_at_once(make_zone: ZoneFactory) -> None:
    east, west = make_zone("east"), make_zone("west")
    other = Zone.open(east.directory)
    assert other.trust.bundle_of(west.trust_domain) is None  # read once, held in memory

    east.trust.import_bundle(parse_bundle(west.trust_domain, west.trust.own_bundle().to_spiffe_json()))
    held = other.trust.bundle_of(west.trust_domain)
    assert held is not None
    assert held.fingerprints() == west.trust.own_bundle().fingerprints()

    east.trust.remove_trust(west.trust_domain)
    assert other.trust.bundle_of(west.trust_domain) is None
    assert [stored.bundle.trust_domain for stored in other.trust.trusted_bundles()] == [east.trust_domain]


def test_a_rotation_through_another_object_changes_the_own_bundle_read_here(make_zone: ZoneFactory) -> None:
    east = make_zone("east")
    reader = Zone.open(east.directory)
    before = reader.trust.own_bundle()
    Zone.open(east.directory).authority.rotate()
    after = reader.trust.own_bundle()
    assert after.sequence == before.sequence + 1
    assert len(after.roots) == 2


def test_a_write_by_another_process_is_seen(make_zone: ZoneFactory) -> None:
    east, west = make_zone("east"), make_zone("west")
    assert east.trust.bundle_of(west.trust_domain) is None
    # What `meshfed trust import` in another process does to the file: its own connection, its own commit.
    with StateStore(east.directory / STATE_FILE) as store:
        store.put_bundle(west.trust.own_bundle(), source="import")
    assert east.trust.bundle_of(west.trust_domain) == west.trust.own_bundle()
    # Even a hand edit that bypasses meshfed's code moves the revision (the trigger is in the file).
    db = sqlite3.connect(east.directory / STATE_FILE)
    with db:
        db.execute("DELETE FROM trust_bundles WHERE trust_domain = ?", (west.trust_domain.name,))
    db.close()
    assert east.trust.bundle_of(west.trust_domain) is None


def test_reads_while_nothing_changes_are_served_from_memory(make_zone: ZoneFactory, bundle_reads: list[int]) -> None:
    east, west = make_zone("east"), make_zone("west")
    east.trust.import_bundle(parse_bundle(west.trust_domain, west.trust.own_bundle().to_spiffe_json()))
    bundle_reads[0] = 0
    for _ in range(50):
        east.trust.trusted_bundles()
        east.trust.own_bundle()
        east.trust.bundle_of(TrustDomain("west.mesh"))
    assert bundle_reads[0] == 1

    east.trust.set_refresh_hint(60)  # a change: the next read reads again, once
    assert east.trust.own_bundle().refresh_hint_seconds == 60
    east.trust.trusted_bundles()
    assert bundle_reads[0] == 2
