"""The Consul catalog source (the HTTP API, through py-consul's asyncio client).

:class:`ConsulCatalog` is the :class:`~meshfed.catalog.source.CatalogSource`
for ``catalog = "consul"``; it puts together the parts, each a module of its own:

* :mod:`meshfed.catalog.consul_watch` reads the datacenter's services with
  blocking queries (list, follow the index, start over when it goes back) and
  maps them to meshfed's :class:`Service`;
* :mod:`meshfed.catalog.consul_imports` registers the zone's imports on the
  synthetic node ``meshfed-<zone>`` and deregisters stale ones;
* :mod:`meshfed.catalog.consul_api` is the HTTP underneath both (py-consul's
  client, the token in a header only) and what each failure means: the ACL
  rule to add, from ``helm/meshfed/examples/consul-acl-policy.hcl``.
"""

from __future__ import annotations

from meshfed.catalog.consul_api import ConsulApi
from meshfed.catalog.consul_imports import register_imports, registrations
from meshfed.catalog.consul_watch import ConsulWatch
from meshfed.catalog.model import CatalogSnapshot, LocalImport
from meshfed.catalog.remote import SnapshotCache
from meshfed.catalog.settings import ConsulSettings


class ConsulCatalog:
    """A zone's services from a Consul datacenter, and its imports registered back into it."""

    def __init__(
        self,
        settings: ConsulSettings,
        *,
        zone: str,
        blocking_wait: float = 30.0,
        initial_sync_timeout: float = 15.0,
        backoff: tuple[float, float] = (0.05, 10.0),
    ) -> None:
        self._zone = zone
        self._initial_sync_timeout = initial_sync_timeout
        self.address = settings.address
        self.node = f"meshfed-{zone}"
        self._api = ConsulApi(settings, node=self.node, blocking_wait=blocking_wait)
        self._cache = SnapshotCache(f"Consul at {self.address}")
        self._watch = ConsulWatch(self._api, self._cache, zone=zone, backoff=backoff)

    # -- the CatalogSource interface -------------------------------------------------------------------

    async def snapshot(self) -> CatalogSnapshot:
        self._start()
        return await self._cache.first(self._initial_sync_timeout)

    async def watch(self, since: int, timeout: float) -> CatalogSnapshot:
        self._start()
        return await self._cache.newer(since, timeout)

    async def publish_imports(self, imports: list[LocalImport]) -> None:
        """Register exactly ``imports`` on node ``meshfed-<zone>``; deregister what meshfed registered before."""
        desired = registrations(self._zone, imports)
        self._start()  # as every use of the API: the queries run from the first one on
        await register_imports(self._api, desired)

    async def aclose(self) -> None:
        await self._watch.aclose()
        await self._api.aclose()

    @property
    def last_error(self) -> str | None:
        """What the last failed query said, or None while Consul answers."""
        return self._cache.last_error

    @property
    def recent_errors(self) -> list[str]:
        """The last few distinct failures, oldest first, including ones that have since healed."""
        return list(self._cache.recent_errors)

    def _start(self) -> None:
        self._api.client()
        self._watch.start()


__all__ = ["ConsulCatalog"]
