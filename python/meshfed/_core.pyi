"""The Rust core of meshfed: the east-west gateway data plane.

Python builds a gateway config document (JSON bytes); the core compiles it
once, validates everything (listeners, routes, clusters, PEM material,
SPIFFE IDs) and serves it on its own Rust runtime. No Python runs on the
per-connection path.
"""

from typing import final

__all__ = [
    "ConfigError",
    "Gateway",
    "GatewayError",
    "__version__",
    "core_version",
    "validate_config",
]

__version__: str
"""Version of the Rust core (the ``meshfed-gateway`` crate)."""

def core_version() -> str:
    """The version of the Rust core."""

def validate_config(config: bytes) -> None:
    """Check a config document without starting anything.

    Raises:
        ConfigError: the document is invalid; the message names the field
            path, e.g. ``listeners[1].routes[0].cluster: no cluster named "x"``.
    """

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
    def apply(self, config: bytes) -> None:
        """Swap in a new config.

        Unchanged listeners (same name and address) keep their socket, new
        ones bind, removed ones stop accepting while their connections
        finish; live connections keep the config they started with. On
        error (``ConfigError`` or ``GatewayError``) nothing changes.
        """

    def addresses(self) -> dict[str, str]:
        """The bound address (``"ip:port"``) of each listener, by name."""

    def stats(self) -> bytes:
        """Per-listener counters as JSON bytes.

        Shape: ``{"listeners": {"<name>": {"accepted": n, "active": n,
        "closed": n, "bytes_client_to_upstream": n,
        "bytes_upstream_to_client": n, "handshake_failures": n,
        "no_route": n, "denied": n, "upstream_connect_failures": n,
        "peer_identities": {"spiffe://...": n}}}}``.
        """

    def close(self) -> None:
        """Stop all listeners and the runtime. Idempotent."""
