"""Local health: the gateway's verdict on this zone's endpoints, and telling peers when it changes.

The gateway health-checks local endpoints (TCP connects); this reads its
verdict twice a second, and when it changes what peers should hear (an
exported service lost or regained its last live endpoint, or one of several),
keeps it in ``state.db`` under a new health version and tells the peers,
without touching the data plane.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence

from meshfed.database import Database
from meshfed.federation.exports import ExportRules, UnhealthyEndpoints
from meshfed.federation.gateway_config import local_cluster_name
from meshfed.zone import Zone

from .gateway_driver import GatewayDriver

# The controller's parts log as the controller: operators (and tests) follow one logger.
log = logging.getLogger("meshfed.controller")

# How often the gateway's verdict on local endpoints is read; peers hear of a change at once.
LOCAL_HEALTH_POLL_SECONDS = 0.5
# Endpoints named in one health log line; the rest are counted.
_NAMED_IN_LOG = 10


class LocalHealth:
    """The local endpoints the gateway finds failing, and the health version peers are told with them."""

    def __init__(self, zone: Zone, state: Database, driver: GatewayDriver, *, on_change: Callable[[], None]) -> None:
        self._zone = zone
        self._state = state
        self._driver = driver
        self._on_change = on_change
        self._unhealthy: UnhealthyEndpoints = frozenset()
        self._version = 0

    @property
    def unhealthy(self) -> UnhealthyEndpoints:
        """Local endpoints the gateway's health checks find failing, whatever the catalog says."""
        return self._unhealthy

    @property
    def version(self) -> int:
        return self._version

    async def load(self) -> None:
        """Read the stored health version (at start: peers must see it go on, not start over)."""
        self._version = await self._state.using(ExportRules, ExportRules.health_version)

    async def watch(self) -> None:
        """Follow the gateway's verdict, forever."""
        while True:
            await asyncio.sleep(LOCAL_HEALTH_POLL_SECONDS)
            unhealthy = self._unhealthy_local_endpoints()
            if unhealthy == self._unhealthy:
                continue
            version = await self._state.using(
                ExportRules, functools.partial(ExportRules.bump_health_version, unhealthy=unhealthy)
            )
            self._log_change(self._unhealthy, unhealthy)
            self._unhealthy, self._version = unhealthy, version
            self._on_change()

    def _log_change(self, before: UnhealthyEndpoints, after: UnhealthyEndpoints) -> None:
        failing, recovered = sorted(after - before), sorted(before - after)
        if failing:
            log.warning(
                "zone %s: %s failing the gateway's health checks (TCP connects from this zone's gateway); peers now "
                "count them unhealthy. Is each backend running and listening on that address?",
                self._zone.name,
                _endpoint_list(failing),
            )
        if recovered:
            log.info("zone %s: %s passing health checks again", self._zone.name, _endpoint_list(recovered))

    def _unhealthy_local_endpoints(self) -> UnhealthyEndpoints:
        if not self._driver.running:
            return self._unhealthy
        down = self._driver.gateway.unhealthy_endpoints()
        if not down:
            return frozenset()  # the common case: no need to index thousands of services
        catalog = self._driver.applied_exports.catalog
        services = {local_cluster_name(service): service.key for service in catalog.services}
        return frozenset(
            (*services[name], address) for name, addresses in down.items() if name in services for address in addresses
        )


def _endpoint_list(endpoints: Sequence[tuple[str, str, str]]) -> str:
    shown = endpoints[:_NAMED_IN_LOG]
    named = ", ".join(f"{address} of {service}.{namespace}" for namespace, service, address in shown)
    more = len(endpoints) - _NAMED_IN_LOG
    noun = "endpoint" if len(endpoints) == 1 else "endpoints"
    return f"{noun} {named}" + (f" and {more} more" if more > 0 else "")
