"""OpenTelemetry for one zone: metrics at ``/metrics`` (and OTLP), traces of control-plane work.

Each controller gets its own providers and Prometheus registry, so several
zones in one process (tests, the demo) never mix their series. Gateway counters
are observed at collection time from the Rust core's lock-free stats, read once
per scrape: nothing is pushed on the data path. OTLP export of metrics and
traces turns on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, as the
OpenTelemetry spec prescribes.

Names. Each instrument is named so that the Prometheus name carries its unit
once: the exporter appends the unit (``By`` becomes ``_bytes``, ``s``
``_seconds``) and ``_total`` for counters, so ``meshfed.gateway.upstream``
in bytes is ``meshfed_gateway_upstream_bytes_total``. ``tests/test_telemetry.py``
pins every exported name.

Labels. Gateway series carry the object they count (``listener``, ``route``,
``cluster``, ``endpoint``) and, where that object maps to one, the federated
service it serves: ``service`` and ``namespace`` on import listeners
(``egress:<service>.<namespace>.<peer>:<port>``), failover groups
(``failover:<service>.<namespace>:<port>``), ingress routes (per SNI) and local
clusters; ``peer`` and the peer's ``trust_domain`` on import listeners and their
clusters. The ingress listener itself serves every peer and has none.

Expiry gauges (registered by the controller, ``Controller._observe_expiry``): the Unix
time at which the zone's CA root and intermediate, the gateway SVID and each
trusted bundle's first root expire, as ``..._expiry_timestamp_seconds``:
alert on ``meshfed_ca_expiry_timestamp_seconds - time() < 30 * 86400``.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import Span
from opentelemetry.util.types import AttributeValue
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import HistogramMetricFamily, Metric

from meshfed import __version__

log = logging.getLogger(__name__)

StatsSource = Callable[[], Mapping[str, Any]]
# One reading of a gauge: (value, attributes) pairs.
GaugeReadings = Callable[[], Iterable[tuple[float, Mapping[str, str]]]]

# The series of one gateway metric in a stats document: (value, attributes) pairs.
_Readings = Callable[[Mapping[str, Any]], Iterable[tuple[float, Mapping[str, str]]]]
# The objects a metric is kept per (listeners, routes, clusters, endpoints): (attributes, their stats).
_Rows = Callable[[Mapping[str, Any]], Iterator[tuple[dict[str, str], Mapping[str, Any]]]]


class GatewayStats(dict[str, Any]):
    """One reading of the gateway's stats document, with the peers' trust domains it is labelled with."""

    def __init__(self, stats: Mapping[str, Any], peer_trust_domains: Mapping[str, str]) -> None:
        super().__init__(stats)
        self.peer_trust_domains = peer_trust_domains


def _peer_trust_domains(stats: Mapping[str, Any]) -> Mapping[str, str]:
    return stats.peer_trust_domains if isinstance(stats, GatewayStats) else {}


@functools.lru_cache(maxsize=65536)
def _object_labels(name: str) -> tuple[tuple[str, str], ...]:
    """The service (and peer) a listener or cluster name maps to, as label pairs; none for the ingress.

    Service, namespace, peer and port names are DNS labels (no dots or colons), so names parse
    back unambiguously: ``egress:<service>.<namespace>.<peer>:<port>``, ``failover:<service>.<namespace>:<port>``,
    ``local:<namespace>/<service>`` (with ``@<label>=<value>`` for a subset).
    """
    kind, _, rest = name.partition(":")
    if kind in ("egress", "failover"):
        parts = rest.rpartition(":")[0].split(".")
        if kind == "egress" and len(parts) == 3:
            return (("namespace", parts[1]), ("peer", parts[2]), ("service", parts[0]))
        if kind == "failover" and len(parts) == 2:
            return (("namespace", parts[1]), ("service", parts[0]))
    elif kind == "local":
        namespace, slash, service = rest.partition("@")[0].partition("/")
        if slash:
            return (("namespace", namespace), ("service", service))
    return ()


@functools.lru_cache(maxsize=65536)
def _route_labels(sni: str) -> tuple[tuple[str, str], ...]:
    """The service an ingress route's SNI names (``outbound_.<port>_.<subset>_.<service>.<namespace>.svc.<td>``)."""
    _, sep, rest = sni.rpartition("_.")
    service, dot, tail = rest.partition(".")
    namespace, dot2, svc = tail.partition(".")
    if sep and dot and dot2 and svc.startswith("svc."):
        return (("namespace", namespace), ("service", service))
    return ()


