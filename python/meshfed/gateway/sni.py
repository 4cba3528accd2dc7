"""Server names of federated services (Istio's east-west form, trust domain as suffix).

``outbound_.<port>_.<subset>_.<service>.<namespace>.svc.<trust-domain>``; the
subset is empty when there is none. Only the control plane builds these; the
data plane matches them as opaque strings.
"""

from __future__ import annotations

from meshfed.trust.spiffe import TrustDomain


def service_sni(service: str, namespace: str, port: int, trust_domain: TrustDomain, subset: str = "") -> str:
    """The SNI a peer gateway routes on for one port of one service."""
    return f"outbound_.{port}_.{subset}_.{service}.{namespace}.svc.{trust_domain.name}"
