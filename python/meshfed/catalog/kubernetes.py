"""The Kubernetes catalog source (kubernetes_asyncio, the maintained asyncio client).

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
slice endpoint's ``zone``, else its single ``hints.forZones`` entry.

Imports are materialized the way Linkerd mirrors services: a selector-less
Service ``<service>-<peer>`` (in ``mirror_namespace``, or else the import's own
namespace) plus an EndpointSlice of the same name pointing at the gateway's
egress listener, both labelled ``meshfed.io/mirror=true`` and
``meshfed.io/owner=<zone>``. Listing skips mirrors; publishing replaces what
changed and deletes stale mirrors of this zone — and touches nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.config.config_exception import ConfigException
from pydantic import ValidationError

from meshfed.aio import cancel_and_wait
from meshfed.catalog.model import CatalogSnapshot, Endpoint, LocalImport, Locality, Service
from meshfed.catalog.remote import Backoff, SnapshotCache
from meshfed.catalog.settings import KubernetesSettings
from meshfed.errors import CatalogError

log = logging.getLogger(__name__)

MIRROR_LABEL = "meshfed.io/mirror"
OWNER_LABEL = "meshfed.io/owner"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "meshfed.io/controller"
DEFAULT_PORT_NAME = "default"

Document = dict[str, Any]


class _ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason


class _GoneError(Exception):
    """The resource version was compacted away: list again."""


@dataclass
class _Reflector:
    """One kind in one namespace: the objects by name and the version they are current at."""

    kind: str
    namespace: str
    objects: dict[str, Document] = field(default_factory=dict)
    resource_version: str | None = None
    listed: bool = False


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
        self._settings = settings
        self._zone = zone
        self._watch_timeout = watch_timeout
        self._initial_sync_timeout = initial_sync_timeout
        self._backoff = backoff
        self._cache = SnapshotCache("the Kubernetes API")
        self._api: client.ApiClient | None = None
        self._connecting: asyncio.Lock | None = None
        self._reflectors = [
            _Reflector(kind, namespace) for namespace in settings.namespaces for kind in ("services", "endpointslices")
        ]
        self._tasks: list[asyncio.Task[None]] = []
        self._skipped: set[str] = set()
        self.server = "(not connected)"

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
        """Mirror exactly ``imports`` as Services + EndpointSlices; delete this zone's stale mirrors."""
        await self._start()
        selector = f"{MIRROR_LABEL}=true,{OWNER_LABEL}={self._zone}"
        try:
            for kind in ("services", "endpointslices"):
                desired = {
                    (doc["metadata"]["namespace"], doc["metadata"]["name"]): doc for doc in self._mirrors(imports, kind)
                }
                existing = {
                    (doc["metadata"]["namespace"], doc["metadata"]["name"]): doc
                    for doc in (await self._request(self._list_call(kind, None, label_selector=selector))).get("items")
                    or []
                }
                for (namespace, name), document in desired.items():
                    current = existing.get((namespace, name))
                    if current is None:
                        await self._request(self._create_call(kind, namespace, document))
                    elif not _same_mirror(current, document, kind):
                        document["metadata"]["resourceVersion"] = current["metadata"].get("resourceVersion")
                        await self._request(self._replace_call(kind, namespace, name, document))
                for namespace, name in existing.keys() - desired.keys():
                    with contextlib.suppress(_NotFoundError):
                        await self._request(self._delete_call(kind, namespace, name))
        except (_ApiError, aiohttp.ClientError, TimeoutError, ValueError) as err:
            raise CatalogError(f"cannot mirror imports: {self._describe(err)}") from None

    async def aclose(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks = []
        if self._api is not None:
            await self._api.close()
            self._api = None

    @property
    def last_error(self) -> str | None:
        """What the last failed list or watch said, or None while the API answers."""
        return self._cache.last_error

    @property
    def recent_errors(self) -> list[str]:
        """The last few distinct failures, oldest first, including ones that have since healed."""
        return list(self._cache.recent_errors)

    # -- connecting -------------------------------------------------------------------------------------

    async def _start(self) -> client.ApiClient:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._api is None:
                self._api = await self._connect()
                for reflector in self._reflectors:
                    name = f"meshfed-k8s-{reflector.kind}-{reflector.namespace}"
                    self._tasks.append(asyncio.create_task(self._reflect(reflector), name=name))
        return self._api

    async def _connect(self) -> client.ApiClient:
        configuration = client.Configuration()
        settings = self._settings
        try:
            if settings.kubeconfig is not None:
                await config.load_kube_config(
                    config_file=settings.kubeconfig,
                    context=settings.context,
                    client_configuration=configuration,
                    persist_config=False,
                )
            else:
                config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except (ConfigException, OSError, ValueError, KeyError, TypeError) as err:
            where = settings.kubeconfig or "the in-cluster service account"
            raise CatalogError(
                f"cannot load Kubernetes credentials from {where}: {err} — set [kubernetes] kubeconfig in zone.toml "
                "when meshfed runs outside the cluster"
            ) from None
        self.server = configuration.host or "(no server in the configuration)"
        return client.ApiClient(configuration)

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
            except _GoneError:
                log.info(
                    "Kubernetes %s in %s: resource version %s expired; listing again",
                    reflector.kind,
                    reflector.namespace,
                    reflector.resource_version,
                )
            except (_ApiError, aiohttp.ClientError, TimeoutError, ValueError, CatalogError) as err:
                self._cache.failed(self._describe(err))
                await backoff.sleep()

    async def _list(self, reflector: _Reflector) -> None:
        document = await self._request(self._list_call(reflector.kind, reflector.namespace))
        items = document.get("items")
        version = (document.get("metadata") or {}).get("resourceVersion")
        if not isinstance(items, list) or not version:
            raise CatalogError(
                f"the Kubernetes API at {self.server} answered the {reflector.kind} list in {reflector.namespace} "
                "without items or metadata.resourceVersion — is that a Kubernetes API server?"
            )
        reflector.objects = {_name(item): item for item in items}
        reflector.resource_version = str(version)
        reflector.listed = True
        self._publish()

    async def _watch_once(self, reflector: _Reflector) -> None:
        """Follow one watch stream until the server ends it; raise :class:`_GoneError` on 410."""
        call = self._list_call(
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
                raise _GoneError
            if not 200 <= response.status < 300:
                raise _api_error(response.status, await response.read())
            while line := await response.content.readline():
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                    kind, item = event["type"], event["object"]
                except (ValueError, KeyError, TypeError):
                    raise CatalogError(
                        f"the Kubernetes API at {self.server} sent a watch event that is not JSON: {line[:200]!r}"
                    ) from None
                if kind == "ERROR":
                    if item.get("code") == 410:
                        raise _GoneError
                    raise _ApiError(int(item.get("code") or 500), str(item.get("reason")), str(item.get("message")))
                version = (item.get("metadata") or {}).get("resourceVersion")
                if kind in ("ADDED", "MODIFIED"):
                    reflector.objects[_name(item)] = item
                elif kind == "DELETED":
                    reflector.objects.pop(_name(item), None)
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
                        service = self._to_service(item, by_service.get(_name(item), []))
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
            reason = str(reason.errors()[0]["msg"]).removeprefix("Value error, ")
        if what not in self._skipped:
            self._skipped.add(what)
            log.warning("Kubernetes: skipping %s, which meshfed cannot represent: %s", what, reason)

    def _mirrors(self, imports: list[LocalImport], kind: str) -> list[Document]:
        documents: list[Document] = []
        for item in imports:
            name = f"{item.service}-{item.peer}"
            namespace = self._settings.mirror_namespace or item.namespace
            labels = {
                MIRROR_LABEL: "true",
                OWNER_LABEL: self._zone,
                "meshfed.io/peer": item.peer,
                "meshfed.io/service": item.service,
                "meshfed.io/namespace": item.namespace,
            }
            annotations = {"meshfed.io/import": item.name}
            ports = sorted(item.ports.items())
            if kind == "services":
                documents.append(
                    {
                        "apiVersion": "v1",
                        "kind": "Service",
                        "metadata": {
                            "name": name,
                            "namespace": namespace,
                            "labels": labels,
                            "annotations": annotations,
                        },
                        "spec": {
                            "type": "ClusterIP",
                            "ports": [
                                {"name": port_name, "port": port, "targetPort": port, "protocol": "TCP"}
                                for port_name, (_, port) in ports
                            ],
                        },
                    }
                )
            else:
                # Every egress listener of a zone binds the same egress host, so one endpoint carries all ports.
                host = ports[0][1][0]
                family = "IPv6" if ipaddress.ip_address(host).version == 6 else "IPv4"
                documents.append(
                    {
                        "apiVersion": "discovery.k8s.io/v1",
                        "kind": "EndpointSlice",
                        "metadata": {
                            "name": name,
                            "namespace": namespace,
                            "labels": {**labels, SERVICE_NAME_LABEL: name, MANAGED_BY_LABEL: MANAGED_BY},
                            "annotations": annotations,
                        },
                        "addressType": family,
                        "endpoints": [{"addresses": [host], "conditions": {"ready": True}}],
                        "ports": [
                            {"name": port_name, "port": port, "protocol": "TCP"} for port_name, (_, port) in ports
                        ],
                    }
                )
        return documents

    # -- HTTP through the generated client ---------------------------------------------------------------

    def _core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self._api)

    def _discovery(self) -> client.DiscoveryV1Api:
        return client.DiscoveryV1Api(self._api)

    def _list_call(self, kind: str, namespace: str | None, **kwargs: Any) -> Callable[[], Awaitable[Any]]:
        kwargs["_preload_content"] = False
        core, discovery = self._core(), self._discovery()
        if kind == "services":
            if namespace is None:
                return lambda: core.list_service_for_all_namespaces(**kwargs)
            return lambda: core.list_namespaced_service(namespace, **kwargs)
        if namespace is None:
            return lambda: discovery.list_endpoint_slice_for_all_namespaces(**kwargs)
        return lambda: discovery.list_namespaced_endpoint_slice(namespace, **kwargs)

    def _create_call(self, kind: str, namespace: str, body: Document) -> Callable[[], Awaitable[Any]]:
        if kind == "services":
            return lambda: self._core().create_namespaced_service(namespace, cast(Any, body), _preload_content=False)
        return lambda: self._discovery().create_namespaced_endpoint_slice(
            namespace, cast(Any, body), _preload_content=False
        )

    def _replace_call(self, kind: str, namespace: str, name: str, body: Document) -> Callable[[], Awaitable[Any]]:
        if kind == "services":
            return lambda: self._core().replace_namespaced_service(
                name, namespace, cast(Any, body), _preload_content=False
            )
        return lambda: self._discovery().replace_namespaced_endpoint_slice(
            name, namespace, cast(Any, body), _preload_content=False
        )

    def _delete_call(self, kind: str, namespace: str, name: str) -> Callable[[], Awaitable[Any]]:
        if kind == "services":
            return lambda: self._core().delete_namespaced_service(name, namespace, _preload_content=False)
        return lambda: self._discovery().delete_namespaced_endpoint_slice(name, namespace, _preload_content=False)

    async def _request(self, call: Callable[[], Awaitable[Any]]) -> Document:
        response = await call()
        try:
            body = await response.read()
            if response.status == 404:
                raise _NotFoundError(404, "NotFound", body.decode(errors="replace")[:200])
            if response.status == 410:
                raise _GoneError
            if not 200 <= response.status < 300:
                raise _api_error(response.status, body)
            try:
                document = json.loads(body)
            except ValueError:
                raise CatalogError(
                    f"the Kubernetes API at {self.server} sent a response that is not JSON: {body[:200]!r}"
                ) from None
            if not isinstance(document, dict):
                raise CatalogError(f"the Kubernetes API at {self.server} sent {type(document).__name__}, not an object")
            return document
        finally:
            response.release()

    def _describe(self, err: BaseException) -> str:
        where = f"the Kubernetes API at {self.server}"
        if isinstance(err, CatalogError):
            return str(err)
        if isinstance(err, aiohttp.ClientConnectorError):
            return f"{where} refused the connection ({err.os_error}) — is the kubeconfig's server right?"
        if isinstance(err, _ApiError) and err.status in (401, 403):
            return (
                f"{where} refused access ({err}) — does the service account have the RBAC the meshfed chart grants "
                "(get/list/watch Services and EndpointSlices; create/update/delete them for mirrors)?"
            )
        if isinstance(err, TimeoutError):
            return f"{where} did not answer in time"
        return f"{where}: {err}"


class _NotFoundError(_ApiError):
    pass


def _api_error(status: int, body: bytes) -> _ApiError:
    # The API answers errors with a Status object: its reason and message say what was wrong.
    try:
        document = json.loads(body)
        return _ApiError(status, str(document.get("reason", "")), str(document.get("message", "")))
    except (ValueError, AttributeError):
        return _ApiError(status, "", body.decode(errors="replace")[:200])


def _name(item: Document) -> str:
    return str(item["metadata"]["name"])


def _same_mirror(current: Document, desired: Document, kind: str) -> bool:
    metadata, wanted = current.get("metadata") or {}, desired["metadata"]
    if (metadata.get("labels") or {}) != wanted["labels"]:
        return False
    if kind == "services":
        ports = [
            {key: port.get(key) for key in ("name", "port", "targetPort", "protocol")}
            for port in (current.get("spec") or {}).get("ports") or []
        ]
        return bool(ports == desired["spec"]["ports"])
    return all(current.get(key) == desired[key] for key in ("addressType", "endpoints", "ports"))


__all__ = ["MIRROR_LABEL", "OWNER_LABEL", "KubernetesCatalog"]
