"""The one exception tree of meshfed.

Every error meshfed raises on purpose derives from :class:`MeshfedError`; its
message is one line that says what went wrong and what to check. The CLI prints
that line and exits non-zero; it never shows a traceback for these.

::

    MeshfedError
    ├── ZoneError            a zone directory is missing, incomplete, already exists or is running
    ├── InvalidAddressError  a host:port or host is malformed or out of range (also a ValueError)
    ├── TrustError           SPIFFE IDs, certificates, bundles
    │   ├── InvalidSpiffeIdError
    │   ├── InvalidBundleError       a bundle is malformed, tampered or holds no usable authority
    │   ├── InvalidSvidError         an X.509-SVID breaks the X.509-SVID rules or does not parse
    │   ├── UntrustedSvidError       a well-formed SVID does not chain to its trust domain's bundle
    │   ├── RotationError            a CA rotation cannot start or advance
    │   └── BundleFetchError         a bundle endpoint could not be reached, authenticated or read
    ├── CatalogError         a service, endpoint or catalog source is invalid or unreachable
    ├── PeeringError         a peering cannot be made, found, reached or kept
    │   ├── InvalidTokenError        a peering token is malformed, tampered, expired, spent or not for this zone
    │   └── PeerInputError           a peer sent a message that breaks the protocol's rules (refused whole)
    ├── FederationError      export and import rules, imported services
    └── GatewayError         the Rust data plane could not start or apply a config
        └── GatewayConfigError   the config was rejected; the running one stays in force
"""

from __future__ import annotations

__all__ = [
    "BundleFetchError",
    "CatalogError",
    "FederationError",
    "GatewayConfigError",
    "GatewayError",
    "InvalidAddressError",
    "InvalidBundleError",
    "InvalidSpiffeIdError",
    "InvalidSvidError",
    "InvalidTokenError",
    "MeshfedError",
    "PeerInputError",
    "PeeringError",
    "RotationError",
    "TrustError",
    "UntrustedSvidError",
    "ZoneError",
]


class MeshfedError(Exception):
    """Base of every error meshfed raises on purpose."""


class ZoneError(MeshfedError):
    """A zone directory is missing, incomplete, or would be overwritten."""


class InvalidAddressError(MeshfedError, ValueError):
    """A ``host:port`` or host is malformed or its port is out of range; the message names the flag or field.

    Also a ``ValueError``, so a pydantic validator that parses an address reports it as a validation error.
    """


class TrustError(MeshfedError):
    """A SPIFFE ID, certificate or trust bundle is unusable."""


class InvalidSpiffeIdError(TrustError):
    """A string is not a valid SPIFFE ID or trust domain name."""


class InvalidBundleError(TrustError):
    """A trust bundle could not be parsed or holds no usable root."""


class InvalidSvidError(TrustError):
    """An X.509-SVID does not parse or breaks a rule of the X.509-SVID spec."""


class UntrustedSvidError(TrustError):
    """An X.509-SVID does not verify against the bundle of its own trust domain."""


class RotationError(TrustError):
    """A rotation of the zone's CA cannot start (one is in progress) or its state is damaged."""


class BundleFetchError(TrustError):
    """A federated bundle endpoint could not be reached, authenticated, or served an unusable bundle."""


class CatalogError(MeshfedError):
    """A service or endpoint is invalid, missing, or a catalog source cannot be read."""


class FederationError(MeshfedError):
    """An export rule, import or federated service is invalid or missing."""


class PeeringError(MeshfedError):
    """A peering cannot be established, found, reached or kept up."""


class InvalidTokenError(PeeringError):
    """A peering token is malformed, tampered, expired, already used, or meant for another zone."""


class PeerInputError(PeeringError):
    """A peer's message breaks the protocol's rules; nothing of it was applied. The message names the field."""


class GatewayError(MeshfedError):
    """The gateway data plane could not start, bind or apply a config."""


class GatewayConfigError(GatewayError):
    """A gateway config was rejected; the message names the offending field."""
