"""Peer imports: what peers sent this zone, kept in ``state.db`` and served all or nothing.

A peer's snapshot is stored, then applied; if the data plane rejects it, or
applying fails, the peer's previous imports are put back and served (an
unreadable stored snapshot, withheld already, is not put back). The
imports of peerings deleted while no controller ran are withdrawn at start.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from meshfed.catalog import LocalImport
from meshfed.database import Database
from meshfed.errors import PeerInputError
from meshfed.federation.exchange import ServiceSnapshot
from meshfed.federation.imports import EGRESS_PREFIX, ImportedService, ImportStore, egress_listener_name
from meshfed.federation.peering_state import PeerState
from meshfed.federation.peering_store import PeeringStore
from meshfed.zone import Zone

from .gateway_driver import GatewayDriver

# The controller's parts log as the controller: operators (and tests) follow one logger.
log = logging.getLogger("meshfed.controller")


class PeerImports:
    """The imports of every peer: stored, withdrawn, and which of them the gateway serves."""

    def __init__(
        self,
        zone: Zone,
        state: Database,
        driver: GatewayDriver,
        *,
        reconfigure: Callable[[], Awaitable[None]],
    ) -> None:
        self._zone = zone
        self._state = state
        self._driver = driver
        self._reconfigure = reconfigure

    async def put(self, peer: str, snapshot: ServiceSnapshot) -> None:
        """A peer sent its exports: keep them and serve them (all or nothing; see the module docstring).

        Raises PeerInputError (a refusal the peer is told of) if the data plane rejects them.
        """
        held = self._driver.stored_import(peer)

        def put(imports: ImportStore) -> tuple[ServiceSnapshot | None, bool]:
            # What to put back if the update is refused: the snapshot the driver holds when it is the one
            # stored (it is, but after a write of another process); else read (None if unreadable).
            stored = imports.head(peer)
            if held is not None and stored == (held.epoch, held.version):
                return held, imports.put(peer, snapshot)
            return imports.snapshot(peer), imports.put(peer, snapshot)

        # Only the services that changed are encoded and written (federation/service_rows.py).
        previous, stored = await self._state.using(ImportStore, put)
        if not stored:
            return
        self._driver.stored(peer, snapshot)
        try:
            await self._reconfigure()
            rejected = self._driver.import_problems.get(peer) if peer in self._driver.rejected else None
        except BaseException:
            # Put back unless the gateway serves them already: a cancel (the zone stopping) may land
            # after the apply, and the store must keep what the gateway serves.
            if self._driver.applied_exports.import_heads.get(peer) != (snapshot.epoch, snapshot.version):
                await self._restore(peer, previous)
            raise
        if rejected is not None:
            await self._restore(peer, previous)
            await self._reconfigure()
            raise PeerInputError(rejected)

    async def _restore(self, peer: str, previous: ServiceSnapshot | None) -> None:
        await self._state.using(ImportStore, lambda imports: imports.restore(peer, previous))

    async def forget(self, peer: str) -> None:
        """A peering was deleted: drop its imports and their egress listeners."""
        removed = await self._state.using(ImportStore, lambda imports: imports.remove(peer))
        if removed:
            await self._reconfigure()

    def withdraw_deleted_peers(self) -> None:
        """Drop the imports of peerings deleted (or gone) while no controller ran (blocking: call it in a thread)."""
        with PeeringStore.of(self._zone) as peerings, ImportStore(self._zone.directory) as imports:
            live = {
                p.name for p in peerings.peerings() if not p.delete_requested and p.state is not PeerState.TERMINATED
            }
            stored, unreadable = imports.read()
            for peer in sorted((stored.keys() | unreadable.keys()) - live):
                log.info("zone %s: withdrawing the imports of deleted peering %s", self._zone.name, peer)
                imports.remove(peer)

    def served(self) -> list[ImportedService]:
        """The imported services the gateway serves: neither withheld nor rejected by the data plane.

        Those of the config the gateway runs (kept with it: a zone with thousands of imports must
        not read and parse them all again for each question).
        """
        return list(self._driver.applied_exports.imports)

    def local(self, bound: dict[str, tuple[str, int]]) -> list[LocalImport]:
        """The imports as local clients reach them, given where each egress listener is reached (``bound``)."""
        if not any(name.startswith(EGRESS_PREFIX) for name in bound):
            return []  # no listener per import (one CONNECT listener): nothing to publish, no pass over 10,000
        by_import: dict[tuple[str, str, str], dict[str, tuple[str, int]]] = {}
        for imported in self._driver.applied_exports.imports:
            for port_name in imported.service.ports:
                address = bound.get(egress_listener_name(imported, port_name))
                if address is not None:
                    key = (imported.peer, imported.service.namespace, imported.service.name)
                    by_import.setdefault(key, {})[port_name] = address
        return [
            LocalImport(peer=peer, namespace=namespace, service=service, ports=ports)
            for (peer, namespace, service), ports in sorted(by_import.items())
        ]
