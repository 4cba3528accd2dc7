"""The catalog watch: the zone's catalog and export rules as last seen, and catalog continuity.

The catalog source wakes the watch on catalog changes; export and
authorization rules are read again (two integers) only when the change feed of
``state.db`` says the file changed, which catches writes of other processes
within a fraction of a second. ``zone.toml`` is checked on the same beat.

Catalog continuity: a zone that starts with an empty catalog although it
exported services before keeps telling its peers what they last heard (the
hold), until the catalog has services again or an operator confirms.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable

from meshfed.catalog import CatalogSnapshot, CatalogSource
from meshfed.database import Database
from meshfed.errors import MeshfedError
from meshfed.federation.authz import AuthzRules
from meshfed.federation.exchange import ServiceSnapshot
from meshfed.federation.exports import ExportRules
from meshfed.federation.peering_store import PeeringStore
from meshfed.zone import Zone

from .retry import retrying

# The controller's parts log as the controller: operators (and tests) follow one logger.
log = logging.getLogger("meshfed.controller")

CATALOG_POLL_SECONDS = 0.2
CATALOG_RETRY_SECONDS = 2.0


class CatalogWatch:
    """The catalog as last seen, what peers are held to while it is unexpectedly empty, and the loop following both.

    ``check_zone_toml`` runs on every wake-up; ``exports_changed`` applies a
    catalog or rules change (retried until it succeeds); ``notify_peers`` tells
    the peers to ask again (the hold was released).
    """

    def __init__(
        self,
        zone: Zone,
        state: Database,
        catalog: CatalogSource,
        *,
        kind: str,
        check_zone_toml: Callable[[], Awaitable[object]],
        exports_changed: Callable[[], Awaitable[None]],
        notify_peers: Callable[[], None],
    ) -> None:
        self._zone = zone
        self._state = state
        self._catalog = catalog
        self._kind = kind
        self._check_zone_toml = check_zone_toml
        self._exports_changed = exports_changed
        self._notify_peers = notify_peers
        self._snapshot = CatalogSnapshot(version=0, services=[])
        # While the catalog is unexpectedly empty: what each peer was last told, kept as it is.
        self._hold: dict[str, ServiceSnapshot] | None = None

    @property
    def snapshot(self) -> CatalogSnapshot:
        """The catalog as the controller last saw it."""
        return self._snapshot

    @property
    def held(self) -> bool:
        return self._hold is not None

    def held_for(self, peer: str) -> ServiceSnapshot | None:
        """What ``peer`` is held to while the catalog is unexpectedly empty, if it is."""
        return self._hold.get(peer) if self._hold is not None else None

    async def load(self, *, allow_empty: bool) -> None:
        """Read the catalog (at start); hold the exports if it is empty but was not (unless ``allow_empty``)."""
        self._snapshot = await self._catalog.snapshot()
        if not self._snapshot.services and not allow_empty:
            await self._hold_exports_if_catalog_lost()

    async def _hold_exports_if_catalog_lost(self) -> None:
        held = await asyncio.to_thread(self._last_sent_exports)
        if not held:
            return
        self._hold = held
        count = max(len(snapshot.services) for snapshot in held.values())
        log.warning(
            "zone %s: the %s catalog is empty, but this zone exported %d service(s) before; its peers keep what "
            "they last heard until the catalog has services again or an operator confirms "
            "(POST /v1/catalog/confirm-empty, or 'meshfed up --allow-empty-catalog'). Check the catalog's "
            "location (catalog.db in the zone directory, the Consul address, the Kubernetes namespaces).",
            self._zone.name,
            self._kind,
            count,
        )

    def _last_sent_exports(self) -> dict[str, ServiceSnapshot]:
        with PeeringStore.of(self._zone) as peerings:
            return {
                p.name: p.sent_snapshot
                for p in (peerings.get(light.name, snapshots=True) for light in peerings.peerings())
                if p is not None and p.sent_snapshot is not None and p.sent_snapshot.services
            }

    def release(self, why: str) -> bool:
        """Peers follow the catalog again (they are told to ask). False if nothing was held."""
        if self._hold is None:
            return False
        self._hold = None
        log.warning("zone %s: exports to peers follow the catalog again: %s", self._zone.name, why)
        self._notify_peers()
        return True

    async def watch(self) -> None:
        """Follow the catalog, the export and authorization rules, and ``zone.toml``, forever."""

        def rules_version(db: sqlite3.Connection) -> tuple[int, int]:
            return self._state.store(ExportRules).version(), self._state.store(AuthzRules).version()

        seen_state = self._state.version
        seen_rules = await self._state.run(rules_version)
        while True:
            since = self._snapshot.version
            asked = asyncio.get_running_loop().time()
            try:
                snapshot = await self._catalog.watch(since, CATALOG_POLL_SECONDS)
            except MeshfedError as err:
                log.error("zone %s: catalog watch failed, retrying: %s", self._zone.name, err)
                await asyncio.sleep(CATALOG_RETRY_SECONDS)
                continue
            await self._check_zone_toml()
            state = await self._state.changed(seen_state, 0)
            current = seen_rules if state == seen_state else await self._state.run(rules_version)
            seen_state = state
            if snapshot.version != since or current != seen_rules:
                self._snapshot, seen_rules = snapshot, current
                if snapshot.services:
                    self.release("the catalog has services again")
                await retrying(self._zone.name, "applying a catalog or export change", self._exports_changed)
            else:
                # A source whose watch answers at once must not spin; one that waited (the embedded
                # catalog's change feed, Consul's blocking query) is asked again at once, or a change
                # landing now would wait a whole extra poll.
                waited = asyncio.get_running_loop().time() - asked
                await asyncio.sleep(max(CATALOG_POLL_SECONDS - waited, 0.0))
