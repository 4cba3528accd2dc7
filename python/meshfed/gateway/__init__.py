"""The east-west gateway: config models and a handle on the Rust data plane."""

from meshfed.gateway.config import (
    AuthzRule,
    CircuitBreaker,
    Cluster,
    Endpoint,
    GatewayConfig,
    HealthCheck,
    Identity,
    OriginateListener,
    OutlierDetection,
    PassthroughListener,
    RateLimit,
    Route,
    TerminateListener,
    UpstreamTls,
    WeightedCluster,
)
from meshfed.gateway.handle import Gateway
from meshfed.gateway.sni import service_sni

__all__ = [
    "AuthzRule",
    "CircuitBreaker",
    "Cluster",
    "Endpoint",
    "Gateway",
    "GatewayConfig",
    "HealthCheck",
    "Identity",
    "OriginateListener",
    "OutlierDetection",
    "PassthroughListener",
    "RateLimit",
    "Route",
    "TerminateListener",
    "UpstreamTls",
    "WeightedCluster",
    "service_sni",
]
