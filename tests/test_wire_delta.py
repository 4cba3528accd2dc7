"""A delta between two snapshots turns the older into the newer, by whichever path ``wire.diff`` takes.

The exporter diffs snapshots that share the summaries of unchanged services
(one pass by identity when no service came or went), or that do not (a map of
each); the importer applies the delta and validates only what is new. Either
way the result is the newer snapshot, and a delta beyond the limits is refused.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshfed.errors import PeerInputError
from meshfed.federation import wire
from meshfed.federation.exchange import ExportedService, ServiceSnapshot

NAMES = [f"svc-{index}" for index in range(8)]


def summary(name: str, endpoints: int, port: int = 8080) -> ExportedService:
    return ExportedService(
        name=name, namespace="default", ports={"tcp": port}, healthy_endpoints=endpoints, total_endpoints=endpoints
    )


def snapshot(
    version: int, services: list[ExportedService], addresses: tuple[str, ...] = ("127.0.0.1:1",)
) -> ServiceSnapshot:
    return ServiceSnapshot(
        zone="east",
        trust_domain="east.mesh",
        gateway_addresses=list(addresses),
        version=version,
        epoch="e1",
        services=sorted(services, key=lambda s: s.key),
    )


# Per name: absent, or a summary with some endpoint count; "same" keeps the old object itself.
_CHANGE = st.one_of(st.none(), st.just("same"), st.integers(min_value=0, max_value=3))


@given(
    before=st.dictionaries(st.sampled_from(NAMES), st.integers(min_value=0, max_value=3)),
    changes=st.dictionaries(st.sampled_from(NAMES), _CHANGE),
    moved=st.booleans(),
)
def test_a_delta_applied_to_the_old_snapshot_gives_the_new_one(
    before: dict[str, int], changes: dict[str, object], moved: bool
) -> None:
    old_services = {name: summary(name, count) for name, count in before.items()}
    new_services = dict(old_services)  # unchanged services are the very same objects, as a zone shares them
    for name, change in changes.items():
        if change is None:
            new_services.pop(name, None)
        elif change != "same":
            assert isinstance(change, int)
            new_services[name] = summary(name, change)
    old = snapshot(1, list(old_services.values()))
    new = snapshot(2, list(new_services.values()), ("127.0.0.2:1",) if moved else ("127.0.0.1:1",))

    delta = wire.diff(old, new)
    applied = wire.apply_delta(old, delta)

    assert applied.services == new.services
    assert (applied.version, applied.epoch, applied.gateway_addresses) == (2, "e1", new.gateway_addresses)
    # Only what differs travels: an equal summary (a new object or the same) is not sent again.
    changed = {s.name for s in new.services if old_services.get(s.name) != s}
    assert {s.name for s in delta.upserted} == changed
    assert {k.name for k in delta.removed} == old_services.keys() - new_services.keys()
    assert wire.same_content(old, new) == (not changed and not delta.removed and not moved)


def test_equal_content_in_another_order_is_the_same_content() -> None:
    services = [summary("a", 1), summary("b", 2)]
    ordered = snapshot(1, services)
    reversed_order = ordered.model_copy(update={"services": [summary("b", 2), summary("a", 1)], "version": 2})
    assert wire.same_content(ordered, reversed_order)
    assert not wire.same_content(ordered, ordered.model_copy(update={"services": [summary("a", 1), summary("b", 3)]}))


def test_a_delta_that_would_exceed_the_service_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_SERVICES", 2)
    old = snapshot(1, [summary("a", 1), summary("b", 1)])
    grown = wire.diff(old, snapshot(2, [summary("a", 1), summary("b", 1), summary("c", 1)]))
    with pytest.raises(PeerInputError, match="3 services, more than 2"):
        wire.apply_delta(old, grown)


def test_a_delta_with_a_bad_header_is_refused_naming_the_field() -> None:
    old = snapshot(1, [summary("a", 1)])
    delta = wire.diff(old, snapshot(2, [summary("a", 2)]))
    delta.gateway_addresses[:] = ["not an address"]
    with pytest.raises(PeerInputError, match=r"delta\.gateway_addresses\[0\]"):
        wire.apply_delta(old, delta)
