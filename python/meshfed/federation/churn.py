"""How fast one peer's updates are applied here: a token bucket per peering, so one peer's churn cannot take the zone.

Every update a peer sends (a snapshot or a delta) costs this zone a parse, a
store write and a gateway reconfigure shared with every other peer and the
local catalog. An honest exporter sends one update at a time and waits for
its ack, coalescing whatever changes meanwhile into the next one; so when a
peer sends faster than :attr:`~meshfed.federation.link.PeerLimits.updates_per_second`
(after a burst of :attr:`~meshfed.federation.link.PeerLimits.update_burst`),
its next update is applied, and acked, only when its budget allows. The wait
is the back-pressure: the exporter folds its changes into fewer, larger
updates; a peer that does not wait for acks is not read meanwhile, so its
messages stay in the transport's flow-control window, not in this zone's
memory. Other peers' budgets are their own, and the budget belongs to the
peering, not the connection: reconnecting does not refill it.
"""

from __future__ import annotations

import logging

from meshfed.clock import Clock

# The peering service's one logger (see meshfed.federation.link).
log = logging.getLogger("meshfed.federation.service")


class UpdateBudget:
    """A token bucket of ``burst`` updates refilled at ``rate`` per second, on ``clock``."""

    def __init__(self, peer: str, rate: float, burst: int, clock: Clock) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"an update budget needs a rate above 0 and a burst of at least 1, got {rate}, {burst}")
        self._peer = peer
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock.monotonic()
        self._throttling = False
        self.throttled = 0
        """Updates that had to wait for the budget (since the zone started)."""

    def _refill(self) -> None:
        now = self._clock.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now

    async def take(self) -> None:
        """Return once one update may be applied, and spend it."""
        self._refill()
        if self._tokens < 1:
            self.throttled += 1
            if not self._throttling:
                self._throttling = True
                log.warning(
                    "peer %s sends updates faster than %g per second (burst %d): applying them at that rate, "
                    "its changes coalesce meanwhile; check what churns in its exports (meshfed status on its side), "
                    "or raise updates_per_second in its peering limits",
                    self._peer,
                    self._rate,
                    int(self._burst),
                )
            await self._clock.sleep((1 - self._tokens) / self._rate)
            self._refill()
        elif self._throttling and self._tokens >= self._burst - 1:
            self._throttling = False  # a full bucket again: the next throttle is a new episode, logged again
        self._tokens = max(0.0, self._tokens - 1)


__all__ = ["UpdateBudget"]
