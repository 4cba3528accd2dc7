"""What a zone's peering service is tuned by, in one object handed to it whole.

:class:`~meshfed.federation.service.PeeringService` takes a
:class:`PeeringSettings`; ``meshfed up`` builds one from its flags and
:class:`meshfed.runtime.ZoneSettings` carries it. Defaults come from
:mod:`meshfed.defaults`, or from the constant of the module that enforces them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshfed import defaults
from meshfed.federation.link import PEER_HEARTBEAT_BOUNDS, PeerLimits


@dataclass(frozen=True, kw_only=True)
class PeeringSettings:
    """Where the peering service listens, how often it beats and polls, and what a peer may make it hold."""

    listen_address: str = defaults.PEERING_ADDRESS  # host:port of the peering stream (mTLS)
    establish_address: str = defaults.ESTABLISH_ADDRESS  # host:port where peers redeem tokens (TLS)
    advertise_host: str | None = None  # host peers dial for peering, put in tokens; default: the listen host
    heartbeat_interval: float = defaults.HEARTBEAT_INTERVAL.total_seconds()  # seconds, announced to peers
    # A peer is FAILING after this many of its announced intervals without a message.
    missed_heartbeats: int = 3
    # A peer's announced heartbeat interval is held within these (seconds): its failure deadline.
    peer_heartbeat_bounds: tuple[float, float] = PEER_HEARTBEAT_BOUNDS
    # Seconds between reads of the peering store: how soon the CLI's changes (establish, delete) are picked up.
    store_poll_interval: float = 1.0
    reconnect_backoff: tuple[float, float] = (0.2, 10.0)  # a dialer's first and longest wait (seconds) to redial
    limits: PeerLimits = field(default_factory=PeerLimits)  # what one peer may make this zone hold


__all__ = ["PeeringSettings"]