def _labelled(kind: str, name: str, stats: Mapping[str, Any]) -> dict[str, str]:
    attributes = {kind: name, **dict(_object_labels(name))}
    peer = attributes.get("peer")
    if peer is not None:
        trust_domain = _peer_trust_domains(stats).get(peer)
        if trust_domain is not None:
            attributes["trust_domain"] = trust_domain
    return attributes


def _listeners(stats: Mapping[str, Any]) -> Iterator[tuple[dict[str, str], Mapping[str, Any]]]:
    listeners: Mapping[str, Mapping[str, Any]] = stats.get("listeners", {})
    for name, listener in listeners.items():
        yield _labelled("listener", name, stats), listener


def _routes(stats: Mapping[str, Any]) -> Iterator[tuple[dict[str, str], Mapping[str, Any]]]:
    for attributes, listener in _listeners(stats):
        routes: Mapping[str, Mapping[str, Any]] = listener.get("routes", {})
        for sni, route in routes.items():
            yield {**attributes, "route": sni, **dict(_route_labels(sni))}, route


def _clusters(stats: Mapping[str, Any]) -> Iterator[tuple[dict[str, str], Mapping[str, Any]]]:
    # A controller without a running gateway reports no "clusters" at all.
    clusters: Mapping[str, Mapping[str, Any]] = stats.get("clusters", {})
    for name, cluster in clusters.items():
        yield _labelled("cluster", name, stats), cluster


def _endpoints(stats: Mapping[str, Any]) -> Iterator[tuple[dict[str, str], Mapping[str, Any]]]:
    for attributes, cluster in _clusters(stats):
        endpoints: Mapping[str, Mapping[str, Any]] = cluster.get("endpoints", {})
        for address, endpoint in endpoints.items():
            yield {**attributes, "endpoint": address}, endpoint


def _field(rows: _Rows, key: str) -> _Readings:
    def read(stats: Mapping[str, Any]) -> list[tuple[float, Mapping[str, str]]]:
        # int(): healthy and ejected are JSON booleans, exported as 1 and 0.
        return [(int(row[key]), attributes) for attributes, row in rows(stats) if key in row]

    return read


def _handshake_failures(stats: Mapping[str, Any]) -> Iterator[tuple[float, Mapping[str, str]]]:
    # One series per reason rather than a listener total beside them: the core
    # counts every failure under exactly one reason, so sum() gives the total.
    for attributes, listener in _listeners(stats):
        reasons: Mapping[str, int] = listener.get("handshake_failure_reasons", {})
        for reason, count in reasons.items():
            yield count, {**attributes, "reason": reason}


# Label values one listener may contribute to a per-caller metric. The core bounds its own maps
# (1000 identities per listener, the rest under "<other>"), but a scrape is listeners x values, and
# Prometheus keeps every series it ever saw: what is exported is capped here too, whatever the core sends.
MAX_SERIES_PER_LISTENER = 100
OTHER = "<other>"


def _capped(counts: Mapping[str, int], limit: int = MAX_SERIES_PER_LISTENER) -> Iterator[tuple[str, int]]:
    """``counts`` with at most ``limit`` keys of their own; the rest (and the core's ``<other>``) summed as ``<other>``.

    The kept keys are the first by name, not the largest: a series must not
    appear and vanish as counts change, or its rate() would break.
    """
    named = sorted(key for key in counts if key != OTHER)
    for key in named[:limit]:
        yield key, counts[key]
    rest = sum(counts[key] for key in named[limit:]) + counts.get(OTHER, 0)
    if rest or OTHER in counts or len(named) > limit:
        yield OTHER, rest


def _denied_by_trust_domain(stats: Mapping[str, Any]) -> Iterator[tuple[float, Mapping[str, str]]]:
    # A core built before the key existed reports none: the metric then has no series, not an error.
    for attributes, listener in _listeners(stats):
        counts: Mapping[str, int] = listener.get("denied_by_trust_domain") or {}
        for trust_domain, count in _capped(counts):
            yield count, {**attributes, "trust_domain": trust_domain}


_Kind = Literal["counter", "up_down_counter", "gauge"]

