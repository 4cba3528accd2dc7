"""What only the running controller knows, kept where the CLI can read it (:mod:`meshfed.runstate`).

A lease saying the zone runs (renewed every second) and the address of every
listener (recorded after an apply changed one). Beside the health version,
the local endpoints the gateway's health checks find failing are kept by
:mod:`meshfed.controller.local_health`; a verdict of an earlier run is cleared here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from meshfed.federation.exports import ExportRules
from meshfed.runstate import LEASE_RENEW_SECONDS, RunState
from meshfed.zone import Zone


class RunRecord:
    """The zone's lease and listener addresses in ``state.db``; ``addresses`` says where listeners serve now."""

    def __init__(self, zone: Zone, addresses: Callable[[], dict[str, tuple[str, int]]]) -> None:
        self._zone = zone
        self._addresses = addresses
        self._recorded_listeners: dict[str, tuple[str, int]] | None = None
        self._listeners_applied = asyncio.Event()

    def take_lease(self) -> None:
        """The zone runs from now on (blocking: call it in a thread)."""
        with RunState(self._zone.directory) as runstate, ExportRules(self._zone.directory) as rules:
            runstate.take_lease()
            # A verdict of an earlier run says nothing about this gateway, which has checked nothing yet.
            rules.clear_unhealthy_endpoints()
        self._recorded_listeners = None
        self._record_listeners()

    # Each use of state.db opens, uses and closes its connection inside the worker thread: a task cancelled
    # while it awaits the thread must not close a connection the thread is still using (sqlite3 crashes).
    async def release_lease(self) -> None:
        await asyncio.to_thread(self._in_runstate, RunState.release_lease)

    def listeners_applied(self) -> None:
        """A config was applied: record the listeners soon (never awaits)."""
        self._listeners_applied.set()

    async def renew_lease(self) -> None:
        while True:
            await asyncio.sleep(LEASE_RENEW_SECONDS)
            await asyncio.to_thread(self._in_runstate, RunState.renew_lease)

    def _in_runstate(self, step: Callable[[RunState], None]) -> None:
        with RunState(self._zone.directory) as runstate:
            step(runstate)

    async def keep_listeners_recorded(self) -> None:
        while True:
            await self._listeners_applied.wait()
            self._listeners_applied.clear()
            await asyncio.to_thread(self._record_listeners)

    def _record_listeners(self) -> None:
        """Keep where each listener serves for the CLI, when it changed (most applies change no listener)."""
        addresses = self._addresses()
        if addresses == self._recorded_listeners:
            return
        with RunState(self._zone.directory) as runstate:
            runstate.record_listeners(addresses)
        self._recorded_listeners = addresses
