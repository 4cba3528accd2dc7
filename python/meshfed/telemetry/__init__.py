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

Modules: :mod:`~meshfed.telemetry.providers` (:class:`Telemetry`: the providers,
the registry, OTLP export, spans), :mod:`~meshfed.telemetry.gateway_metrics`
(every gateway metric and the latency histograms) and
:mod:`~meshfed.telemetry.gateway_stats` (the stats document, read once per
scrape, as labelled rows).
"""

from __future__ import annotations

from meshfed.telemetry.gateway_stats import MAX_SERIES_PER_LISTENER, OTHER, GatewayStats, StatsSource
from meshfed.telemetry.providers import GaugeReadings, Telemetry

__all__ = ["MAX_SERIES_PER_LISTENER", "OTHER", "GatewayStats", "GaugeReadings", "StatsSource", "Telemetry"]
