"""OpenTelemetry metrics of one zone, served as Prometheus text at ``/metrics``.

Each controller gets its own ``MeterProvider`` and Prometheus registry, so
several zones in one process (tests, the demo) never mix their series. Gateway
counters are observed at collection time from the Rust core's lock-free stats:
nothing is pushed on the data path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest

from meshfed import __version__

StatsSource = Callable[[], Mapping[str, Any]]

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
    """Metrics of one zone. :meth:`render` returns the Prometheus text exposition."""

    def __init__(self, zone: str, gateway_stats: StatsSource) -> None:
        self._registry = CollectorRegistry(auto_describe=True)
        self._reader = PrometheusMetricReader(registry=self._registry)
        self._provider = MeterProvider(
            metric_readers=[self._reader],
            resource=Resource.create({"service.name": "meshfed", "service.version": __version__, "meshfed.zone": zone}),
        )
        self._gateway_stats = gateway_stats
        meter = self._provider.get_meter("meshfed.gateway")
        for key, name, description, unit in _LISTENER_COUNTERS:
            meter.create_observable_counter(name, [self._listener_observer(key)], unit=unit, description=description)
        meter.create_observable_up_down_counter(
            "meshfed.gateway.active_connections",
            [self._listener_observer("active")],
            unit="{connection}",
            description="Connections open now",
        )

    def render(self) -> bytes:
        """Every series, in the Prometheus text format."""
        return generate_latest(self._registry)

    def shutdown(self) -> None:
        self._provider.shutdown()

    def _listener_observer(self, key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            listeners: Mapping[str, Mapping[str, Any]] = self._gateway_stats().get("listeners", {})
            return [
                Observation(counters[key], {"listener": name})
                for name, counters in listeners.items()
                if key in counters
            ]

        return observe
