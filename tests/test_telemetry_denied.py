"""``meshfed.gateway.denied_by_trust_domain``: refused callers by trust domain, with a bounded label set.

The core's stats gain ``denied_by_trust_domain`` per listener; a core built
before that reports none. Whatever the core sends, one listener contributes at
most ``MAX_SERIES_PER_LISTENER`` trust-domain series plus ``<other>``, so a
zone trusting many domains cannot blow up Prometheus.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from meshfed.telemetry import MAX_SERIES_PER_LISTENER, OTHER, Telemetry

DENIED = "meshfed_gateway_denied_by_trust_domain_total"


def scrape(stats: Mapping[str, Any]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    telemetry = Telemetry("east", lambda: stats)
    try:
        families = text_string_to_metric_families(telemetry.render().decode())
        return {(s.name, frozenset(s.labels.items())): s.value for family in families for s in family.samples}
    finally:
        telemetry.shutdown()


def by_trust_domain(samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], listener: str) -> dict[str, float]:
    found = {}
    for (name, labels), value in samples.items():
        attributes = dict(labels)
        if name == DENIED and attributes["listener"] == listener:
            found[attributes["trust_domain"]] = value
    return found


def test_each_trust_domain_is_a_series_beside_the_listener_total() -> None:
    stats = {
        "listeners": {
            "ingress": {"denied": 5, "denied_by_trust_domain": {"west.mesh": 3, "north.mesh": 2}},
            "egress:web.default.west": {"denied": 0, "denied_by_trust_domain": {}},
        }
    }
    samples = scrape(stats)
    assert by_trust_domain(samples, "ingress") == {"west.mesh": 3, "north.mesh": 2}
    assert by_trust_domain(samples, "egress:web.default.west") == {}
    assert samples[("meshfed_gateway_denied_total", frozenset({("listener", "ingress")}))] == 5


def test_trust_domains_past_the_cap_are_summed_as_other_and_the_kept_ones_do_not_move() -> None:
    many = {f"td{i:04}.mesh": i + 1 for i in range(MAX_SERIES_PER_LISTENER + 50)}
    stats = {"listeners": {"ingress": {"denied": sum(many.values()) + 7, "denied_by_trust_domain": {**many, OTHER: 7}}}}
    series = by_trust_domain(scrape(stats), "ingress")
    assert len(series) == MAX_SERIES_PER_LISTENER + 1
    kept = sorted(many)[:MAX_SERIES_PER_LISTENER]
    assert {domain: series[domain] for domain in kept} == {domain: many[domain] for domain in kept}
    # The core's own <other> and every domain past the cap, counted once each: the sum is the total.
    assert series[OTHER] == 7 + sum(many[domain] for domain in sorted(many)[MAX_SERIES_PER_LISTENER:])
    assert sum(series.values()) == stats["listeners"]["ingress"]["denied"]
    # Larger counts elsewhere do not reshuffle which domains keep a series of their own.
    grown = {**many, sorted(many)[-1]: 10**9}
    again = by_trust_domain(scrape({"listeners": {"ingress": {"denied_by_trust_domain": grown}}}), "ingress")
    assert set(again) == set(series)


def test_a_core_without_the_key_exports_no_series_and_everything_else() -> None:
    samples = scrape({"listeners": {"ingress": {"accepted": 4, "denied": 1}}})
    assert not [name for name, _ in samples if name == DENIED]
    assert samples[("meshfed_gateway_denied_total", frozenset({("listener", "ingress")}))] == 1
    assert samples[("meshfed_gateway_connections_total", frozenset({("listener", "ingress")}))] == 4
