"""Failing peers: how long each peer has been FAILING, and the grace timers of the ``closed`` policy.

Under ``open`` a failing peer's imports stay served (callers' connects fail
over or fail fast); under ``closed`` they stop once the peer has been FAILING
for the grace period, and come back when it is no longer FAILING.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from typing import Literal

from meshfed.clock import SYSTEM_CLOCK, Clock
from meshfed.federation.peering_state import PeerState
from meshfed.supervisor import Supervisor

from .retry import retrying

# The controller's parts log as the controller: operators (and tests) follow one logger.
log = logging.getLogger("meshfed.controller")

FailingPeerPolicy = Literal["open", "closed"]


class FailingPeers:
    """When each peer started FAILING, whose imports are withheld, and the timer that withholds them."""

    def __init__(
        self,
        zone: str,
        supervisor: Supervisor,
        *,
        grace: dt.timedelta,
        policy: FailingPeerPolicy,
        reconfigure: Callable[[], Awaitable[None]],
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._zone = zone
        self._clock = clock  # failing_since and the grace timers
        self._supervisor = supervisor
        self._grace = grace
        self._policy = policy
        self._reconfigure = reconfigure
        self._failing_since: dict[str, float] = {}

    def forget(self, peer: str) -> None:
        """The peering is gone (TERMINATED)."""
        self._failing_since.pop(peer, None)

    async def follow(self, peer: str, state: str) -> None:
        """Follow a peering's state other than TERMINATED: start the grace timer, or serve it again."""
        if state == "FAILING":
            self._failing_since.setdefault(peer, self._clock.monotonic())
            if self._policy == "closed" and f"grace-{peer}" not in self._grace_timers():
                self._supervisor.spawn(f"grace-{peer}", lambda: self._close_after_grace(peer))
        elif state == PeerState.DISCONNECTED:
            pass  # the stream dropped; FAILING (and the policy) follows at the heartbeat deadline
        elif self._failing_since.pop(peer, None) is not None and self._policy == "closed":
            await self._reconfigure()  # back from FAILING: serve its imports again

    def withheld(self, peer: str) -> bool:
        """Under the closed policy, a peer failing for longer than the grace period is not served."""
        since = self._failing_since.get(peer)
        if since is None or self._policy != "closed":
            return False
        return self._clock.monotonic() - since >= self._grace.total_seconds()

    def withheld_now(self) -> frozenset[str]:
        """Every peer whose imports are not served now (safe off the event loop: it iterates a copy)."""
        return frozenset(peer for peer in list(self._failing_since) if self.withheld(peer))

    def _grace_timers(self) -> set[str]:
        return {status.name for status in self._supervisor.statuses() if status.name.startswith("grace-")}

    async def _close_after_grace(self, peer: str) -> None:
        await self._clock.sleep(self._grace.total_seconds())
        if peer in self._failing_since:
            log.warning("zone %s: peer %s failing past the grace period; its imports stop", self._zone, peer)
            await retrying(self._zone, f"withholding the imports of {peer}", self._reconfigure)
