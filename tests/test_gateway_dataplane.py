"""Load balancing, health, limits and stats of the Rust data plane, driven from Python."""

from __future__ import annotations

import socket

import pytest

from meshfed.errors import GatewayConfigError
from meshfed.gateway.config import (
    CircuitBreaker,
    Cluster,
    Endpoint,
    GatewayConfig,
    HealthCheck,
    OutlierDetection,
    PassthroughListener,
    RateLimit,
    Route,
    WeightedCluster,
)
from meshfed.gateway.handle import Gateway, validate
from tests.conftest import EchoServer, client_hello_bytes, dead_endpoint, round_trip

SNI = "known.example"


def test_every_new_field_is_accepted_by_the_rust_schema() -> None:
    # Field-for-field mirror: the Rust side refuses unknown fields, so a
    # document using every optional field proves the names match.
    config = GatewayConfig(
        listeners=[
            PassthroughListener(
                name="in",
                address="127.0.0.1:0",
                routes=[
                    Route(
                        sni=SNI,
                        weighted_clusters=[
                            WeightedCluster(cluster="a", weight=90),
                            WeightedCluster(cluster="b", weight=10),
                        ],
                        rate_limit=RateLimit(connections_per_second=50.0, burst=10),
                    )
                ],
            )
        ],
        clusters=[
            Cluster(
                name="a",
                endpoints=[
                    Endpoint(address="127.0.0.1:1", weight=3, priority=0),
                    Endpoint(address="127.0.0.1:2", priority=1),
                ],
                lb="least_request",
                idle_timeout_ms=0,
                outlier_detection=OutlierDetection(consecutive_failures=3, base_ejection_ms=100, max_ejection_ms=1000),
                health_check=HealthCheck(interval_ms=500, timeout_ms=100, healthy_threshold=1, unhealthy_threshold=3),
                circuit_breaker=CircuitBreaker(max_connections=100, max_pending=10),
            ),
            Cluster(name="b", endpoints=[Endpoint(address="127.0.0.1:3")], lb="maglev"),
        ],
    )
    validate(config)


def test_a_split_and_a_single_cluster_together_are_rejected_naming_the_field() -> None:
    config = GatewayConfig(
        listeners=[
            PassthroughListener(
                name="in",
                address="127.0.0.1:0",
                routes=[Route(sni=SNI, cluster="a", weighted_clusters=[WeightedCluster(cluster="a", weight=1)])],
            )
        ],
        clusters=[Cluster(name="a", endpoints=[Endpoint(address="127.0.0.1:1")])],
    )
    with pytest.raises(GatewayConfigError, match=r"listeners\[0\]\.routes\[0\]\.weighted_clusters"):
        validate(config)


def failing_over(dead: str, live: str) -> GatewayConfig:
    """A passthrough listener ``in`` to cluster ``web``: ``dead`` at priority 0, ``live`` at 1, ejected
    after one connect failure."""
    return GatewayConfig(
        listeners=[PassthroughListener(name="in", address="127.0.0.1:0", routes=[Route(sni=SNI, cluster="web")])],
        clusters=[
            Cluster(
                name="web",
                endpoints=[Endpoint(address=dead, priority=0), Endpoint(address=live, priority=1)],
                outlier_detection=OutlierDetection(consecutive_failures=1),
            )
        ],
    )


def test_dead_local_endpoint_is_ejected_and_traffic_fails_over_to_the_next_priority(echo_server: EchoServer) -> None:
    dead = dead_endpoint()
    config = failing_over(dead, echo_server.endpoint)
    hello = client_hello_bytes(SNI)
    with Gateway(config) as gateway:
        for _ in range(3):
            with socket.create_connection(gateway.address("in"), timeout=5) as raw:
                assert round_trip(raw, hello) == hello
        stats = gateway.stats()
    cluster = stats["clusters"]["web"]
    assert cluster["endpoints"][dead]["ejected"] is True
    assert cluster["endpoints"][dead]["connect_failures"] == 1
    assert cluster["endpoints"][echo_server.endpoint]["connections"] == 3
    assert cluster["connect_latency"]["count"] == 3
    assert stats["listeners"]["in"]["upstream_connect_failures"] == 0
    assert stats["listeners"]["in"]["routes"][SNI]["connections"] == 3


def test_circuit_breaker_counts_refusals(echo_server: EchoServer) -> None:
    config = GatewayConfig(
        listeners=[PassthroughListener(name="in", address="127.0.0.1:0", routes=[Route(sni=SNI, cluster="web")])],
        clusters=[
            Cluster(
                name="web",
                endpoints=[Endpoint(address=echo_server.endpoint)],
                circuit_breaker=CircuitBreaker(max_connections=1),
            )
        ],
    )
    hello = client_hello_bytes(SNI)
    with Gateway(config) as gateway, socket.create_connection(gateway.address("in"), timeout=5) as held:
        assert round_trip(held, hello) == hello
        with socket.create_connection(gateway.address("in"), timeout=5) as refused:
            refused.sendall(hello)
            assert refused.recv(1) == b""
        stats = gateway.stats()
        assert stats["clusters"]["web"]["circuit_open"] == 1
        assert stats["listeners"]["in"]["circuit_open"] == 1
