"""The acceptor's rules for peering tokens: what it may issue, and which presented token it accepts.

The token itself (its encoding, its secret) is :mod:`meshfed.federation.token`;
the store that keeps each token's hash, and spends it once, is
:mod:`meshfed.federation.peering_store`, which applies these rules.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

from meshfed.errors import InvalidTokenError, PeeringError
from meshfed.federation.peering_names import check_peering_name
from meshfed.federation.peering_schema import from_iso, iso
from meshfed.federation.peering_state import Peering, PeerState
from meshfed.federation.token import MAX_TOKEN_TTL, PeeringToken, new_secret
from meshfed.zone import Zone


@dataclass(frozen=True)
class IssuedToken:
    token: PeeringToken
    encoded: str = field(repr=False)


def new_token(
    zone: Zone, peer_name: str, addresses: Sequence[str], ttl: dt.timedelta, now: dt.datetime
) -> PeeringToken:
    """A fresh token (with a new secret) letting zone ``peer_name`` dial ``zone`` at ``addresses`` once.

    ``peer_name`` must be a zone name (a DNS label), and ``ttl`` at most :data:`MAX_TOKEN_TTL`.
    """
    check_peering_name(peer_name, "the peer's zone name")
    if ttl <= dt.timedelta(0):
        raise PeeringError(f"the token TTL must be positive, got {ttl}")
    if ttl > MAX_TOKEN_TTL:
        raise PeeringError(
            f"a token may be valid for at most {MAX_TOKEN_TTL.days} days, not {ttl}; "
            "issue one when the peer is ready to redeem it"
        )
    if peer_name == zone.name:
        raise PeeringError(f"{peer_name!r} is this zone's own name; a zone cannot peer with itself")
    if not addresses:
        raise PeeringError(
            "no establishment address for the token: start the zone ('meshfed up') once so it records "
            "where it listens, or pass --address HOST:PORT"
        )
    return PeeringToken(
        peer_name=peer_name,
        zone=zone.name,
        trust_domain=str(zone.trust_domain),
        addresses=list(addresses),
        ca_bundle=zone.trust.own_bundle().to_spiffe_json().decode(),
        secret=new_secret(),
        expires_at=(now + ttl).replace(microsecond=0),
    )


def check_presented(stored: tuple[object, ...] | None, *, dialer_zone: str, now: dt.datetime) -> str:
    """The peering a presented token is for, given its stored row (``peer_name, expires_at, used_at``, or None).

    Refuses (:class:`~meshfed.errors.InvalidTokenError`) a token unknown, spent, expired, or presented by another zone.
    """
    if stored is None:
        raise InvalidTokenError(
            "the token's secret is unknown to this zone: the token was altered, revoked by a newer token, "
            "or issued by another zone"
        )
    peer_name, expires_at, used_at = str(stored[0]), from_iso(stored[1]), stored[2]
    if used_at is not None:
        raise InvalidTokenError(f"this peering token was already used at {used_at}; issue a new one")
    if now >= expires_at:
        raise InvalidTokenError(f"this peering token expired at {iso(expires_at)}; issue a new one")
    if dialer_zone != peer_name:
        raise InvalidTokenError(
            f"this token was issued for zone {peer_name!r}, but zone {dialer_zone!r} presented it; "
            f"issue one with 'meshfed peer token --peer {dialer_zone}'"
        )
    return peer_name


def check_waiting(peering: Peering) -> Peering:
    """Refuse redeeming a token for a peering that is past PENDING."""
    if peering.state is not PeerState.PENDING:
        raise InvalidTokenError(f"peering {peering.name!r} is {peering.state}, not waiting for a token")
    return peering


__all__ = ["IssuedToken", "check_presented", "check_waiting", "new_token"]
