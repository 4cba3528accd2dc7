"""What a zone trusts, as plain data: the shared bodies of ``meshfed trust ... -o json`` and the API.

``GET /v1/trust/bundles``; what ``PUT`` and ``DELETE /v1/trust/bundles/{domain}``, ``POST /v1/trust/rotate``
and ``POST /v1/trust/federations`` answer.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from meshfed.store import CaGeneration
from meshfed.trust.bundle import TrustBundle, fingerprint
from meshfed.zone import Zone
from meshfed.zone.authority import RotationStep
from meshfed.zone.trust_store import RemovedTrust


def trust_listing(zone: Zone, now: dt.datetime) -> dict[str, Any]:
    """Every trusted domain with sequence, roots (expired ones flagged), last refresh and source; plus rotation."""
    federations = {federation.trust_domain: federation for federation in zone.trust.federations()}
    domains = []
    for stored in zone.trust.trusted_bundles():
        bundle = stored.bundle
        federation = federations.get(bundle.trust_domain)
        expired = {fingerprint(root) for root in bundle.expired_roots(now)}
        refreshed = federation.last_success_at if federation and federation.last_success_at else stored.updated_at
        entry: dict[str, Any] = {
            "trust_domain": bundle.trust_domain.name,
            "source": stored.source,
            "sequence": bundle.sequence,
            "refresh_hint_seconds": bundle.refresh_hint_seconds,
            "last_refresh": refreshed.isoformat(),
            "roots": [
                {
                    "fingerprint": fingerprint(root),
                    "subject": root.subject.rfc4514_string(),
                    "not_after": root.not_valid_after_utc.isoformat(),
                    "expired": fingerprint(root) in expired,
                }
                for root in bundle.roots
            ],
            "jwt_authorities": len(bundle.jwt_authorities),
        }
        if federation is not None:
            entry |= {
                "endpoint": federation.endpoint_url,
                "profile": federation.profile,
                "endpoint_spiffe_id": federation.endpoint_spiffe_id,
                "last_error": federation.last_error,
            }
        domains.append(entry)
    rotation = [
        {
            "generation": generation.generation,
            "root_fingerprint": generation.root_fingerprint,
            "phase": generation.state,
            "activate_at": generation.activate_at.isoformat() if generation.activate_at else None,
            "retire_at": generation.retire_at.isoformat() if generation.retire_at else None,
        }
        for generation in zone.authority.generations()
    ]
    return {"zone": zone.name, "trust_domains": domains, "rotation": rotation}


__all__ = ["trust_listing"]


def imported_bundle(bundle: TrustBundle) -> dict[str, Any]:
    """A bundle just trusted: its domain, sequence and root fingerprints."""
    return {"trust_domain": bundle.trust_domain.name, "sequence": bundle.sequence, "roots": bundle.fingerprints()}


def rotation_started(generation: CaGeneration) -> dict[str, Any]:
    """A rotation just started: the new CA generation, its root, and when it starts signing."""
    return {
        "generation": generation.generation,
        "root_fingerprint": generation.root_fingerprint,
        "activate_at": generation.activate_at.isoformat() if generation.activate_at else None,
    }


def rotation_ended(bundle_sequence: int, steps: Sequence[RotationStep]) -> dict[str, Any]:
    """A rotation finished or aborted early: the own bundle's sequence after it, and each phase change."""
    return {
        "bundle_sequence": bundle_sequence,
        "steps": [{"generation": s.generation, "phase": s.state, "message": s.message} for s in steps],
    }


def federation_added(trust_domain: str, endpoint_url: str, profile: str) -> dict[str, Any]:
    """A federation just recorded: the trust domain and how its bundle endpoint is reached."""
    return {"trust_domain": trust_domain, "endpoint_url": endpoint_url, "profile": profile}


def removed_trust(removed: RemovedTrust) -> dict[str, Any]:
    """What a removal of trust took away: the domain's bundle, its federation, or both."""
    return {
        "trust_domain": removed.trust_domain.name,
        "bundle_removed": removed.bundle,
        "federation_removed": removed.federation,
    }
