"""The gateway's stats document as labelled rows: one reading per scrape, and the objects it counts.

The Rust core's stats are one JSON document (listeners with their routes,
clusters with their endpoints). :class:`OncePerScrape` reads it once per
scrape however many instruments observe it; :func:`listener_rows`, :func:`route_rows`,
:func:`cluster_rows` and :func:`endpoint_rows` walk it, each object with its labels:
what it is (``listener``, ``route``, ``cluster``, ``endpoint``) and, where it
maps to one, the federated service it serves (see :mod:`meshfed.telemetry`).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

from meshfed.gateway.stats import ClusterStats, EndpointStats, ListenerStats, RouteStats, StatsObject

# The package's logger, as before the split: log lines keep their name.
log = logging.getLogger("meshfed.telemetry")

StatsSource = Callable[[], Mapping[str, Any]]
# The objects a metric is kept per (listeners, routes, clusters, endpoints): (attributes, their stats).
Rows = Callable[[Mapping[str, Any]], Iterator[tuple[dict[str, str], Mapping[str, object]]]]


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


# The rows are typed as the core's document is (meshfed.gateway.stats), so a key read from one is checked.
def listener_rows(stats: Mapping[str, Any]) -> Iterator[tuple[dict[str, str], ListenerStats]]:
    listeners = cast("dict[str, ListenerStats]", stats.get("listeners", {}))
    for name, listener in listeners.items():
        yield _labelled("listener", name, stats), listener


def route_rows(stats: Mapping[str, Any]) -> Iterator[tuple[dict[str, str], RouteStats]]:
    for attributes, listener in listener_rows(stats):
        for sni, route in listener.get("routes", {}).items():
            yield {**attributes, "route": sni, **dict(_route_labels(sni))}, route


def cluster_rows(stats: Mapping[str, Any]) -> Iterator[tuple[dict[str, str], ClusterStats]]:
    # A controller without a running gateway reports no "clusters" at all.
    clusters = cast("dict[str, ClusterStats]", stats.get("clusters", {}))
    for name, cluster in clusters.items():
        yield _labelled("cluster", name, stats), cluster


def endpoint_rows(stats: Mapping[str, Any]) -> Iterator[tuple[dict[str, str], EndpointStats]]:
    for attributes, cluster in cluster_rows(stats):
        for address, endpoint in cluster.get("endpoints", {}).items():
            yield {**attributes, "endpoint": address}, endpoint


ROWS: dict[StatsObject, Rows] = {
    "listener": listener_rows,
    "route": route_rows,
    "cluster": cluster_rows,
    "endpoint": endpoint_rows,
}


# Label values one listener may contribute to a per-caller metric. The core bounds its own maps
# (1000 identities per listener, the rest under "<other>"), but a scrape is listeners x values, and
# Prometheus keeps every series it ever saw: what is exported is capped here too, whatever the core sends.
MAX_SERIES_PER_LISTENER = 100
OTHER = "<other>"


def capped(counts: Mapping[str, int], limit: int = MAX_SERIES_PER_LISTENER) -> Iterator[tuple[str, int]]:
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


class OncePerScrape:
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


__all__ = [
    "MAX_SERIES_PER_LISTENER",
    "OTHER",
    "ROWS",
    "GatewayStats",
    "OncePerScrape",
    "Rows",
    "StatsSource",
    "capped",
    "cluster_rows",
    "endpoint_rows",
    "listener_rows",
    "route_rows",
]
