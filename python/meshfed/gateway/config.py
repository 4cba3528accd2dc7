"""The gateway config document, built in Python and compiled once by the Rust core.

These types mirror the Rust side's serde types field for field (both reject
unknown fields). Python builds a :class:`GatewayConfig`; :meth:`to_json` is the
only form that crosses into ``meshfed._core``.

Everything below the document is a validated, slotted, frozen dataclass rather
than a model: a zone of 10,000 services builds 100,000 endpoints, 10,000
clusters and routes per config, and a model instance costs about five times
the memory (a ``__dict__`` and a fields-set each). Frozen values are shared:
every cluster holds the one default outlier detection and circuit breaker.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.dataclasses import dataclass

_VALUE = ConfigDict(extra="forbid")


@dataclass(frozen=True, slots=True, kw_only=True, config=_VALUE)
class Identity:
    """The gateway's own X.509-SVID: leaf then intermediates, and its PKCS#8 key."""

    cert_chain_pem: str
    private_key_pem: str


@dataclass(frozen=True, slots=True, kw_only=True, config=_VALUE)
class UpstreamTls:
    """mTLS to an endpoint with the gateway's identity; the endpoint must present ``peer_spiffe_id``.

    ``convey_caller``: offer the ALPN protocol ``meshfed-caller/1``; if the peer gateway negotiates
    it, the first bytes inside the tunnel are a PROXY v2 header naming the calling workload (TLV 0xE0,
    its verified SPIFFE ID; absent for a plain workload, which makes this gateway the caller). A peer
    that does not negotiate it (an older ingress) gets no header and sees this gateway as the caller.

    ``tunnel`` (needs ``convey_caller``): also offer the gateway tunnel, ``meshfed-tunnel/1``, first.
    Client connections to this endpoint then ride a few pooled mTLS connections as HTTP/2 CONNECT
    streams, each naming the service and the caller and answered once the peer's upstream is
    connected: one handshake per tunnel connection instead of one per client connection. A peer that
    does not negotiate it is dialled per connection, as without it.
    """

    sni: str
    peer_spiffe_id: str
    convey_caller: bool = False
    tunnel: bool = False


@dataclass(frozen=True, slots=True, kw_only=True, config=_VALUE)
class Endpoint:
    """One endpoint. ``priority`` orders locality failover: 0 = local, then 1, 2, ... (peers in order).

    ``tls`` (a peer gateway's SNI and SPIFFE ID) overrides the cluster's, so one failover cluster
    holds plain local endpoints and the gateways of several peers.
    """

    address: str
    weight: int = Field(default=1, ge=1)
    priority: int = Field(default=0, ge=0)
    tls: UpstreamTls | None = None


LbPolicy = Literal["round_robin", "weighted_round_robin", "least_request", "maglev"]
"""``least_request``: power of two choices over peak-EWMA connect latency x active connections;
``maglev``: consistent hashing (table 65537) on the client's source IP."""


@dataclass(frozen=True, slots=True, kw_only=True, config=_VALUE)
class OutlierDetection:
    """Passive health: eject an endpoint after ``consecutive_failures`` connect failures in a row.

    Ejection lasts ``base_ejection_ms`` doubled per ejection in a row (capped at ``max_ejection_ms``,
    plus up to 10 % jitter); at most ``max_ejection_percent`` of the endpoints are ejected at once and
    the last healthy endpoint never is. ``consecutive_failures = 0`` disables it.
    """

    consecutive_failures: int = Field(default=5, ge=0)
    base_ejection_ms: int = Field(default=30_000, ge=1)
    max_ejection_ms: int = Field(default=300_000, ge=1)
    max_ejection_percent: int = Field(default=50, ge=0, le=100)


@dataclass(frozen=True, slots=True, kw_only=True, config=_VALUE)
class HealthCheck:
    """Active TCP health checks on the data-plane runtime."""

    interval_ms: int = Field(default=5_000, ge=1)
    timeout_ms: int = Field(default=1_000, ge=1)
    healthy_threshold: int = Field(default=2, ge=1)
    unhealthy_threshold: int = Field(default=2, ge=1)


@dataclass(frozen=True, slots=True, kw_only=True, config=_VALUE)
class CircuitBreaker:
    """Per-cluster limits; connections beyond them are refused at once and counted as ``circuit_open``."""

    max_connections: int | None = Field(default=None, ge=1)
    max_pending: int | None = Field(default=None, ge=1)


