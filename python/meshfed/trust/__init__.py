"""Trust: SPIFFE IDs, the zone's CA and X.509-SVIDs, and per-trust-domain bundles."""

from meshfed.trust.bundle import TrustBundle, parse_bundle
from meshfed.trust.ca import CertificateAuthority, Svid, create_authority, spiffe_id_of
from meshfed.trust.spiffe import SpiffeId, TrustDomain

__all__ = [
    "CertificateAuthority",
    "SpiffeId",
    "Svid",
    "TrustBundle",
    "TrustDomain",
    "create_authority",
    "parse_bundle",
    "spiffe_id_of",
]
