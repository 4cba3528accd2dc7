"""Every gateway metric: its instrument kind, name, description, unit and series, and the latency histograms.

The counters, up-down counters and gauges are OpenTelemetry instruments
observed at collection time (:class:`~meshfed.telemetry.providers.Telemetry`
creates them from :data:`GATEWAY_METRICS`); the clusters' latency histograms
are a Prometheus collector (:class:`ClusterHistograms`), as the core already
keeps their buckets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from prometheus_client.metrics_core import HistogramMetricFamily, Metric

from meshfed.gateway.stats import StatsObject
from meshfed.telemetry.gateway_stats import (
    MAX_SERIES_PER_LISTENER,
    OTHER,
    ROWS,
    StatsSource,
    capped,
    cluster_rows,
    listener_rows,
)

# The series of one gateway metric in a stats document: (value, attributes) pairs.
Readings = Callable[[Mapping[str, Any]], Iterable[tuple[float, Mapping[str, str]]]]


@dataclass(frozen=True)
class Field:
    """A metric read from one field of every object of a kind: ``key`` of each listener, route, cluster or endpoint.

    Kept as data, not a closure, so ``tests/test_stats_schema.py`` can check each
    key against the Rust core's stats schema.
    """

    of: StatsObject
    key: str

    def __call__(self, stats: Mapping[str, Any]) -> list[tuple[float, Mapping[str, str]]]:
        # int(): healthy and ejected are JSON booleans, exported as 1 and 0.
        return [(int(cast("int", row[self.key])), attributes) for attributes, row in ROWS[self.of](stats)]


def _handshake_failures(stats: Mapping[str, Any]) -> Iterator[tuple[float, Mapping[str, str]]]:
    # One series per reason rather than a listener total beside them: the core
    # counts every failure under exactly one reason, so sum() gives the total.
    for attributes, listener in listener_rows(stats):
        reasons: Mapping[str, int] = listener.get("handshake_failure_reasons", {})
        for reason, count in reasons.items():
            yield count, {**attributes, "reason": reason}


def _denied_by_trust_domain(stats: Mapping[str, Any]) -> Iterator[tuple[float, Mapping[str, str]]]:
    # A core built before the key existed reports none: the metric then has no series, not an error.
    for attributes, listener in listener_rows(stats):
        counts: Mapping[str, int] = listener.get("denied_by_trust_domain") or {}
        for trust_domain, count in capped(counts):
            yield count, {**attributes, "trust_domain": trust_domain}


Kind = Literal["counter", "up_down_counter", "gauge"]

# Every gateway metric: (kind, name, description, unit, its series in a stats document).
# Counts of things open now are up-down counters (they add up across listeners,
# clusters, endpoints); states that do not add up (healthy, ejected) are gauges.
GATEWAY_METRICS: tuple[tuple[Kind, str, str, str, Readings], ...] = (
    # Listeners.
    (
        "counter",
        "meshfed.gateway.connections",
        "Connections accepted by a listener",
        "{connection}",
        Field("listener", "accepted"),
    ),
    (
        "counter",
        "meshfed.gateway.upstream",
        "Bytes forwarded from clients to upstreams",
        "By",
        Field("listener", "bytes_client_to_upstream"),
    ),
    (
        "counter",
        "meshfed.gateway.downstream",
        "Bytes forwarded from upstreams to clients",
        "By",
        Field("listener", "bytes_upstream_to_client"),
    ),
    (
        "counter",
        "meshfed.gateway.handshake_failures",
        "ClientHello reads and TLS handshakes that failed, by reason",
        "{handshake}",
        _handshake_failures,
    ),
    (
        "counter",
        "meshfed.gateway.no_route",
        "Connections closed because no route matched the SNI",
        "{connection}",
        Field("listener", "no_route"),
    ),
    (
        "counter",
        "meshfed.gateway.denied",
        "Verified callers refused by authorization",
        "{connection}",
        Field("listener", "denied"),
    ),
    (
        # Beside the total, not in it: one metric mixing series with and without the label would double-count.
        "counter",
        "meshfed.gateway.denied_by_trust_domain",
        f"Verified callers refused by authorization, by their SPIFFE trust domain "
        f"(at most {MAX_SERIES_PER_LISTENER} per listener, the rest as {OTHER})",
        "{connection}",
        _denied_by_trust_domain,
    ),
    (
        "counter",
        "meshfed.gateway.upstream_connect_failures",
        "Connections that found no reachable endpoint",
        "{connection}",
        Field("listener", "upstream_connect_failures"),
    ),
    (
        "up_down_counter",
        "meshfed.gateway.active_connections",
        "Connections open now",
        "{connection}",
        Field("listener", "active"),
    ),
    (
        "up_down_counter",
        "meshfed.gateway.handshaking_connections",
        "Connections open now that have not finished their handshake (limits.max_handshakes caps them)",
        "{connection}",
        Field("listener", "handshaking"),
    ),
    (
        "counter",
        "meshfed.gateway.connections_refused_over_limit",
        "Connections closed at once because the listener had limits.max_connections open",
        "{connection}",
        Field("listener", "connections_refused_over_limit"),
    ),
    (
        "counter",
        "meshfed.gateway.handshakes_refused_over_limit",
        "Connections closed at once because the listener had limits.max_handshakes unfinished handshakes",
        "{connection}",
        Field("listener", "handshakes_refused_over_limit"),
    ),
    (
        "counter",
        "meshfed.gateway.accept_errors",
        "Failed accept() calls of a listener, e.g. out of file descriptors",
        "{error}",
        Field("listener", "accept_errors"),
    ),
    (
        "counter",
        "meshfed.gateway.probes",
        "Connections a client closed before sending a byte (TCP health checks, scans): not handshake failures",
        "{connection}",
        Field("listener", "probes"),
    ),
    (
        "counter",
        "meshfed.gateway.tunnels",
        "Tunnel connections between gateways opened: accepted by an ingress, dialled by an egress",
        "{connection}",
        Field("listener", "tunnels"),
    ),
    (
        "counter",
        "meshfed.gateway.tunnel_streams",
        "Client connections carried as tunnel streams: opened by a peer at an ingress, sent by an egress",
        "{connection}",
        Field("listener", "tunnel_streams"),
    ),
    # Routes, by listener and SNI pattern.
    (
        "counter",
        "meshfed.gateway.route.connections",
        "Connections matched by a route, before its rate limits",
        "{connection}",
        Field("route", "connections"),
    ),
    (
        "counter",
        "meshfed.gateway.route.rate_limited",
        "Connections refused by a route's rate limit or per-caller rate limit",
        "{connection}",
        Field("route", "rate_limited"),
    ),
    # Clusters.
    (
        "counter",
        "meshfed.gateway.cluster.connections",
        "Upstream connections established to a cluster's endpoints",
        "{connection}",
        Field("cluster", "connections"),
    ),
    (
        "counter",
        "meshfed.gateway.cluster.connect_failures",
        "Failed connect attempts to a cluster's endpoints (each retry counts)",
        "{attempt}",
        Field("cluster", "connect_failures"),
    ),
    (
        "counter",
        "meshfed.gateway.cluster.circuit_open",
        "Connections refused because the cluster's circuit breaker was open",
        "{connection}",
        Field("cluster", "circuit_open"),
    ),
    (
        "counter",
        "meshfed.gateway.cluster.ejections",
        "Endpoints of the cluster ejected by outlier detection",
        "{ejection}",
        Field("cluster", "ejections"),
    ),
    (
        "counter",
        "meshfed.gateway.cluster.sent",
        "Bytes sent to a cluster's endpoints",
        "By",
        Field("cluster", "bytes_sent"),
    ),
    (
        "counter",
        "meshfed.gateway.cluster.received",
        "Bytes received from a cluster's endpoints",
        "By",
        Field("cluster", "bytes_received"),
    ),
    (
        "up_down_counter",
        "meshfed.gateway.cluster.active_connections",
        "Upstream connections open now",
        "{connection}",
        Field("cluster", "active"),
    ),
    (
        "up_down_counter",
        "meshfed.gateway.cluster.pending_connections",
        "Upstream connects in progress now",
        "{connection}",
        Field("cluster", "pending"),
    ),
    # Endpoints, by cluster and address.
    (
        "counter",
        "meshfed.gateway.endpoint.connections",
        "Upstream connections established to an endpoint",
        "{connection}",
        Field("endpoint", "connections"),
    ),
    (
        "counter",
        "meshfed.gateway.endpoint.connect_failures",
        "Failed connect attempts to an endpoint",
        "{attempt}",
        Field("endpoint", "connect_failures"),
    ),
    (
        "counter",
        "meshfed.gateway.endpoint.ejections",
        "Times outlier detection ejected an endpoint",
        "{ejection}",
        Field("endpoint", "ejections"),
    ),
    (
        "up_down_counter",
        "meshfed.gateway.endpoint.active_connections",
        "Upstream connections open now to an endpoint",
        "{connection}",
        Field("endpoint", "active"),
    ),
    (
        "gauge",
        "meshfed.gateway.endpoint.healthy",
        "1 while the endpoint is neither ejected nor failing active health checks, else 0",
        "1",
        Field("endpoint", "healthy"),
    ),
    (
        "gauge",
        "meshfed.gateway.endpoint.ejected",
        "1 while outlier detection keeps the endpoint ejected, else 0",
        "1",
        Field("endpoint", "ejected"),
    ),
)

# The cluster latency histograms: (stats key, Prometheus name, help).
CLUSTER_HISTOGRAMS: tuple[tuple[Literal["connect_latency", "duration"], str, str], ...] = (
    (
        "connect_latency",
        "meshfed_gateway_cluster_connect_latency_seconds",
        "Time to open an upstream connection to one of the cluster's endpoints",
    ),
    (
        "duration",
        "meshfed_gateway_cluster_connection_duration_seconds",
        "Lifetime of upstream connections to the cluster, recorded when they close",
    ),
)


class ClusterHistograms:
    """The clusters' latency histograms, bucket by bucket, as a collector on the zone's Prometheus registry.

    Not OpenTelemetry instruments: the SDK has no asynchronous histogram, its
    readers take no custom metric producer, and replaying the core's bucket
    counts into a synchronous histogram would take one ``record()`` per
    connection. The core already keeps the histograms; exposing them as they are
    gives real ``_bucket`` series, at the price of leaving them out of OTLP.
    """

    def __init__(self, stats: StatsSource) -> None:
        self._stats = stats

    def describe(self) -> Iterable[Metric]:
        # Names only, so that registering does not read the gateway.
        return [HistogramMetricFamily(name, documentation) for _, name, documentation in CLUSTER_HISTOGRAMS]

    def collect(self) -> Iterable[Metric]:
        clusters = list(cluster_rows(self._stats()))
        # The labels any cluster has, as the OpenTelemetry exporter does for the other metrics.
        labels = sorted({label for attributes, _ in clusters for label in attributes})
        for key, name, documentation in CLUSTER_HISTOGRAMS:
            family = HistogramMetricFamily(name, documentation, labels=labels, unit="seconds")
            for attributes, cluster in clusters:
                histogram = cluster[key]
                values = [attributes.get(label, "") for label in labels]
                family.add_metric(values, _buckets(histogram), histogram["sum_us"] / 1e6)
            yield family


def _buckets(histogram: Mapping[str, Any]) -> list[tuple[str, float]]:
    """Prometheus buckets (cumulative, in seconds) from a core histogram snapshot.

    The core counts values per bucket, each below its bound, so at or below it
    as Prometheus's ``le`` means; its last bucket is open-ended, i.e. ``+Inf``.
    """
    buckets: list[tuple[str, float]] = []
    total = 0
    for bound_us, count in zip(histogram["le_us"], histogram["counts"], strict=True):
        total += count
        buckets.append((repr(bound_us / 1e6), total))
    return [*buckets[:-1], ("+Inf", total)]


__all__ = ["CLUSTER_HISTOGRAMS", "GATEWAY_METRICS", "ClusterHistograms", "Field", "Kind", "Readings"]
