"""What every way of electing a zone's leader shares: one candidate's campaign.

A candidate tries every ``retry_period`` until it leads, following meanwhile;
then it renews every ``retry_period``, and one that has not renewed for
``renew_deadline`` stops leading (:class:`LeadershipLostError`) — a deadline
shorter than the time after which the others may take over, so that two never
lead together. The ways differ in what is held: a Kubernetes Lease
(:mod:`meshfed.leadership.lease`) or a Consul lock (:mod:`meshfed.leadership.consul`).
"""

from __future__ import annotations

import abc
import logging
from typing import Protocol

from meshfed.clock import Clock
from meshfed.errors import MeshfedError

log = logging.getLogger("meshfed.leadership")


class LeadershipLostError(MeshfedError):
    """The leader could not renew in time: it must stop acting as the leader."""


class Candidacy(Protocol):
    """What every way of electing says of a candidate."""

    @property
    def identity(self) -> str: ...  # this candidate, unique among them (a pod name)
    @property
    def retry_period(self) -> float: ...  # how often candidates try, and the leader renews
    @property
    def renew_deadline(self) -> float: ...  # a leader that has not renewed for this long stops leading


def check_timings(candidacy: Candidacy, expiry: float, what: str) -> None:
    """Refuse timings that leave no room to renew before ``expiry`` (seconds), after which others may lead."""
    if not candidacy.retry_period < candidacy.renew_deadline < expiry:
        raise ValueError(
            f"timings must satisfy retry period ({candidacy.retry_period:g} s) < renew deadline "
            f"({candidacy.renew_deadline:g} s) < {what} ({expiry:g} s)"
        )


class Campaign(abc.ABC):
    """One candidate, as its :class:`Candidacy` says."""

    def __init__(self, candidacy: Candidacy, clock: Clock) -> None:
        self.identity = candidacy.identity
        self._retry_period = candidacy.retry_period
        self._renew_deadline = candidacy.renew_deadline
        self._clock = clock
        self.leading = False
        self.holder = ""  # who leads, as last read ("" if nobody)
        self._renewed_at = 0.0  # this clock's monotonic time of the last renewal

    @property
    @abc.abstractmethod
    def held(self) -> str:
        """What the leader holds, for logs: ``lease default/meshfed``."""

    @abc.abstractmethod
    async def try_acquire_or_renew(self) -> bool:
        """One try: True if this candidate leads now; sets :attr:`leading`, :attr:`holder` and the renewal time.

        Raises :class:`LeadershipLostError` when a leader learns that it no longer holds what it held (a way
        of electing where the others may take over sooner than the renew deadline)."""

    @abc.abstractmethod
    async def release(self) -> None:
        """Give up leading, if this candidate leads, so that a follower leads at its next try."""

    @abc.abstractmethod
    def _check_when_lost(self) -> str:
        """What to check when renewing keeps failing."""

    def _won(self, written: bool, started: float) -> bool:
        """Records the outcome of a write that takes or renews, tried at monotonic time ``started``: leading if
        it was written, renewed as of ``started`` (never later than the server may have recorded it)."""
        self.leading = written
        if written:
            self.holder, self._renewed_at = self.identity, started
        return written

    async def acquire(self) -> None:
        """Return once this candidate leads (following meanwhile, one try per retry period)."""
        reported = ""
        while not await self.try_acquire_or_renew():
            if self.holder != reported:
                reported = self.holder
                log.info("%s: %s leads; %s follows", self.held, self.holder or "nobody", self.identity)
            await self._clock.sleep(self._retry_period)
        log.info("%s: %s leads", self.held, self.identity)

    async def hold(self) -> None:
        """Renew while leading, forever; raises :class:`LeadershipLostError` once a renewal is overdue."""
        while True:
            await self._clock.sleep(self._retry_period)
            renewed = False
            try:
                renewed = await self.try_acquire_or_renew()
            except LeadershipLostError:
                self.leading = False
                raise
            except MeshfedError as err:
                log.warning("%s: renewing failed: %s", self.held, err)
            if not renewed and self._clock.monotonic() - self._renewed_at >= self._renew_deadline:
                self.leading = False
                raise LeadershipLostError(
                    f"{self.held}: not renewed for {self._renew_deadline:g} s (last read: held by "
                    f"{self.holder or 'nobody'}); {self.identity} stops leading — {self._check_when_lost()}"
                )
