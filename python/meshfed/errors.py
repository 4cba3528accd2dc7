"""The one exception tree of meshfed.

Every error meshfed raises on purpose derives from :class:`MeshfedError`; its
message is one line that says what went wrong and what to check. The CLI prints
that line and exits non-zero; it never shows a traceback for these.

::

    MeshfedError
    ├── ZoneError            a zone directory is missing, incomplete or already exists
    ├── TrustError           SPIFFE IDs, certificates, bundles
    │   ├── InvalidSpiffeIdError
    │   └── InvalidBundleError
    └── GatewayError         the Rust data plane could not start or apply a config
        └── GatewayConfigError   the config was rejected; the running one stays in force
"""

from __future__ import annotations

__all__ = [
    "GatewayConfigError",
    "GatewayError",
    "InvalidBundleError",
    "InvalidSpiffeIdError",
    "MeshfedError",
    "TrustError",
    "ZoneError",
]


class MeshfedError(Exception):
    """Base of every error meshfed raises on purpose."""


class ZoneError(MeshfedError):
    """A zone directory is missing, incomplete, or would be overwritten."""


class TrustError(MeshfedError):
    """A SPIFFE ID, certificate or trust bundle is unusable."""


class InvalidSpiffeIdError(TrustError):
    """A string is not a valid SPIFFE ID or trust domain name."""


class InvalidBundleError(TrustError):
    """A trust bundle could not be parsed or holds no usable root."""


class GatewayError(MeshfedError):
    """The gateway data plane could not start, bind or apply a config."""


class GatewayConfigError(GatewayError):
    """A gateway config was rejected; the message names the offending field."""
