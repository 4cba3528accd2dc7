"""What only the running controller knows, kept where the CLI can read it (:mod:`meshfed.runstate`).

A lease saying the zone runs (renewed every second) and the address of every
listener (recorded after an apply changed one). Beside the health version,
the local endpoints the gateway's health checks find failing are kept by
:mod:`meshfed.controller.local_health`; a verdict of an earlier run is cleared here.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable

from meshfed.database import Database
from meshfed.federation.exports import ExportRules
from meshfed.runstate import LEASE_RENEW_SECONDS, RunState


class RunRecord:
    """The zone's lease and listener addresses in ``state.db``; ``addresses`` says where listeners serve now."""

    def __init__(self, state: Database, addresses: Callable[[], dict[str, tuple[str, int]]]) -> None:
        self._state = state
        self._addresses = addresses
        self._recorded_listeners: dict[str, tuple[str, int]] | None = None
        self._listeners_applied = asyncio.Event()

    async def take_lease(self) -> None:
        """The zone runs from now on."""

        def take(db: sqlite3.Connection) -> None:
            self._state.store(RunState).take_lease()
            # A verdict of an earlier run says nothing about this gateway, which has checked nothing yet.
            self._state.store(ExportRules).clear_unhealthy_endpoints()

        await self._state.run(take)
        self._recorded_listeners = None
        await self._record_listeners()

    async def release_lease(self) -> None:
        await self._state.using(RunState, RunState.release_lease)

    def listeners_applied(self) -> None:
        """A config was applied: record the listeners soon (never awaits)."""
        self._listeners_applied.set()

    async def renew_lease(self) -> None:
        while True:
            await asyncio.sleep(LEASE_RENEW_SECONDS)
            await self._state.using(RunState, RunState.renew_lease)

    async def keep_listeners_recorded(self) -> None:
        while True:
            await self._listeners_applied.wait()
            self._listeners_applied.clear()
            await self._record_listeners()

    async def _record_listeners(self) -> None:
        """Keep where each listener serves for the CLI, when it changed (most applies change no listener)."""
        addresses = self._addresses()
        if addresses == self._recorded_listeners:
            return
        await self._state.using(RunState, lambda runstate: runstate.record_listeners(addresses))
        self._recorded_listeners = addresses
