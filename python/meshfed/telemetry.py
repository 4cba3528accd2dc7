"""OpenTelemetry for one zone: metrics at ``/metrics`` (and OTLP), traces of control-plane work.

Each controller gets its own providers and Prometheus registry, so several
zones in one process (tests, the demo) never mix their series. Gateway counters
are observed at collection time from the Rust core's lock-free stats: nothing
is pushed on the data path. OTLP export of metrics and traces turns on when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, as the OpenTelemetry spec prescribes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

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

from meshfed import __version__

StatsSource = Callable[[], Mapping[str, Any]]
# One reading of a gauge: (value, attributes) pairs.
GaugeReadings = Callable[[], Iterable[tuple[float, Mapping[str, str]]]]

# Gateway listener counters exported as monotonic counters: (stats key, metric name, description, unit).
_LISTENER_COUNTERS = (
    ("accepted", "meshfed.gateway.connections", "Connections accepted by a listener", "{connection}"),
    ("bytes_client_to_upstream", "meshfed.gateway.bytes.upstream", "Bytes forwarded from clients to upstreams", "By"),
    ("bytes_upstream_to_client", "meshfed.gateway.bytes.downstream", "Bytes forwarded from upstreams to clients", "By"),
    ("handshake_failures", "meshfed.gateway.handshake_failures", "TLS handshakes that failed", "{handshake}"),
    ("no_route", "meshfed.gateway.no_route", "Connections closed because no route matched the SNI", "{connection}"),
    ("denied", "meshfed.gateway.denied", "Verified callers refused by authorization", "{connection}"),
    (
        "upstream_connect_failures",
        "meshfed.gateway.upstream_connect_failures",
        "Connections that found no reachable endpoint",
        "{connection}",
    ),
)


class Telemetry:
    """Metrics and traces of one zone. :meth:`render` returns the Prometheus text exposition."""

    def __init__(self, zone: str, gateway_stats: StatsSource, *, span_exporter: SpanExporter | None = None) -> None:
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
        self._gateway_stats = gateway_stats
        meter = self._meter_provider.get_meter("meshfed.gateway")
        for key, name, description, unit in _LISTENER_COUNTERS:
            meter.create_observable_counter(name, [self._listener_observer(key)], unit=unit, description=description)
        meter.create_observable_up_down_counter(
            "meshfed.gateway.active_connections",
            [self._listener_observer("active")],
            unit="{connection}",
            description="Connections open now",
        )

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
        return generate_latest(self._registry)

    def shutdown(self) -> None:
        self._meter_provider.shutdown()
        self._tracer_provider.shutdown()

    def _listener_observer(self, key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            listeners: Mapping[str, Mapping[str, Any]] = self._gateway_stats().get("listeners", {})
            return [Observation(stats[key], {"listener": name}) for name, stats in listeners.items() if key in stats]

        return observe