@dataclass(frozen=True, slots=True, kw_only=True, config=_VALUE)
class Cluster:
    name: str
    endpoints: list[Endpoint]
    connect_timeout_ms: int = Field(default=5000, ge=1)
    lb: LbPolicy = "round_robin"
    idle_timeout_ms: int = Field(default=3_600_000, ge=0)
    """Close a proxied connection with no byte either way for this long; 0 disables."""
    outlier_detection: OutlierDetection = OutlierDetection()
    health_check: HealthCheck | None = None
    circuit_breaker: CircuitBreaker = CircuitBreaker()
    tls: UpstreamTls | None = None
    """mTLS to every endpoint without its own ``tls`` (terminate re-encryption, originate to a peer)."""


@dataclass(frozen=True, slots=True, kw_only=True, config=_VALUE)
class WeightedCluster:
    """One share of a weighted split."""

    cluster: str
    weight: int = Field(ge=0)


@dataclass(frozen=True, slots=True, kw_only=True, config=_VALUE)
class RateLimit:
    """Token bucket on new connections: ``connections_per_second`` refill, ``burst`` capacity."""

    connections_per_second: float = Field(gt=0)
    burst: int = Field(ge=1)


@dataclass(frozen=True, slots=True, kw_only=True, config=_VALUE)
class AuthzRule:
    """One authorization rule of a terminate route: ``action`` for the callers ``id`` matches.

    ``id`` is a SPIFFE ID pattern: ``*``, an exact SPIFFE ID, or ``spiffe://<td>/<prefix>/*``
    (every ID strictly below the prefix, whole segments only).
    """

    action: Literal["allow", "deny"]
    id: str


@dataclass(frozen=True, slots=True, kw_only=True, config=_VALUE)
class Route:
    """Route a server name to a cluster, or split it by weight over ``weighted_clusters``.

    Terminate only: ``rules`` (ordered: the first rule whose ``id`` matches the caller decides; no
    match, or no rules, denies), ``proxy_protocol`` (send a PROXY v2 header with the caller's SPIFFE
    ID in TLV 0xE0 and the SNI in TLV 0x02) and ``source_rate_limit`` (one bucket per caller SPIFFE
    ID). The caller is the client's SVID, or the workload a trusted gateway vouches for.
    """

    sni: str
    cluster: str | None = None
    weighted_clusters: list[WeightedCluster] | None = None
    rules: list[AuthzRule] | None = None
    proxy_protocol: bool = False
    rate_limit: RateLimit | None = None
    source_rate_limit: RateLimit | None = None


@dataclass(frozen=True, slots=True, kw_only=True, config=_VALUE)
class ListenerLimits:
    """Caps on one listener's connections; a connection over a cap is accepted and closed at once.

    ``max_connections``: open at once, in any phase; beyond it new connections are closed and
    counted in ``connections_refused_over_limit``. ``max_handshakes``: open at once that have not
    finished their handshake (the ClientHello, mTLS and the caller header), each for at most
    ``handshake_timeout_ms``; beyond it they are closed and counted in
    ``handshakes_refused_over_limit``, so unauthenticated clients cannot take the slots of
    authenticated ones. It never exceeds ``max_connections``.

    Each proxied connection holds two file descriptors (client and upstream): the process's
    ``ulimit -n`` must exceed twice the sum of its listeners' ``max_connections`` plus what the
    control plane needs (about 1,024), or these caps must be lowered to fit. The defaults are the
    Rust core's (``tests/test_config_schema.py`` checks they agree).
    """

    max_connections: int = Field(default=10_000, ge=1)
    max_handshakes: int = Field(default=1_000, ge=1)


@dataclass(frozen=True, slots=True, kw_only=True, config=_VALUE)
class PassthroughListener:
    """Peek the ClientHello, route on SNI, forward the TLS bytes untouched."""

    mode: Literal["passthrough"] = "passthrough"
    name: str
    address: str
    routes: list[Route]
    limits: ListenerLimits = ListenerLimits()


@dataclass(frozen=True, slots=True, kw_only=True, config=_VALUE)
class TerminateListener:
    """Finish mTLS, verify the caller against its own trust domain's bundle, authorize, forward.

    ``trusted_gateways``: SPIFFE IDs of the peer gateways that may vouch for a caller over the
    ``meshfed-caller/1`` hop protocol, and only for callers of their own trust domain. A client
    offering that protocol and not listed here is refused with the TLS alert ``access_denied``.
    """

    mode: Literal["terminate"] = "terminate"
    name: str
    address: str
    routes: list[Route]
    trusted_gateways: list[str] = Field(default_factory=list)
    limits: ListenerLimits = ListenerLimits()


