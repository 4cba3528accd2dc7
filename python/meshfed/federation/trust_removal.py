"""Ending trust in a trust domain: the shared body of ``meshfed trust remove`` and the API's DELETE routes.

A bundle is removed from ``state.db``; the gateway stops trusting it on its
next reconfigure, which follows at once when the API made the change and
within the rotation service's check interval when the CLI did (that service
notices every change to the trusted bundles; see :mod:`meshfed.zone.rotation`).
"""

from __future__ import annotations

from meshfed.errors import TrustError
from meshfed.federation.peering_state import PeerState
from meshfed.federation.peering_store import PeeringStore
from meshfed.trust.spiffe import TrustDomain
from meshfed.zone import RemovedTrust, Zone


def remove_trust(zone: Zone, trust_domain: TrustDomain, *, federation_only: bool = False) -> RemovedTrust:
    """Stop trusting ``trust_domain`` (or, with ``federation_only``, stop federating with it).

    Refused, in one line saying what to do instead: the zone's own domain, a
    domain a peering that is not deleted depends on (its stream and gateway
    traffic verify with that bundle, whoever brought it), and a domain the
    zone does not trust at all.
    """
    with PeeringStore.of(zone) as peerings:
        owner = next(
            (
                peering
                for peering in peerings.peerings()
                if peering.peer_trust_domain == trust_domain.name
                and peering.state != PeerState.TERMINATED
                and not peering.delete_requested
            ),
            None,
        )
    if owner is not None:
        raise TrustError(
            f"{trust_domain} is the trust domain of peering {owner.name!r} ({owner.state.value}); delete the "
            f"peering instead (meshfed peer delete {owner.name}, or DELETE /v1/peerings/{owner.name}): that "
            "ends its trust too"
        )
    removed = zone.trust.remove_trust(trust_domain, federation_only=federation_only)
    if not removed.bundle and not removed.federation:
        what = "federates with" if federation_only else "trusts"
        raise TrustError(
            f"zone {zone.name} {what} no trust domain {trust_domain}; 'meshfed trust list' shows what it does"
        )
    return removed


__all__ = ["remove_trust"]
