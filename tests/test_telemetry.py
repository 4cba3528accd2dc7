"""Gateway metrics at /metrics, traces of control-plane work, and JSON logs that carry their trace ids."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from meshfed.controller import Controller, ControllerSettings
from meshfed.gateway import Cluster, Endpoint, Gateway, GatewayConfig, OutlierDetection, PassthroughListener, Route
from meshfed.logs import JsonFormatter
from meshfed.telemetry import Telemetry
from tests.conftest import EchoServer, client_hello_bytes, dead_endpoint, eventually, round_trip, trust_each_other

SNI = "known.example"
# One scrape: every sample by name and labels.
Scrape = dict[tuple[str, frozenset[tuple[str, str]]], float]


def test_config_applies_are_traced_and_logs_carry_the_trace_id(make_zone):
    exporter = InMemorySpanExporter()
    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            # Format now: the trace context is only current while the record is emitted.
            record.msg = JsonFormatter().format(record)
            record.args = None
            records.append(record)

    handler = Capture(level=logging.DEBUG)
    logger = logging.getLogger("meshfed.controller")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:

        async def scenario() -> None:
            async with Controller(
                make_zone("east"),
                ControllerSettings(gateway_address="127.0.0.1:0", egress_port_base=0),
                span_exporter=exporter,
            ) as east:
                await east.reconfigure()

        asyncio.run(scenario())
    finally:
        logger.removeHandler(handler)

    (span,) = [span for span in exporter.get_finished_spans() if span.name == "meshfed.gateway.apply"]
    assert span.attributes is not None
    assert span.attributes["meshfed.zone"] == "east"
    assert span.attributes["meshfed.gateway.listeners"] == 1
    applied = [orjson.loads(r.getMessage()) for r in records if "gateway config applied" in r.getMessage()]
    assert applied, "no log line for the apply"
    assert applied[0]["trace_id"] == format(span.context.trace_id, "032x")
    assert applied[0]["level"] == "debug"
    assert applied[0]["logger"] == "meshfed.controller"


def test_json_formatter_outside_a_span_has_no_trace_id():
    record = logging.LogRecord("meshfed.x", logging.WARNING, __file__, 1, "peer %s is %s", ("east", "FAILING"), None)
    line = orjson.loads(JsonFormatter().format(record))
    assert line["message"] == "peer east is FAILING"
    assert line["level"] == "warning"
    assert "trace_id" not in line


def test_cluster_and_endpoint_series_count_real_traffic(echo_server: EchoServer) -> None:
    dead = dead_endpoint()
    config = GatewayConfig(
        listeners=[PassthroughListener(name="in", address="127.0.0.1:0", routes=[Route(sni=SNI, cluster="web")])],
        clusters=[
            Cluster(
                name="web",
                endpoints=[Endpoint(address=dead, priority=0), Endpoint(address=echo_server.endpoint, priority=1)],
                outlier_detection=OutlierDetection(consecutive_failures=1),
            )
        ],
    )
    hello = client_hello_bytes(SNI)
    with Gateway(config) as gateway, socket.create_connection(gateway.address("in"), timeout=5) as held:
        telemetry = Telemetry("east", gateway.stats)
        try:
            # The first connection finds the local endpoint dead, ejects it and fails over.
            assert round_trip(held, hello) == hello
            for _ in range(2):
                with socket.create_connection(gateway.address("in"), timeout=5) as raw:
                    assert round_trip(raw, hello) == hello
            with socket.create_connection(gateway.address("in"), timeout=5) as plain:
                plain.sendall(b"GET / HTTP/1.1\r\n\r\n")
                assert plain.recv(1) == b""

            def closed_ones_recorded() -> bool:
                scrape = _scrape(telemetry)
                return _value(scrape, "meshfed_gateway_cluster_connection_duration_seconds_count", cluster="web") == 2

            # A duration is recorded when the gateway has closed the upstream side too.
            asyncio.run(eventually(closed_ones_recorded, "durations of the two closed connections"))
            scrape = _scrape(telemetry)
            latency_sum_us = gateway.stats()["clusters"]["web"]["connect_latency"]["sum_us"]
        finally:
            telemetry.shutdown()

    live, ejected = {"cluster": "web", "endpoint": echo_server.endpoint}, {"cluster": "web", "endpoint": dead}
    assert _value(scrape, "meshfed_gateway_cluster_connections_total", cluster="web") == 3
    assert _value(scrape, "meshfed_gateway_cluster_connect_failures_total", cluster="web") == 1
    assert _value(scrape, "meshfed_gateway_cluster_ejections_total", cluster="web") == 1
    assert _value(scrape, "meshfed_gateway_cluster_circuit_open_total", cluster="web") == 0
    assert _value(scrape, "meshfed_gateway_cluster_active_connections", cluster="web") == 1
    assert _value(scrape, "meshfed_gateway_cluster_pending_connections", cluster="web") == 0
    assert _value(scrape, "meshfed_gateway_cluster_sent_bytes_total", cluster="web") == 3 * len(hello)
    assert _value(scrape, "meshfed_gateway_endpoint_connections_total", **live) == 3
    assert _value(scrape, "meshfed_gateway_endpoint_active_connections", **live) == 1
    assert _value(scrape, "meshfed_gateway_endpoint_healthy", **live) == 1
    assert _value(scrape, "meshfed_gateway_endpoint_ejected", **live) == 0
    assert _value(scrape, "meshfed_gateway_endpoint_connections_total", **ejected) == 0
    assert _value(scrape, "meshfed_gateway_endpoint_connect_failures_total", **ejected) == 1
    assert _value(scrape, "meshfed_gateway_endpoint_ejections_total", **ejected) == 1
    assert _value(scrape, "meshfed_gateway_endpoint_healthy", **ejected) == 0
    assert _value(scrape, "meshfed_gateway_endpoint_ejected", **ejected) == 1
    assert _value(scrape, "meshfed_gateway_route_connections_total", listener="in", route=SNI) == 3
    assert _value(scrape, "meshfed_gateway_route_rate_limited_total", listener="in", route=SNI) == 0
    failures = {
        dict(labels)["reason"]: v
        for (name, labels), v in scrape.items()
        if name.startswith("meshfed_gateway_handshake_failures")
    }
    assert failures["not_tls"] == 1
    assert sum(failures.values()) == 1
    # Real buckets: cumulative, ending in +Inf at the count.
    latency = "meshfed_gateway_cluster_connect_latency_seconds"
    buckets = sorted(
        (float(dict(labels)["le"]), v) for (name, labels), v in scrape.items() if name == f"{latency}_bucket"
    )
    assert len(buckets) > 2
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert buckets[-1] == (float("inf"), 3)
    assert _value(scrape, f"{latency}_count", cluster="web") == 3
    assert _value(scrape, f"{latency}_sum", cluster="web") == pytest.approx(latency_sum_us / 1e6)


def test_histogram_buckets_are_cumulative_with_the_core_bounds_in_seconds() -> None:
    # The core's snapshot (see _core.pyi): per-bucket counts, values below each bound in µs, last bucket open-ended.
    histogram = {"count": 4, "sum_us": 7, "le_us": [1, 2, 4, 2**64 - 1], "counts": [1, 0, 2, 1]}
    stats = {"clusters": {"web": {"connect_latency": histogram, "duration": histogram, "endpoints": {}}}}
    telemetry = Telemetry("east", lambda: stats)
    try:
        scrape = _scrape(telemetry)
    finally:
        telemetry.shutdown()
    name = "meshfed_gateway_cluster_connect_latency_seconds"
    buckets = {dict(labels)["le"]: v for (sample, labels), v in scrape.items() if sample == f"{name}_bucket"}
    assert buckets == {"1e-06": 1, "2e-06": 1, "4e-06": 3, "+Inf": 4}
    assert _value(scrape, f"{name}_count", cluster="web") == 4
    assert _value(scrape, f"{name}_sum", cluster="web") == pytest.approx(7e-6)


def test_a_scrape_reads_the_gateway_stats_once_and_the_next_one_afresh(echo_server: EchoServer) -> None:
    config = GatewayConfig(
        listeners=[PassthroughListener(name="in", address="127.0.0.1:0", routes=[Route(sni=SNI, cluster="web")])],
        clusters=[Cluster(name="web", endpoints=[Endpoint(address=echo_server.endpoint)])],
    )
    hello = client_hello_bytes(SNI)
    with Gateway(config) as gateway:
        reads: list[None] = []  # list.append is atomic; scrapes below run on several threads

        def stats() -> Mapping[str, Any]:
            reads.append(None)
            return gateway.stats()

        telemetry = Telemetry("east", stats)
        try:
            assert _value(_scrape(telemetry), "meshfed_gateway_cluster_connections_total", cluster="web") == 0
            assert len(reads) == 1
            with socket.create_connection(gateway.address("in"), timeout=5) as raw:
                assert round_trip(raw, hello) == hello
            assert _value(_scrape(telemetry), "meshfed_gateway_cluster_connections_total", cluster="web") == 1
            assert len(reads) == 2
            with ThreadPoolExecutor(max_workers=8) as pool:
                scrapes = list(pool.map(lambda _: _scrape(telemetry), range(16)))
        finally:
            telemetry.shutdown()
    assert len(reads) == 2 + 16
    assert all(_value(s, "meshfed_gateway_cluster_connections_total", cluster="web") == 1 for s in scrapes)


def test_unreadable_gateway_stats_leave_the_other_metrics_served(caplog: pytest.LogCaptureFixture) -> None:
    reads: list[None] = []

    def broken() -> Mapping[str, Any]:
        reads.append(None)
        raise RuntimeError("gateway is closed")

    telemetry = Telemetry("east", broken)
    telemetry.add_gauge("meshfed.catalog.services", "Services in the zone's catalog", "{service}", lambda: [(2.0, {})])
    try:
        scrape = _scrape(telemetry)
    finally:
        telemetry.shutdown()
    assert _value(scrape, "meshfed_catalog_services") == 2
    assert not [name for name, _ in scrape if name.startswith("meshfed_gateway_")]
    assert len(reads) == 1
    assert "gateway stats unreadable" in caplog.text


def _scrape(telemetry: Telemetry) -> Scrape:
    families = text_string_to_metric_families(telemetry.render().decode())
    return {(s.name, frozenset(s.labels.items())): s.value for family in families for s in family.samples}


def _value(scrape: Scrape, name: str, **labels: str) -> float:
    return scrape[(name, frozenset(labels.items()))]


def _every_stat() -> dict[str, Any]:
    """A stats document with every field the core reports, on an import, a failover group and the ingress."""
    histogram = {"count": 1, "sum_us": 5, "le_us": [10, 2**64 - 1], "counts": [1, 0]}
    listener = {
        "accepted": 1,
        "bytes_client_to_upstream": 2,
        "bytes_upstream_to_client": 3,
        "handshake_failure_reasons": {"not_tls": 1},
        "no_route": 0,
        "denied": 0,
        "denied_by_trust_domain": {"west.mesh": 1},
        "upstream_connect_failures": 0,
        "active": 0,
        "handshaking": 0,
        "connections_refused_over_limit": 0,
        "handshakes_refused_over_limit": 0,
        "accept_errors": 0,
        "probes": 0,
        "tunnels": 1,
        "tunnel_streams": 4,
    }
    cluster = {
        "connections": 1,
        "connect_failures": 0,
        "circuit_open": 0,
        "ejections": 0,
        "bytes_sent": 4,
        "bytes_received": 5,
        "active": 0,
        "pending": 0,
        "connect_latency": histogram,
        "duration": histogram,
        "endpoints": {
            "10.0.0.5:8080": {
                "connections": 1,
                "connect_failures": 0,
                "ejections": 0,
                "active": 0,
                "healthy": True,
                "ejected": False,
            }
        },
    }
    return {
        "listeners": {
            "ingress": {
                **listener,
                "routes": {"outbound_.8080_._.web.default.svc.east.mesh": {"connections": 1, "rate_limited": 0}},
            },
            "egress:db.shop.east:tcp": {**listener, "routes": {}},
            "failover:db.shop:tcp": {**listener, "routes": {}},
        },
        "clusters": {
            "local:default/web": cluster,
            "local:default/web@version=v2": cluster,
            "egress:db.shop.east:tcp": cluster,
            "failover:db.shop:tcp": cluster,
        },
    }


# Every gateway series as Prometheus sees it: each name has its unit once, then _total for counters.
GATEWAY_SERIES = {
    "meshfed_gateway_connections_total",
    "meshfed_gateway_upstream_bytes_total",
    "meshfed_gateway_downstream_bytes_total",
    "meshfed_gateway_handshake_failures_total",
    "meshfed_gateway_no_route_total",
    "meshfed_gateway_denied_total",
    "meshfed_gateway_denied_by_trust_domain_total",
    "meshfed_gateway_upstream_connect_failures_total",
    "meshfed_gateway_active_connections",
    "meshfed_gateway_handshaking_connections",
    "meshfed_gateway_connections_refused_over_limit_total",
    "meshfed_gateway_handshakes_refused_over_limit_total",
    "meshfed_gateway_accept_errors_total",
    "meshfed_gateway_probes_total",
    "meshfed_gateway_tunnels_total",
    "meshfed_gateway_tunnel_streams_total",
    "meshfed_gateway_route_connections_total",
    "meshfed_gateway_route_rate_limited_total",
    "meshfed_gateway_cluster_connections_total",
    "meshfed_gateway_cluster_connect_failures_total",
    "meshfed_gateway_cluster_circuit_open_total",
    "meshfed_gateway_cluster_ejections_total",
    "meshfed_gateway_cluster_sent_bytes_total",
    "meshfed_gateway_cluster_received_bytes_total",
    "meshfed_gateway_cluster_active_connections",
    "meshfed_gateway_cluster_pending_connections",
    "meshfed_gateway_endpoint_connections_total",
    "meshfed_gateway_endpoint_connect_failures_total",
    "meshfed_gateway_endpoint_ejections_total",
    "meshfed_gateway_endpoint_active_connections",
    "meshfed_gateway_endpoint_healthy",
    "meshfed_gateway_endpoint_ejected",
    *(
        f"meshfed_gateway_cluster_{name}_seconds_{part}"
        for name in ("connect_latency", "connection_duration")
        for part in ("bucket", "count", "sum")
    ),
}


def test_exported_names_are_pinned_and_carry_their_unit_once() -> None:
    telemetry = Telemetry("east", _every_stat)
    try:
        names = {name for name, _ in _scrape(telemetry) if name.startswith("meshfed_gateway_")}
    finally:
        telemetry.shutdown()
    assert names == GATEWAY_SERIES
    for name in names:
        words = name.split("_")
        assert all(words.count(unit) <= 1 for unit in ("bytes", "seconds")), name


def test_gateway_series_name_the_service_peer_and_trust_domain_they_serve() -> None:
    telemetry = Telemetry("west", _every_stat, peer_trust_domains=lambda: {"east": "east.mesh"})
    try:
        scrape = _scrape(telemetry)
    finally:
        telemetry.shutdown()

    def labels_of(name: str, key: str, value: str) -> dict[str, str]:
        (found,) = [dict(labels) for (sample, labels), _ in scrape.items() if sample == name and (key, value) in labels]
        return {label: text for label, text in found.items() if text}  # Prometheus: an empty label is no label

    imported = {"namespace": "shop", "service": "db", "peer": "east", "trust_domain": "east.mesh"}
    connections = "meshfed_gateway_connections_total"
    assert labels_of(connections, "listener", "egress:db.shop.east:tcp") == {
        "listener": "egress:db.shop.east:tcp",
        **imported,
    }
    assert labels_of(connections, "listener", "failover:db.shop:tcp") == {
        "listener": "failover:db.shop:tcp",
        "namespace": "shop",
        "service": "db",
    }
    assert labels_of(connections, "listener", "ingress") == {"listener": "ingress"}
    route = "outbound_.8080_._.web.default.svc.east.mesh"
    assert labels_of("meshfed_gateway_route_connections_total", "route", route) == {
        "listener": "ingress",
        "route": route,
        "namespace": "default",
        "service": "web",
    }
    sent = "meshfed_gateway_cluster_sent_bytes_total"
    assert labels_of(sent, "cluster", "egress:db.shop.east:tcp") == {"cluster": "egress:db.shop.east:tcp", **imported}
    for cluster in ("local:default/web", "local:default/web@version=v2"):
        assert labels_of(sent, "cluster", cluster) == {"cluster": cluster, "namespace": "default", "service": "web"}
    latency = "meshfed_gateway_cluster_connect_latency_seconds_count"
    assert labels_of(latency, "cluster", "egress:db.shop.east:tcp") == {
        "cluster": "egress:db.shop.east:tcp",
        **imported,
    }
    assert labels_of("meshfed_gateway_endpoint_healthy", "cluster", "local:default/web")["service"] == "web"


def test_expiry_gauges_give_when_the_ca_svid_and_trusted_roots_expire(make_zone) -> None:
    east, west = make_zone("east"), make_zone("west")
    trust_each_other(east, west)

    async def scenario() -> Scrape:
        async with Controller(
            east, ControllerSettings(gateway_address="127.0.0.1:0", egress_port_base=0, health_check=None)
        ) as controller:
            scrape = _scrape(controller.telemetry)
            svid = controller.gateway_svid
            assert svid is not None
            assert _value(scrape, "meshfed_gateway_svid_expiry_timestamp_seconds") == pytest.approx(
                svid.leaf.not_valid_after_utc.timestamp()
            )
            return scrape

    scrape = asyncio.run(scenario())
    authority = east.authority.signing_ca()
    assert _value(scrape, "meshfed_ca_expiry_timestamp_seconds", certificate="root") == pytest.approx(
        authority.root.not_valid_after_utc.timestamp()
    )
    assert _value(scrape, "meshfed_ca_expiry_timestamp_seconds", certificate="intermediate") == pytest.approx(
        authority.intermediate.not_valid_after_utc.timestamp()
    )
    for zone in (east, west):
        roots = zone.trust.own_bundle().roots
        assert _value(
            scrape, "meshfed_trust_bundle_expiry_timestamp_seconds", trust_domain=zone.trust_domain.name
        ) == pytest.approx(min(root.not_valid_after_utc for root in roots).timestamp())