@dataclass(frozen=True, slots=True, kw_only=True, config=_VALUE)
class OriginateListener:
    """Accept local clients and connect to ``cluster``: mTLS to its peer gateways (each pinned to its
    exact SPIFFE ID), plain to its local endpoints.

    ``workload_tls``: ``plain`` accepts plain TCP (the gateway is the caller); ``strict`` requires
    mTLS with an X.509-SVID of the gateway's own trust domain, which becomes the caller (plain
    clients and clients without an SVID are refused); ``permissive`` treats a TLS ClientHello as
    ``strict`` and anything else as ``plain``. ``strict`` and ``permissive`` need the gateway's
    ``identity`` and its own trust domain's bundle in ``trust_bundles``.
    """

    mode: Literal["originate"] = "originate"
    name: str
    address: str
    cluster: str
    workload_tls: Literal["plain", "permissive", "strict"] = "plain"
    limits: ListenerLimits = ListenerLimits()


@dataclass(frozen=True, slots=True, kw_only=True, config=_VALUE)
class ConnectRoute:
    """A client's ``CONNECT authority`` (``host:port``, the host case-insensitive) reaches ``cluster``."""

    authority: str
    cluster: str


@dataclass(frozen=True, slots=True, kw_only=True, config=_VALUE)
class ConnectListener:
    """An HTTP CONNECT proxy for local clients: one socket for many imports.

    A client sends ``CONNECT <service>.<namespace>.<peer>:<port> HTTP/1.1`` (or is told to use the
    listener as its HTTP proxy); the gateway dials the cluster the authority names, as an originate
    listener of that cluster would, with the gateway as the caller, and answers ``200`` only once
    connected, or ``404``/``403``/``502``/``503`` with a ``meshfed-reason`` header saying why.
    """

    mode: Literal["connect"] = "connect"
    name: str
    address: str
    connect_routes: list[ConnectRoute]
    limits: ListenerLimits = ListenerLimits()


Listener = Annotated[
    PassthroughListener | TerminateListener | OriginateListener | ConnectListener, Field(discriminator="mode")
]


class GatewayConfig(BaseModel):
    """One complete gateway configuration: applied as a whole, atomically."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    identity: Identity | None = None
    trust_bundles: dict[str, str] = Field(default_factory=dict)
    handshake_timeout_ms: int = Field(default=10_000, ge=1)
    listeners: list[Listener] = Field(default_factory=list)
    clusters: list[Cluster] = Field(default_factory=list)

    def to_json(self) -> bytes:
        """The document the Rust core compiles."""
        return self.model_dump_json(exclude_none=True).encode()


@dataclass(frozen=True, slots=True, kw_only=True, config=_VALUE)
class RoutePatch:
    """Route edits of one passthrough or terminate listener: ``upsert`` adds a route or replaces the
    one of the same SNI pattern, ``remove`` names SNI patterns to remove."""

    listener: str
    upsert: list[Route] = Field(default_factory=list)
    remove: list[str] = Field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True, config=_VALUE)
class ConnectRoutePatch:
    """Route edits of one connect listener: ``upsert`` adds a route or replaces the one of the same
    authority, ``remove`` names authorities to remove."""

    listener: str
    upsert: list[ConnectRoute] = Field(default_factory=list)
    remove: list[str] = Field(default_factory=list)


class GatewayPatch(BaseModel):
    """A change to the running gateway config, compiled against it: work for what changes only.

    Clusters and listeners are added or replaced whole by name, or removed by name; routes are
    edited per listener. The result is what applying the full :class:`GatewayConfig` with these
    edits would give, checked the same way. The core refuses (and changes nothing) a removal of a
    name that is not there, a name given twice, a removed cluster something still uses, and route
    edits of a listener of another mode or one the patch also replaces. Identity, trust bundles and
    the handshake timeout change only with a full config.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    clusters: list[Cluster] = Field(default_factory=list)
    remove_clusters: list[str] = Field(default_factory=list)
    listeners: list[Listener] = Field(default_factory=list)
    remove_listeners: list[str] = Field(default_factory=list)
    routes: list[RoutePatch] = Field(default_factory=list)
    connect_routes: list[ConnectRoutePatch] = Field(default_factory=list)

    def to_json(self) -> bytes:
        """The patch document the Rust core compiles."""
        return self.model_dump_json(exclude_none=True).encode()
