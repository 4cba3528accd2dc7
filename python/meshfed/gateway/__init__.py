"""The east-west gateway: config models and a handle on the Rust data plane."""

from meshfed.gateway.config import (
    Cluster,
    Endpoint,
    GatewayConfig,
    Identity,
    OriginateListener,
    PassthroughListener,
    Route,
    TerminateListener,
)
from meshfed.gateway.runtime import Gateway
from meshfed.gateway.sni import service_sni

__all__ = [
    "Cluster",
    "Endpoint",
    "Gateway",
    "GatewayConfig",
    "Identity",
    "OriginateListener",
    "PassthroughListener",
    "Route",
    "TerminateListener",
    "service_sni",
]
