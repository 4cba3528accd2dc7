"""The bundles peerings bring: which one this zone holds for a peer, and when a peering may not own one.

A peering stores its peer's bundle with source ``peering``; a trust domain the
zone already trusts for another reason (an operator's import, a federation
over a bundle endpoint) stays owned by that reason, and a peering with it is
refused, on both sides of establishment and when the peer sends a bundle.
"""

from __future__ import annotations

from meshfed.errors import PeeringError
from meshfed.trust.bundle import TrustBundle
from meshfed.trust.spiffe import TrustDomain
from meshfed.zone import Zone


def held_bundle(zone: Zone, trust_domain: TrustDomain) -> TrustBundle | None:
    """The bundle ``zone`` trusts for ``trust_domain``, whatever brought it."""
    return next((s.bundle for s in zone.trust.trusted_bundles() if s.bundle.trust_domain == trust_domain), None)


def trust_owned_elsewhere(trust_domain: TrustDomain, source: str) -> str:
    """Why a peering may not take over the trust in ``trust_domain`` that ``source`` brought."""
    how = {"import": "an operator imported its bundle", "federation": "it is federated over a bundle endpoint"}
    return (
        f"this zone already trusts {trust_domain} because {how.get(source, f'of source {source!r}')}; a peering "
        f"will not replace that trust: remove it first ('meshfed trust list' shows it), then peer again"
    )


def refuse_trust_owned_elsewhere(zone: Zone, trust_domain: TrustDomain) -> None:
    """Raise PeeringError when ``zone`` trusts ``trust_domain`` for a reason other than a peering."""
    stored = next((s for s in zone.trust.trusted_bundles() if s.bundle.trust_domain == trust_domain), None)
    if stored is not None and stored.source != "peering":
        raise PeeringError(trust_owned_elsewhere(trust_domain, stored.source))


__all__ = ["held_bundle", "refuse_trust_owned_elsewhere", "trust_owned_elsewhere"]
