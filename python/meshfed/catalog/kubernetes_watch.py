"""Reading a cluster's services: list-then-watch of Services and EndpointSlices, mapped to meshfed's.

Listing is list-then-watch, per watched namespace, for Services and
``discovery.k8s.io/v1`` EndpointSlices, as client-go's reflector does:

* list, remember the list's ``resourceVersion``, then watch from it with
  ``allowWatchBookmarks`` (bookmarks move the version on without objects);
* a watch that ends (``timeoutSeconds``) resumes from the last version seen;
* ``410 Gone`` (the version was compacted away — as an ``ERROR`` event or as
  the response status) means events were lost: list again from scratch;
* other errors back off exponentially and list again; the last good snapshot
  keeps serving meanwhile.

Mapping: a Service (not ExternalName, with TCP ports) is a meshfed
:class:`Service` with its ports by name (an unnamed single port is named
``default``). Its endpoints are the addresses of EndpointSlices labelled
``kubernetes.io/service-name=<name>``, on the target port of the Service's
first port (by name); an endpoint is healthy when ``conditions.ready`` is true
or unset (the API's documented reading of unset); its locality zone is the
slice endpoint's ``zone``, else its single ``hints.forZones`` entry. Mirrors
of imports (``meshfed.io/mirror=true``) are skipped.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

import aiohttp
from pydantic import ValidationError

from meshfed.aio import cancel_and_wait
from meshfed.catalog.kubernetes_api import (
    SERVICE_NAME_LABEL,
    ApiError,
    Document,
    GoneError,
    KubernetesApi,
    api_error,
    object_name,
)
from meshfed.catalog.kubernetes_mirrors import MIRROR_LABEL
from meshfed.catalog.model import Endpoint, Locality, Service
from meshfed.catalog.remote import Backoff, SnapshotCache
from meshfed.catalog.settings import KubernetesSettings
from meshfed.errors import CatalogError
from meshfed.validation import describe_validation_error

# The Kubernetes catalog's one logger, named for meshfed.catalog.kubernetes as before the split into modules.
log = logging.getLogger("meshfed.catalog.kubernetes")

DEFAULT_PORT_NAME = "default"


@dataclass
class _Reflector:
    """One kind in one namespace: the objects by name and the version they are current at."""

    kind: str
    namespace: str
    objects: dict[str, Document] = field(default_factory=dict)
    resource_version: str | None = None
    listed: bool = False


class KubernetesWatch:
    """The reflectors of one Kubernetes catalog, publishing every complete view into ``cache``."""

    def __init__(
        self,
        api: KubernetesApi,
        cache: SnapshotCache,
        settings: KubernetesSettings,
        *,
        watch_timeout: int,
        backoff: tuple[float, float],
    ) -> None:
        self._api = api
        self._cache = cache
        self._settings = settings
        self._watch_timeout = watch_timeout
        self._backoff = backoff
        self._reflectors = [
            _Reflector(kind, namespace) for namespace in settings.namespaces for kind in ("services", "endpointslices")
        ]
        self._tasks: list[asyncio.Task[None]] = []
        self._skipped: set[str] = set()

    def start(self) -> None:
        """Start one list-then-watch task per kind and namespace (once connected)."""
        for reflector in self._reflectors:
            name = f"meshfed-k8s-{reflector.kind}-{reflector.namespace}"
            self._tasks.append(asyncio.create_task(self._reflect(reflector), name=name))

    async def aclose(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks = []

    # -- list + watch -----------------------------------------------------------------------------------

    async def _reflect(self, reflector: _Reflector) -> None:
        backoff = Backoff(*self._backoff)
        while True:
            try:
                await self._list(reflector)
                backoff.reset()
                self._cache.recovered()
                while True:
                    await self._watch_once(reflector)
            except asyncio.CancelledError:
                raise
            except GoneError:
                log.info(
                    "Kubernetes %s in %s: resource version %s expired; listing again",
                    reflector.kind,
                    reflector.namespace,
                    reflector.resource_version,
                )
            except (ApiError, aiohttp.ClientError, TimeoutError, ValueError, CatalogError) as err:
                self._cache.failed(self._api.describe(err))
                await backoff.sleep()

    async def _list(self, reflector: _Reflector) -> None:
        document = await self._api.request(self._api.list_call(reflector.kind, reflector.namespace))
        items = document.get("items")
        version = (document.get("metadata") or {}).get("resourceVersion")
        if not isinstance(items, list) or not version:
            raise CatalogError(
                f"the Kubernetes API at {self._api.server} answered the {reflector.kind} list in "
                f"{reflector.namespace} without items or metadata.resourceVersion — is that a Kubernetes API server?"
            )
        reflector.objects = {object_name(item): item for item in items}
        reflector.resource_version = str(version)
        reflector.listed = True
        self._publish()

    async def _watch_once(self, reflector: _Reflector) -> None:
        """Follow one watch stream until the server ends it; raise :class:`GoneError` on 410."""
        call = self._api.list_call(
            reflector.kind,
            reflector.namespace,
            watch=True,
            resource_version=reflector.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self._watch_timeout,
            _request_timeout=self._watch_timeout + 30,
        )
        response = await call()
        try:
            if response.status == 410:
                raise GoneError
            if not 200 <= response.status < 300:
                raise api_error(response.status, await response.read())
            while line := await response.content.readline():
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                    kind, item = event["type"], event["object"]
                except (ValueError, KeyError, TypeError):
                    raise CatalogError(
                        f"the Kubernetes API at {self._api.server} sent a watch event that is not JSON: {line[:200]!r}"
                    ) from None
                if kind == "ERROR":
                    if item.get("code") == 410:
                        raise GoneError
                    raise ApiError(int(item.get("code") or 500), str(item.get("reason")), str(item.get("message")))
                version = (item.get("metadata") or {}).get("resourceVersion")
                if kind in ("ADDED", "MODIFIED"):
                    reflector.objects[object_name(item)] = item
                elif kind == "DELETED":
                    reflector.objects.pop(object_name(item), None)
                if version:
                    reflector.resource_version = str(version)
                if kind != "BOOKMARK":
                    self._publish()
        finally:
            response.release()

    def _publish(self) -> None:
        # The first snapshot waits for every list, so it is complete.
        if not all(reflector.listed for reflector in self._reflectors):
            return
        services: list[Service] = []
        for namespace in self._settings.namespaces:
            slices = [
                item
                for reflector in self._reflectors
                if reflector.kind == "endpointslices" and reflector.namespace == namespace
                for item in reflector.objects.values()
            ]
            by_service: dict[str, list[Document]] = {}
            for item in slices:
                owner = ((item.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
                if owner:
                    by_service.setdefault(owner, []).append(item)
            for reflector in self._reflectors:
                if reflector.kind == "services" and reflector.namespace == namespace:
                    for item in reflector.objects.values():
                        service = self._to_service(item, by_service.get(object_name(item), []))
                        if service is not None:
                            services.append(service)
        self._cache.update(services)

    # -- mapping ----------------------------------------------------------------------------------------

    def _to_service(self, item: Document, slices: list[Document]) -> Service | None:
        metadata = item.get("metadata") or {}
        labels: dict[str, str] = dict(metadata.get("labels") or {})
        spec = item.get("spec") or {}
        if labels.get(MIRROR_LABEL) == "true" or spec.get("type") == "ExternalName":
            return None  # our own mirrors are never local services; ExternalName has no endpoints
        name, namespace = metadata.get("name", ""), metadata.get("namespace", "")
        try:
            ports = sorted(
                (port for port in spec.get("ports") or [] if port.get("protocol", "TCP") == "TCP"),
                key=lambda port: port.get("name") or "",
            )
            if not ports:
                return None
            first = ports[0].get("name") or ""
            endpoints: dict[str, Endpoint] = {}
            for piece in slices:
                target = next((p.get("port") for p in piece.get("ports") or [] if (p.get("name") or "") == first), None)
                if target is None:
                    continue
                for entry in piece.get("endpoints") or []:
                    for endpoint in self._endpoints(entry, int(target), f"{name}.{namespace}"):
                        # Slices may overlap while they are being rebalanced: a ready copy wins.
                        if endpoint.key not in endpoints or endpoint.healthy:
                            endpoints[endpoint.key] = endpoint
            return Service(
                name=name,
                namespace=namespace,
                ports={port.get("name") or DEFAULT_PORT_NAME: int(port["port"]) for port in ports},
                labels=labels,
                endpoints=sorted(endpoints.values(), key=lambda endpoint: endpoint.key),
            )
        except ValidationError as err:
            self._skip(f"service {name}.{namespace}", err)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            self._skip(f"service {name}.{namespace}", f"malformed object ({err!r})")
        return None

    def _endpoints(self, entry: Document, port: int, owner: str) -> list[Endpoint]:
        conditions = entry.get("conditions") or {}
        ready = conditions.get("ready")
        zone = entry.get("zone") or ""
        if not zone:
            hinted = (entry.get("hints") or {}).get("forZones") or []
            zone = hinted[0].get("name", "") if len(hinted) == 1 else ""
        found = []
        for address in entry.get("addresses") or []:
            try:
                found.append(
                    Endpoint(
                        address=address,
                        port=port,
                        locality=Locality(zone=zone),
                        healthy=True if ready is None else bool(ready),
                    )
                )
            except ValidationError as err:
                self._skip(f"endpoint {address} of {owner}", err)
        return found

    def _skip(self, what: str, reason: ValidationError | str) -> None:
        if isinstance(reason, ValidationError):
            reason = describe_validation_error(reason)
        if what not in self._skipped:
            self._skipped.add(what)
            log.warning("Kubernetes: skipping %s, which meshfed cannot represent: %s", what, reason)


__all__ = ["DEFAULT_PORT_NAME", "KubernetesWatch"]
