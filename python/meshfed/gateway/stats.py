"""The gateway's stats document as types: what ``Gateway.stats()`` returns, field by field.

The Rust core writes the document (``StatsDocument`` and the snapshot types in
``rust/meshfed-gateway/src/gateway``); ``_core.gateway_stats_schema()`` is its
JSON Schema, and ``tests/test_stats_schema.py`` checks these types against it
both ways, so a field renamed or dropped in Rust fails a test instead of
silently dropping a metric. They are ``TypedDict``s, not models: a scrape
reads tens of thousands of objects, and typing them costs nothing at run time.
"""

from __future__ import annotations

from typing import Literal, TypedDict


class RouteStats(TypedDict):
    connections: int
    rate_limited: int
    bytes_client_to_upstream: int
    bytes_upstream_to_client: int


class ListenerStats(TypedDict):
    accepted: int
    active: int
    closed: int
    bytes_client_to_upstream: int
    bytes_upstream_to_client: int
    handshake_failures: int
    no_route: int
    denied: int
    denied_by_trust_domain: dict[str, int]
    upstream_connect_failures: int
    rate_limited: int
    circuit_open: int
    idle_timeouts: int
    handshaking: int
    connections_refused_over_limit: int
    handshakes_refused_over_limit: int
    accept_errors: int
    probes: int
    tunnels: int
    tunnel_streams: int
    handshake_failure_reasons: dict[str, int]
    peer_identities: dict[str, int]
    routes: dict[str, RouteStats]


class HistogramStats(TypedDict):
    count: int
    sum_us: int
    le_us: list[int]
    counts: list[int]


class EndpointStats(TypedDict):
    priority: int
    weight: int
    connections: int
    active: int
    connect_failures: int
    ejections: int
    ejected: bool
    healthy: bool
    ewma_connect_us: int


class ClusterStats(TypedDict):
    connections: int
    active: int
    pending: int
    connect_failures: int
    circuit_open: int
    ejections: int
    bytes_sent: int
    bytes_received: int
    connect_latency: HistogramStats
    duration: HistogramStats
    endpoints: dict[str, EndpointStats]


class StatsDocument(TypedDict):
    listeners: dict[str, ListenerStats]
    clusters: dict[str, ClusterStats]


# What a metric is kept per, and the type of the object it reads its value from.
StatsObject = Literal["listener", "route", "cluster", "endpoint"]
OBJECT_TYPES: dict[StatsObject, type] = {
    "listener": ListenerStats,
    "route": RouteStats,
    "cluster": ClusterStats,
    "endpoint": EndpointStats,
}

__all__ = [
    "OBJECT_TYPES",
    "ClusterStats",
    "EndpointStats",
    "HistogramStats",
    "ListenerStats",
    "RouteStats",
    "StatsDocument",
    "StatsObject",
]