# Every gateway metric: (kind, name, description, unit, its series in a stats document).
# Counts of things open now are up-down counters (they add up across listeners,
# clusters, endpoints); states that do not add up (healthy, ejected) are gauges.
_GATEWAY_METRICS: tuple[tuple[_Kind, str, str, str, _Readings], ...] = (
    # Listeners.
    (
        "counter",
        "meshfed.gateway.connections",
        "Connections accepted by a listener",
        "{connection}",
        _field(_listeners, "accepted"),
    ),
    (
        "counter",
        "meshfed.gateway.upstream",
        "Bytes forwarded from clients to upstreams",
        "By",
        _field(_listeners, "bytes_client_to_upstream"),
    ),
    (
        "counter",
        "meshfed.gateway.downstream",
        "Bytes forwarded from upstreams to clients",
        "By",
        _field(_listeners, "bytes_upstream_to_client"),
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
        _field(_listeners, "no_route"),
    ),
    (
        "counter",
        "meshfed.gateway.denied",
        "Verified callers refused by authorization",
        "{connection}",
        _field(_listeners, "denied"),
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
        _field(_listeners, "upstream_connect_failures"),
    ),
    (
        "up_down_counter",
        "meshfed.gateway.active_connections",
        "Connections open now",
        "{connection}",
        _field(_listeners, "active"),
    ),
    # Routes, by listener and SNI pattern.
    (
        "counter",
        "meshfed.gateway.route.connections",
        "Connections matched by a route, before its rate limits",
        "{connection}",
        _field(_routes, "connections"),
    ),
    (
        "counter",
        "meshfed.gateway.route.rate_limited",
        "Connections refused by a route's rate limit or per-caller rate limit",
        "{connection}",
        _field(_routes, "rate_limited"),
    ),
    # Clusters.
    (
        "counter",
        "meshfed.gateway.cluster.connections",
        "Upstream connections established to a cluster's endpoints",
        "{connection}",
        _field(_clusters, "connections"),
    ),
    (
        "counter",
        "meshfed.gateway.cluster.connect_failures",
        "Failed connect attempts to a cluster's endpoints (each retry counts)",
        "{attempt}",
        _field(_clusters, "connect_failures"),
    ),
    (
        "counter",
        "meshfed.gateway.cluster.circuit_open",
        "Connections refused because the cluster's circuit breaker was open",
        "{connection}",
        _field(_clusters, "circuit_open"),
    ),
    (
        "counter",
        "meshfed.gateway.cluster.ejections",
        "Endpoints of the cluster ejected by outlier detection",
        "{ejection}",
        _field(_clusters, "ejections"),
    ),
    (
        "counter",
        "meshfed.gateway.cluster.sent",
        "Bytes sent to a cluster's endpoints",
        "By",
        _field(_clusters, "bytes_sent"),
    ),
    (
        "counter",
        "meshfed.gateway.cluster.received",
        "Bytes received from a cluster's endpoints",
        "By",
        _field(_clusters, "bytes_received"),
    ),
    (
        "up_down_counter",
        "meshfed.gateway.cluster.active_connections",
        "Upstream connections open now",
        "{connection}",
        _field(_clusters, "active"),
    ),
    (
        "up_down_counter",
        "meshfed.gateway.cluster.pending_connections",
        "Upstream connects in progress now",
        "{connection}",
        _field(_clusters, "pending"),
    ),
    # Endpoints, by cluster and address.
    (
        "counter",
        "meshfed.gateway.endpoint.connections",
        "Upstream connections established to an endpoint",
        "{connection}",
        _field(_endpoints, "connections"),
    ),
    (
        "counter",
        "meshfed.gateway.endpoint.connect_failures",
        "Failed connect attempts to an endpoint",
        "{attempt}",
        _field(_endpoints, "connect_failures"),
    ),
    (
        "counter",
        "meshfed.gateway.endpoint.ejections",
        "Times outlier detection ejected an endpoint",
        "{ejection}",
        _field(_endpoints, "ejections"),
    ),
    (
        "up_down_counter",
        "meshfed.gateway.endpoint.active_connections",
        "Upstream connections open now to an endpoint",
        "{connection}",
        _field(_endpoints, "active"),
    ),
    (
        "gauge",
        "meshfed.gateway.endpoint.healthy",
        "1 while the endpoint is neither ejected nor failing active health checks, else 0",
        "1",
        _field(_endpoints, "healthy"),
    ),
    (
        "gauge",
        "meshfed.gateway.endpoint.ejected",
        "1 while outlier detection keeps the endpoint ejected, else 0",
        "1",
        _field(_endpoints, "ejected"),
    ),
)

