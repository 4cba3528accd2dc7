"""What a peering is: its states, the row that survives a restart, and the peering service's lease.

A peering is named locally (the acceptor names it when it issues a token; the
dialer names it when it establishes). Its life::

    PENDING      (acceptor) a token was issued; nobody has redeemed it yet
    ESTABLISHING bundles exchanged; the stream has not said hello yet
    ACTIVE       the stream is up and heartbeats arrive
    DISCONNECTED the stream dropped (the reason says why); the dialer is reconnecting
    FAILING      no message from the peer within its heartbeat deadline
    TERMINATED   the peer deleted the peering, or a local delete awaits the controller

A PENDING peering whose token expired unredeemed is gone: reads leave it out
at once, so ``peer list`` never shows an offer nobody can take any more, and
a new ``peer token`` starts a fresh one. The running peering service deletes
the row (with its tokens) :data:`EXPIRED_PENDING_KEPT` after the expiry; until
then a late redemption is told the token expired, not that it is unknown. A TERMINATED peering (the peer ended
it; its imports and the trust it brought are withdrawn already) no longer
holds its name or trust domain: ``peer token`` or ``peer establish`` with
either replaces it by a new peering. One being deleted locally
(``delete_requested``) waits for the running zone to tell the peer first.

``connected`` is whether the stream is up, as the running peering service
last wrote it (every poll); readers believe it only while that service's lease
is alive (:meth:`Listener.alive`), and otherwise say the zone is not running.

Where these are stored: :mod:`meshfed.federation.peering_store`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from meshfed.federation.exchange import ServiceSnapshot

# A running service refreshes its lease every poll (1 s); the CLI calls it dead after this long, as it does the
# controller's lease.
from meshfed.runstate import LEASE_TIMEOUT

# How long an expired, unredeemed PENDING peering stays stored (hidden) before the running zone deletes it.
EXPIRED_PENDING_KEPT = dt.timedelta(days=1)

Role = Literal["acceptor", "dialer"]


class PeerState(StrEnum):
    PENDING = "PENDING"
    ESTABLISHING = "ESTABLISHING"
    ACTIVE = "ACTIVE"
    DISCONNECTED = "DISCONNECTED"
    FAILING = "FAILING"
    TERMINATED = "TERMINATED"


# States in which the peer's controller may hold a stream open with us.
LIVE_STATES = frozenset({PeerState.ESTABLISHING, PeerState.ACTIVE, PeerState.DISCONNECTED, PeerState.FAILING})


@dataclass(frozen=True)
class Peering:
    """One row of ``peerings``: what survives a restart."""

    name: str
    role: Role
    state: PeerState
    created_at: dt.datetime
    updated_at: dt.datetime
    state_reason: str = ""
    delete_requested: bool = False
    peer_zone: str | None = None
    peer_trust_domain: str | None = None
    peer_addresses: tuple[str, ...] = ()
    # Our exports to the peer: the newest version sent (with its content) and the newest it acked.
    sent_version: int = 0
    sent_snapshot: ServiceSnapshot | None = None
    acked_version: int = 0
    # The peer's exports to us: the newest version applied (acked), with its content.
    received_version: int = 0
    received_snapshot: ServiceSnapshot | None = None
    last_connected_at: dt.datetime | None = None
    last_heartbeat_sent_at: dt.datetime | None = None
    last_heartbeat_received_at: dt.datetime | None = None
    # Services in the two snapshots; kept even when the snapshots are not loaded (see PeeringStore.get).
    sent_services: int = 0
    received_services: int = 0
    # The export epoch of each direction (see the Snapshot message): versions grow within one.
    sent_epoch: str = ""
    received_epoch: str = ""
    # Why the peer's newest update was refused (empty when it was applied): its imports keep the
    # last good version meanwhile.
    refused_reason: str = ""
    # The sequence of this zone's bundle the peer confirmed holding (0: unknown).
    peer_bundle_sequence: int = 0
    # Whether the stream was up when the running peering service last looked (see the module docstring).
    connected: bool = False


@dataclass(frozen=True)
class Listener:
    """Where the zone's peering service listens, as recorded by its last run."""

    establish_addresses: tuple[str, ...]
    stream_addresses: tuple[str, ...]
    alive_at: dt.datetime

    def alive(self, now: dt.datetime | None = None) -> bool:
        return (now or dt.datetime.now(dt.UTC)) - self.alive_at < LEASE_TIMEOUT


__all__ = ["EXPIRED_PENDING_KEPT", "LIVE_STATES", "Listener", "PeerState", "Peering", "Role"]
