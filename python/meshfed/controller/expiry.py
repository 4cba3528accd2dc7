"""Expiry gauges: when the zone's CA, its gateway's SVID and the roots it trusts expire (see meshfed.telemetry)."""

from __future__ import annotations

from collections.abc import Callable

from meshfed.errors import MeshfedError
from meshfed.telemetry import Telemetry
from meshfed.trust.ca import Svid
from meshfed.zone import Zone


def observe_expiry(telemetry: Telemetry, zone: Zone, gateway_svid: Callable[[], Svid | None]) -> None:
    """Register the gauges of when the zone's certificates and the roots it trusts expire."""

    def ca() -> list[tuple[float, dict[str, str]]]:
        try:
            authority = zone.authority.signing_ca()
        except MeshfedError:
            return []
        return [
            (authority.root.not_valid_after_utc.timestamp(), {"certificate": "root"}),
            (authority.intermediate.not_valid_after_utc.timestamp(), {"certificate": "intermediate"}),
        ]

    def svid() -> list[tuple[float, dict[str, str]]]:
        current = gateway_svid()
        return [] if current is None else [(current.leaf.not_valid_after_utc.timestamp(), {})]

    def bundles() -> list[tuple[float, dict[str, str]]]:
        try:
            stored = zone.trust.trusted_bundles()
        except MeshfedError:
            return []
        return [
            (
                min(root.not_valid_after_utc for root in item.bundle.roots).timestamp(),
                {"trust_domain": item.bundle.trust_domain.name},
            )
            for item in stored
            if item.bundle.roots
        ]

    telemetry.add_gauge(
        "meshfed.ca.expiry_timestamp",
        "Unix time at which the zone's active CA root or intermediate (label certificate) expires",
        "s",
        ca,
    )
    telemetry.add_gauge(
        "meshfed.gateway.svid.expiry_timestamp", "Unix time at which the gateway's current SVID expires", "s", svid
    )
    telemetry.add_gauge(
        "meshfed.trust.bundle.expiry_timestamp",
        "Unix time at which the first root of each trusted bundle (this zone's own included) expires",
        "s",
        bundles,
    )
