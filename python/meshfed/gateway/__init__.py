"""The east-west gateway: config models and a handle on the Rust data plane."""

from meshfed.gateway.config import (
    AuthzRule,
    CircuitBreaker,
    Cluster,
    ConnectListener,
    ConnectRoute,
    Endpoint,
    GatewayConfig,
    HealthCheck,
    Identity,
    ListenerLimits,
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
    "ConnectListener",
    "ConnectRoute",
    "Endpoint",
    "Gateway",
    "GatewayConfig",
    "HealthCheck",
    "Identity",
    "ListenerLimits",
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
