"""What ``meshfed peer list|show`` and ``GET /v1/peerings`` report for one peering.

A :class:`PeerStatus` is the stored row (:class:`~meshfed.federation.peering_state.Peering`),
overlaid with the fresher numbers of the running link (:class:`LiveLink`) when
the zone's peering service runs.
"""

from __future__ import annotations

import datetime as dt
from typing import Protocol

from pydantic import BaseModel

from meshfed.clock import SYSTEM_CLOCK
from meshfed.federation.peering_state import Peering, PeerState


class LiveLink(Protocol):
    """What a status reads of a running peering's link."""

    @property
    def connected_now(self) -> bool: ...

    @property
    def peer_heartbeat_interval(self) -> float: ...

    @property
    def export_error(self) -> str: ...

    def as_peering(self, stored: Peering) -> Peering: ...

    def propagation_lag(self) -> float: ...

    def quarantine_reason(self) -> str: ...

    @property
    def updates_throttled(self) -> int: ...


class PeerStatus(BaseModel):
    """What ``meshfed peer list|show`` and ``GET /v1/peerings`` report for one peering."""

    name: str
    role: str
    state: PeerState
    state_reason: str
    peer_zone: str | None
    peer_trust_domain: str | None
    peer_addresses: list[str]
    # Whether the stream is up now (read from the zone directory by another process: as the running
    # zone last recorded it; see PeerStatus.stored).
    connected: bool
    last_connected_at: dt.datetime | None
    last_heartbeat_sent_at: dt.datetime | None
    last_heartbeat_received_at: dt.datetime | None
    heartbeat_age_seconds: float | None
    sent_version: int
    acked_version: int
    received_version: int
    # Seconds the oldest unacked version of our exports has waited for the peer's ack (0 when in sync).
    propagation_lag_seconds: float
    exported_services: int
    imported_services: int
    # The peer's heartbeat interval as this zone uses it (clamped to local bounds): its failure deadline.
    peer_heartbeat_seconds: float | None
    # Why this zone refused the peer's newest update (its imports keep the last good version), or
    # why its imports are withheld; empty when all is applied.
    import_error: str
    # Why the peer refused this zone's newest update; empty when it applied it.
    export_error: str
    # The peer's updates that waited for its budget (PeerLimits.updates_per_second) since the zone started.
    updates_throttled: int = 0

    @classmethod
    def of(cls, peering: Peering, link: LiveLink | None = None, *, now: dt.datetime | None = None) -> PeerStatus:
        """The stored row, overlaid with the live link's fresher numbers when the service runs.

        ``now`` (default: the system clock's) is what the heartbeat's age is measured at.
        """
        now = now or SYSTEM_CLOCK.now()
        if link is not None:
            peering = link.as_peering(peering)
        received_at = peering.last_heartbeat_received_at
        return cls(
            name=peering.name,
            role=peering.role,
            state=peering.state,
            state_reason=peering.state_reason,
            peer_zone=peering.peer_zone,
            peer_trust_domain=peering.peer_trust_domain,
            peer_addresses=list(peering.peer_addresses),
            connected=link is not None and link.connected_now,
            last_connected_at=peering.last_connected_at,
            last_heartbeat_sent_at=peering.last_heartbeat_sent_at,
            last_heartbeat_received_at=received_at,
            heartbeat_age_seconds=None if received_at is None else (now - received_at).total_seconds(),
            sent_version=peering.sent_version,
            acked_version=peering.acked_version,
            received_version=peering.received_version,
            propagation_lag_seconds=link.propagation_lag() if link is not None else 0.0,
            exported_services=len(peering.sent_snapshot.services) if peering.sent_snapshot else peering.sent_services,
            imported_services=(
                len(peering.received_snapshot.services) if peering.received_snapshot else peering.received_services
            ),
            peer_heartbeat_seconds=link.peer_heartbeat_interval if link is not None else None,
            import_error=peering.refused_reason or (link.quarantine_reason() if link is not None else ""),
            export_error=link.export_error if link is not None else "",
            updates_throttled=link.updates_throttled if link is not None else 0,
        )

    @classmethod
    def stored(cls, peering: Peering) -> PeerStatus:
        """The stored row as a process other than the running zone sees it (``meshfed peer show``).

        ``connected`` is what the running peering service last recorded: current only while its
        lease is alive (:meth:`~meshfed.federation.peering_state.Listener.alive`); a reader must say
        it is unknown otherwise.
        """
        return cls.of(peering).model_copy(update={"connected": peering.connected})


__all__ = ["LiveLink", "PeerStatus"]