# The cluster latency histograms: (stats key, Prometheus name, help).
_CLUSTER_HISTOGRAMS = (
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


class Telemetry:
    """Metrics and traces of one zone. :meth:`render` returns the Prometheus text exposition."""

    def __init__(
        self,
        zone: str,
        gateway_stats: StatsSource,
        *,
        span_exporter: SpanExporter | None = None,
        peer_trust_domains: Callable[[], Mapping[str, str]] = dict,
    ) -> None:
        """``peer_trust_domains`` (peering name to trust domain) labels the series of each peer's imports."""
        resource = Resource.create({"service.name": "meshfed", "service.version": __version__, "meshfed.zone": zone})
        otlp = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
        self._registry = CollectorRegistry(auto_describe=True)
        readers: list[MetricReader] = [PrometheusMetricReader(registry=self._registry, scope_info_enabled=False)]
        self._tracer_provider = TracerProvider(resource=resource)
        if span_exporter is not None:
            self._tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        if otlp:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
            self._tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self._meter_provider = MeterProvider(metric_readers=readers, resource=resource)
        self._tracer = self._tracer_provider.get_tracer("meshfed")

        def labelled_stats() -> GatewayStats:
            stats = gateway_stats()
            try:
                trust_domains = peer_trust_domains()
            except Exception:
                # Labels are a convenience: the series stay, without the peers' trust domains.
                log.warning("peer trust domains unreadable; gateway series go without them this time", exc_info=True)
                trust_domains = {}
            return GatewayStats(stats, trust_domains)

        self._gateway_stats = _OncePerScrape(labelled_stats)
        meter = self._meter_provider.get_meter("meshfed.gateway")
        create: dict[_Kind, Callable[..., object]] = {
            "counter": meter.create_observable_counter,
            "up_down_counter": meter.create_observable_up_down_counter,
            "gauge": meter.create_observable_gauge,
        }
        for kind, name, description, unit, readings in _GATEWAY_METRICS:
            create[kind](name, [self._observer(readings)], unit=unit, description=description)
        self._registry.register(_ClusterHistograms(self._gateway_stats))

    @property
    def meter_provider(self) -> MeterProvider:
        """For other parts of the zone (peering, catalog) to register their own instruments."""
        return self._meter_provider

    def add_gauge(self, name: str, description: str, unit: str, read: GaugeReadings) -> None:
        """A gauge read at collection time (peering state, heartbeat age, catalog size, ...)."""

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, dict(attributes)) for value, attributes in read()]

        self._meter_provider.get_meter("meshfed").create_observable_gauge(
            name, [observe], unit=unit, description=description
        )

    @contextmanager
    def span(self, name: str, **attributes: AttributeValue) -> Iterator[Span]:
        """A span around control-plane work (config applies, peering, sync rounds)."""
        with self._tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span

    def render(self) -> bytes:
        """Every metric series, in the Prometheus text format."""
        with self._gateway_stats.scrape():
            return generate_latest(self._registry)

    def shutdown(self) -> None:
        self._meter_provider.shutdown()
        self._tracer_provider.shutdown()

    def _observer(self, readings: _Readings) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, dict(attributes)) for value, attributes in readings(self._gateway_stats())]

        return observe


class _OncePerScrape:
    """The gateway stats, read once per scrape however many instruments observe them.

    Each read parses the core's whole stats document, and a scrape runs two
    dozen callbacks and the histogram collector. Inside :meth:`scrape` the first
    read is kept for the rest of that scrape; it is kept per thread, as
    collection runs on the thread that scrapes, so concurrent scrapes each get
    their own fresh reading and no scrape ever sees an older one (a time-window
    cache would). Outside a scrape (OTLP exports, once a minute) every call
    reads afresh.
    """

    def __init__(self, read: StatsSource) -> None:
        self._read = read
        self._pinned = threading.local()

    @contextmanager
    def scrape(self) -> Iterator[None]:
        self._pinned.stats = None
        try:
            yield
        finally:
            del self._pinned.stats

    def __call__(self) -> Mapping[str, Any]:
        if not hasattr(self._pinned, "stats"):
            return self._read_or_nothing()
        if self._pinned.stats is None:
            self._pinned.stats = self._read_or_nothing()
        stats: Mapping[str, Any] = self._pinned.stats
        return stats

    def _read_or_nothing(self) -> Mapping[str, Any]:
        # An unreadable gateway leaves its series out of this scrape; raising
        # here would fail the whole exposition, peering and catalog metrics too.
        try:
            return self._read()
        except Exception:
            log.warning("gateway stats unreadable; gateway metrics left out of this collection", exc_info=True)
            return {}


class _ClusterHistograms:
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
        return [HistogramMetricFamily(name, documentation) for _, name, documentation in _CLUSTER_HISTOGRAMS]

    def collect(self) -> Iterable[Metric]:
        clusters = list(_clusters(self._stats()))
        # The labels any cluster has, as the OpenTelemetry exporter does for the other metrics.
        labels = sorted({label for attributes, _ in clusters for label in attributes})
        for key, name, documentation in _CLUSTER_HISTOGRAMS:
            family = HistogramMetricFamily(name, documentation, labels=labels, unit="seconds")
            for attributes, cluster in clusters:
                if key in cluster:
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
