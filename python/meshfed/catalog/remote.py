"""What the Consul and Kubernetes sources share: a cached snapshot, wake-ups, backoff.

Both sources long-poll their server in background tasks (Consul blocking
queries, Kubernetes watches) and answer :meth:`watch` from the cache, because
the controller calls ``watch`` with a short timeout and checks export rules
between calls. A failed poll never empties the cache: the last good snapshot
keeps serving while the task backs off and retries, and :attr:`last_error`
says what went wrong (once per distinct failure in the log, however many
queries share it).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time

from meshfed.catalog.model import CatalogSnapshot, Service
from meshfed.errors import CatalogError

log = logging.getLogger(__name__)


class SnapshotCache:
    """The newest snapshot of a remote catalog, with a wake-up for watchers.

    Versions start from the wall clock in milliseconds and then grow by one per
    change: peers keep the highest version they saw (``ImportStore``), so a
    restarted controller must never publish a smaller one.
    """

    def __init__(self, what: str) -> None:
        self._what = what
        self._snapshot = CatalogSnapshot(version=0, services=[])
        self._changed = asyncio.Event()
        self.synced = asyncio.Event()
        # What each failing query said, oldest first. Queries fail and heal on their own (one watcher per
        # Consul service): one that answers must not clear another's failure, or a persistent failure is
        # logged again every time some other query succeeds.
        self._failing: dict[str, str] = {}
        # The last few distinct failures, for status pages and tests: errors that healed stay visible.
        self.recent_errors: collections.deque[str] = collections.deque(maxlen=20)

    @property
    def current(self) -> CatalogSnapshot:
        return self._snapshot

    def update(self, services: list[Service]) -> bool:
        """Publish ``services`` (any order) if they differ from the current snapshot. True if published."""
        ordered = sorted(services, key=lambda service: service.key)
        first = not self.synced.is_set()
        self.synced.set()
        if not first and ordered == self._snapshot.services:
            return False
        version = max(self._snapshot.version + 1, time.time_ns() // 1_000_000)
        self._snapshot = CatalogSnapshot(version=version, services=ordered)
        self._changed.set()
        self._changed = asyncio.Event()
        return True

    @property
    def last_error(self) -> str | None:
        """What the most recent of the still-failing queries said, or None while every query answers."""
        return next(reversed(self._failing.values()), None)

    def failed(self, message: str, query: str = "") -> None:
        """``query`` failed with ``message``: logged once, not again while any query keeps failing that way."""
        previous = self._failing.pop(query, None)
        if message != previous and message not in self._failing.values():
            self.recent_errors.append(message)
            log.warning("%s (serving catalog version %d)", message, self._snapshot.version)
        self._failing[query] = message

    def recovered(self, query: str = "") -> None:
        """``query`` answered (or is no longer asked)."""
        if self._failing.pop(query, None) is not None and not self._failing:
            log.info("%s: reachable again", self._what)

    async def first(self, timeout: float) -> CatalogSnapshot:
        """The snapshot once the first full listing is in; a clear error if none arrives in ``timeout`` seconds."""
        try:
            # asyncio.timeout, not wait_for, here and below: on 3.11 wait_for can swallow a cancel that
            # races the timeout, and the controller's catalog watch (every 0.2 s) would then never stop.
            async with asyncio.timeout(timeout):
                await self.synced.wait()
        except TimeoutError:
            detail = self.last_error or f"{self._what} did not answer within {timeout:g} s"
            raise CatalogError(f"cannot list the catalog: {detail}") from None
        return self._snapshot

    async def newer(self, since: int, timeout: float) -> CatalogSnapshot:
        """Return as soon as the version passes ``since``, or the current snapshot after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self._snapshot.version <= since:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                break
        return self._snapshot


class Backoff:
    """Exponential backoff with full jitter, reset after a success."""

    def __init__(self, initial: float = 0.05, maximum: float = 10.0) -> None:
        self._initial = initial
        self._maximum = maximum
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    async def sleep(self) -> None:
        ceiling = min(self._maximum, self._initial * 2**self._attempt)
        self._attempt += 1
        # Jitter keeps many zones from hammering a recovering server in lockstep.
        await asyncio.sleep(ceiling / 2 + random.uniform(0, ceiling / 2))  # noqa: S311 -- not cryptographic


__all__ = ["Backoff", "SnapshotCache"]
