"""The Kubernetes catalog source (kubernetes_asyncio, the maintained asyncio client).

:class:`KubernetesCatalog` is the :class:`~meshfed.catalog.source.CatalogSource`
for ``catalog = "kubernetes"``; it puts together the parts, each a module of its own:

* :mod:`meshfed.catalog.kubernetes_watch` lists and watches Services and
  EndpointSlices in each watched namespace (client-go's reflector: list, watch
  from the version, list again on ``410 Gone``) and maps them to meshfed's
  :class:`Service`, skipping mirrors;
* :mod:`meshfed.catalog.kubernetes_mirrors` mirrors the zone's imports as a
  Service plus an EndpointSlice each, named by :func:`mirror_name`, and
  deletes the zone's stale mirrors;
* :mod:`meshfed.catalog.kubernetes_api` is the API underneath both
  (credentials, requests through the generated client) and what each failure
  means: which RBAC permission is missing, and where.
"""

from __future__ import annotations

import asyncio

from meshfed.catalog.kubernetes_api import KubernetesApi
from meshfed.catalog.kubernetes_mirrors import KubernetesMirrors
from meshfed.catalog.kubernetes_watch import KubernetesWatch
from meshfed.catalog.model import CatalogSnapshot, LocalImport
from meshfed.catalog.remote import SnapshotCache
from meshfed.catalog.settings import KubernetesSettings
from meshfed.errors import CatalogError


class KubernetesCatalog:
    """A zone's services from the Kubernetes API, and its imports mirrored back as Services."""

    def __init__(
        self,
        settings: KubernetesSettings,
        *,
        zone: str,
        watch_timeout: int = 60,
        initial_sync_timeout: float = 15.0,
        backoff: tuple[float, float] = (0.05, 10.0),
    ) -> None:
        self._initial_sync_timeout = initial_sync_timeout
        self._cache = SnapshotCache("the Kubernetes API")
        self._api = KubernetesApi(settings)
        self._connecting: asyncio.Lock | None = None
        self._watch = KubernetesWatch(self._api, self._cache, settings, watch_timeout=watch_timeout, backoff=backoff)
        self._mirrors = KubernetesMirrors(self._api, settings, zone=zone)

    @property
    def server(self) -> str:
        """The API server's URL, once connected."""
        return self._api.server

    # -- the CatalogSource interface -------------------------------------------------------------------

    async def snapshot(self) -> CatalogSnapshot:
        try:
            await self._start()
        except CatalogError as err:
            self._cache.failed(str(err))
            raise
        return await self._cache.first(self._initial_sync_timeout)

    async def watch(self, since: int, timeout: float) -> CatalogSnapshot:
        await self._start()
        return await self._cache.newer(since, timeout)

    async def publish_imports(self, imports: list[LocalImport]) -> None:
        """Mirror exactly ``imports`` as Services + EndpointSlices; delete this zone's stale mirrors.

        Called again with the same imports, it recreates mirrors deleted out of band and rewrites
        changed ones. Raises :class:`CatalogError` naming every import that could not be mirrored,
        after doing all the others.
        """
        self._mirrors.check(imports)
        await self._start()
        await self._mirrors.publish(imports)

    async def aclose(self) -> None:
        await self._watch.aclose()
        await self._api.aclose()

    @property
    def last_error(self) -> str | None:
        """What the last failed list or watch said, or None while the API answers."""
        return self._cache.last_error

    @property
    def recent_errors(self) -> list[str]:
        """The last few distinct failures, oldest first, including ones that have since healed."""
        return list(self._cache.recent_errors)

    async def _start(self) -> None:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if not self._api.connected:
                await self._api.connect()
                self._watch.start()


__all__ = ["KubernetesCatalog"]
