"""The gateway config document, built in Python and compiled once by the Rust core.

These models mirror the Rust side's serde types field for field (both reject
unknown fields). Python builds a :class:`GatewayConfig`; :meth:`to_json` is the
only form that crosses into ``meshfed._core``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Identity(_Model):
    """The gateway's own X.509-SVID: leaf then intermediates, and its PKCS#8 key."""

    cert_chain_pem: str
    private_key_pem: str


class Endpoint(_Model):
    address: str
    weight: int = Field(default=1, ge=1)


class Cluster(_Model):
    name: str
    endpoints: list[Endpoint]
    connect_timeout_ms: int = Field(default=5000, ge=1)


class Route(_Model):
    """Route a server name to a cluster. ``allow`` holds SPIFFE ID patterns (terminate only)."""

    sni: str
    cluster: str
    allow: list[str] | None = None


class PassthroughListener(_Model):
    """Peek the ClientHello, route on SNI, forward the TLS bytes untouched."""

    mode: Literal["passthrough"] = "passthrough"
    name: str
    address: str
    routes: list[Route]


class TerminateListener(_Model):
    """Finish mTLS, verify the caller against its own trust domain's bundle, authorize, forward."""

    mode: Literal["terminate"] = "terminate"
    name: str
    address: str
    routes: list[Route]


class OriginateListener(_Model):
    """Accept plain TCP and open mTLS to a peer gateway, verifying its exact SPIFFE ID."""

    mode: Literal["originate"] = "originate"
    name: str
    address: str
    cluster: str
    sni: str
    peer_spiffe_id: str


Listener = Annotated[PassthroughListener | TerminateListener | OriginateListener, Field(discriminator="mode")]


class GatewayConfig(_Model):
    """One complete gateway configuration: applied as a whole, atomically."""

    identity: Identity | None = None
    trust_bundles: dict[str, str] = Field(default_factory=dict)
    handshake_timeout_ms: int = Field(default=10_000, ge=1)
    listeners: list[Listener] = Field(default_factory=list)
    clusters: list[Cluster] = Field(default_factory=list)

    def to_json(self) -> bytes:
        """The document the Rust core compiles."""
        return self.model_dump_json(exclude_none=True).encode()
