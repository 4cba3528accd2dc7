"""One zone's OpenTelemetry providers: its Prometheus registry, OTLP export when configured, spans.

:class:`Telemetry` gives each controller its own meter and tracer providers and
Prometheus registry, registers the gateway's metrics
(:mod:`meshfed.telemetry.gateway_metrics`) on them, and turns on OTLP export of
metrics and traces when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

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
from meshfed.telemetry.gateway_metrics import GATEWAY_METRICS, ClusterHistograms, Kind, Readings
from meshfed.telemetry.gateway_stats import GatewayStats, OncePerScrape, StatsSource

# The package's logger, as before the split: log lines keep their name.
log = logging.getLogger("meshfed.telemetry")

# One reading of a gauge: (value, attributes) pairs.
GaugeReadings = Callable[[], Iterable[tuple[float, Mapping[str, str]]]]


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

        self._gateway_stats = OncePerScrape(labelled_stats)
        meter = self._meter_provider.get_meter("meshfed.gateway")
        create: dict[Kind, Callable[..., object]] = {
            "counter": meter.create_observable_counter,
            "up_down_counter": meter.create_observable_up_down_counter,
            "gauge": meter.create_observable_gauge,
        }
        for kind, name, description, unit, readings in GATEWAY_METRICS:
            create[kind](name, [self._observer(readings)], unit=unit, description=description)
        self._registry.register(ClusterHistograms(self._gateway_stats))

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

    def _observer(self, readings: Readings) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, dict(attributes)) for value, attributes in readings(self._gateway_stats())]

        return observe


__all__ = ["GaugeReadings", "Telemetry"]
