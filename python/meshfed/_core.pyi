"""The Rust core of meshfed: the east-west gateway data plane.

Python builds a gateway config document (JSON bytes); the core compiles it
once, validates everything (listeners, routes, clusters, PEM material,
SPIFFE IDs) and serves it on its own Rust runtime. No Python runs on the
per-connection path.
"""

from typing import final

__all__ = [
    "CompiledConfig",
    "ConfigError",
    "Gateway",
    "GatewayError",
    "__version__",
    "compile_config",
    "configure_data_plane_logging",
    "core_version",
    "gateway_config_schema",
    "gateway_stats_schema",
    "validate_config",
]

__version__: str
"""Version of the Rust core (the ``meshfed-gateway`` crate)."""

def core_version() -> str:
    """The version of the Rust core."""

def configure_data_plane_logging() -> None:
    """Route the data plane's log events into :mod:`logging` and read the logger's level again.

    Events go to the logger ``meshfed.gateway.data_plane`` with their fields in the message
    (``endpoint ejected after 5 consecutive connect failures cluster=web endpoint=10.0.0.5:8080``),
    from a thread of their own: the data plane never waits for the GIL. The logger's effective
    level is read here, not per event; this runs at import and at every ``Gateway`` start, so call
    it only after changing logging levels while a gateway runs. Idempotent.
    """

def gateway_config_schema() -> str:
    """The JSON Schema (draft 2020-12) of the config document, derived from the Rust types."""

def gateway_stats_schema() -> str:
    """The JSON Schema (draft 2020-12) of the stats document ``Gateway.stats()`` returns, from the Rust types."""

def validate_config(config: bytes) -> None:
    """Check a config document without starting anything.

    Raises:
        ConfigError: the document is invalid; the message names the field
            path, e.g. ``listeners[1].routes[0].cluster: no cluster named "x"``.
    """

def compile_config(config: bytes) -> CompiledConfig:
    """Compile a config document without starting anything, for :meth:`Gateway.apply_compiled`.

    Raises:
        ConfigError: the document is invalid (as :func:`validate_config`).
    """

@final
class CompiledConfig:
    """A config document compiled once, applied later without compiling it again; one apply takes it."""

class ConfigError(ValueError):
    """The gateway config document is invalid; the message names the field path."""

class GatewayError(RuntimeError):
    """The gateway could not start, bind a listener, or is closed."""

@final
class Gateway:
    """A running east-west gateway on its own Rust runtime.

    ``Gateway(config)`` compiles ``config``, binds every listener and starts
    serving. Raises ``ConfigError`` for an invalid document and
    ``GatewayError`` when a listener cannot be bound.
    """

    def __new__(cls, config: bytes) -> Gateway: ...
    @staticmethod
    def start_compiled(compiled: CompiledConfig) -> Gateway:
        """Bind every listener of a config :func:`compile_config` compiled, taking it, and start serving.

        Raises ``GatewayError`` if ``compiled`` was started or applied already.
        """

    def apply(self, config: bytes) -> None:
        """Swap in a new config.

        Unchanged listeners (same name and address) keep their socket, new
        ones bind, removed ones stop accepting while their connections
        finish; live connections keep the config they started with. On
        error (``ConfigError`` or ``GatewayError``) nothing changes.
        """

    def apply_compiled(self, compiled: CompiledConfig) -> None:
        """Swap in a config :func:`compile_config` compiled (as :meth:`apply`), taking it.

        Raises ``GatewayError`` if ``compiled`` was applied already.
        """

    def apply_patch(self, patch: bytes) -> None:
        """Apply a patch document to the running config, compiling only what it changes.

        The document (every field optional)::

            {"clusters": [cluster], "remove_clusters": [name],
             "listeners": [listener], "remove_listeners": [name],
             "routes": [{"listener": name, "upsert": [route], "remove": [sni]}],
             "connect_routes": [{"listener": name, "upsert": [connect route],
                                 "remove": [authority]}]}

        Clusters and listeners are added or replaced whole by name. The result is
        what :meth:`apply` of the full document with these edits would give. On
        error (``ConfigError``, e.g. ``remove_clusters[0]: cluster "web" is still
        used by ...``, or ``GatewayError``) nothing changes.
        """

    def addresses(self) -> dict[str, str]:
        """The bound address (``"ip:port"``) of each listener, by name."""

    def stats(self) -> bytes:
        """Counters, gauges and latency histograms as JSON bytes.

        Reads atomics only; never waits on the data plane. Shape::

            {"listeners": {"<name>": {"accepted": n, "active": n, "closed": n,
                "bytes_client_to_upstream": n, "bytes_upstream_to_client": n,
                "handshake_failures": n, "handshake_failure_reasons": {"timeout": n,
                "closed": n, "not_tls": n, "too_large": n, "malformed": n, "tls": n,
                "no_svid": n, "upstream_tls": n}, "no_route": n, "denied": n,
                "denied_by_trust_domain": {"<trust domain>": n},
                "upstream_connect_failures": n, "rate_limited": n, "circuit_open": n,
                "idle_timeouts": n, "handshaking": n, "connections_refused_over_limit": n,
                "handshakes_refused_over_limit": n, "accept_errors": n, "probes": n,
                "tunnels": n, "tunnel_streams": n,
                "peer_identities": {"spiffe://...": n},
                "routes": {"<sni>": {"connections": n, "rate_limited": n,
                    "bytes_client_to_upstream": n, "bytes_upstream_to_client": n}}}},
             "clusters": {"<name>": {"connections": n, "active": n, "pending": n,
                "connect_failures": n, "circuit_open": n, "ejections": n,
                "bytes_sent": n, "bytes_received": n,
                "connect_latency": {"count": n, "sum_us": n, "le_us": [...], "counts": [...]},
                "duration": {...same...},
                "endpoints": {"<ip:port>": {"priority": n, "weight": n, "connections": n,
                    "active": n, "connect_failures": n, "ejections": n, "ejected": bool,
                    "healthy": bool, "ewma_connect_us": n}}}}}

        Histogram buckets are powers of two in microseconds (``le_us`` are the
        exclusive upper bounds; the last bucket is open-ended).

        ``denied`` counts every connection refused by authorization;
        ``denied_by_trust_domain`` splits it by the caller's trust domain (for a
        caller a peer gateway vouched for, the gateway's). ``peer_identities``
        counts authorized callers (terminate listeners) or verified peer
        gateways (originate listeners). Both tables hold at most 1000 keys per
        listener; the rest are counted under ``"<other>"``.

        ``handshaking`` is a gauge of the connections open that have not finished
        their handshake (also in ``active``). A connection over the listener's
        ``limits.max_connections`` or ``limits.max_handshakes`` is closed at once
        and counted in ``connections_refused_over_limit`` or
        ``handshakes_refused_over_limit``, not in ``accepted``; ``accept_errors``
        counts failed ``accept()`` calls (e.g. out of file descriptors). ``probes``
        counts connections a client closed before sending a byte (TCP health checks,
        scans) on passthrough and terminate listeners: not handshake failures.
        ``tunnels`` counts gateway tunnel connections (accepted by a terminate listener,
        dialled by an egress) and ``tunnel_streams`` the client connections they carried;
        at an ingress each stream counts in ``accepted`` too.
        """

    def unhealthy_endpoints(self) -> dict[str, list[str]]:
        """Endpoints (``"ip:port"``) ejected by outlier detection or failing active
        health checks, by cluster name; clusters with none are left out. Cheap to
        poll: it reads only health state, unlike :meth:`stats`."""

    def close(self) -> None:
        """Stop all listeners and the runtime. Idempotent."""
