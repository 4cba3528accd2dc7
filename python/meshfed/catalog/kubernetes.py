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
Service plus an EndpointSlice of the same name pointing at the gateway's egress
listener, in ``mirror_namespace`` (or else the import's own namespace). Both are
labelled ``meshfed.io/mirror=true``, ``meshfed.io/owner=<zone>`` and
``meshfed.io/service``/``namespace``/``peer``, so a client finds its mirror with
``kubectl get services -l meshfed.io/service=web,meshfed.io/peer=west``.

The mirror's name (:func:`mirror_name`) is ``<service>-<peer>-<digest>``: the
first 52 characters of ``<service>-<peer>`` (an ``x`` in front if that starts
with a digit), a dash, and the first 10 characters of the lowercase base32
SHA-256 of ``<service>.<namespace>.<peer>@<zone>``. The readable part is for
people only; the digest is over the whole identity, written unambiguously (DNS
labels hold no ``.`` or ``@``), so ``web.default.west`` and ``web.shop.west``,
or ``a-b`` from peer ``c`` and ``a`` from peer ``b-c``, or two zones mirroring
into one namespace, never share a name. Every name is a DNS-1035 label of at
most 63 characters, the same on every run.

Publishing is per import and all-or-nothing for each: the Service is created
first (which proves the name is free) and, if its EndpointSlice is then refused,
removed again, so no Service without endpoints is left behind. One import's
failure does not stop the others; every failure is reported in one
:class:`CatalogError`. Objects without this zone's owner label are never
updated or deleted. Each call also recreates mirrors deleted out of band and
deletes this zone's stale ones, found with a label-selected list in the mirror
namespace (across all namespaces only without one, which needs a ClusterRole).
Listing skips mirrors.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import ipaddress
import json
import logging
import re
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
from meshfed.validation import describe_validation_error

log = logging.getLogger(__name__)

MIRROR_LABEL = "meshfed.io/mirror"
OWNER_LABEL = "meshfed.io/owner"
PEER_LABEL = "meshfed.io/peer"
SERVICE_LABEL = "meshfed.io/service"
NAMESPACE_LABEL = "meshfed.io/namespace"
IMPORT_ANNOTATION = "meshfed.io/import"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
# A label value: no "/" (the API server refuses "meshfed.io/controller" with 422 Invalid).
MANAGED_BY = "controller.meshfed.io"
DEFAULT_PORT_NAME = "default"
_KINDS = {"services": "Service", "endpointslices": "EndpointSlice"}
_DIGEST_LENGTH = 10
# "services "x" is forbidden: User "u" cannot create resource "services" in API group "" in the namespace "y"".
_FORBIDDEN = re.compile(
    r'User "(?P<user>[^"]*)" cannot (?P<verb>\S+) resource "(?P<resource>[^"]+)" in API group "(?P<group>[^"]*)"'
    r'(?: in the namespace "(?P<namespace>[^"]+)")?'
)

Document = dict[str, Any]


class _ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


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
        """Mirror exactly ``imports`` as Services + EndpointSlices; delete this zone's stale mirrors.

        Called again with the same imports, it recreates mirrors deleted out of band and rewrites
        changed ones. Raises :class:`CatalogError` naming every import that could not be mirrored,
        after doing all the others.
        """
        for item in imports:
            for host, _ in item.ports.values():
                _check_egress_address(host)
        await self._start()
        desired: dict[tuple[str, str], LocalImport] = {}
        for item in imports:
            desired[(self._settings.mirror_namespace or item.namespace, mirror_name(self._zone, item))] = item
        try:
            owned = {kind: await self._owned_mirrors(kind) for kind in _KINDS}
        except (_ApiError, aiohttp.ClientError, TimeoutError, CatalogError) as err:
            raise CatalogError(f"cannot mirror imports: {self._describe(err)}") from None
        failures: list[str] = []
        for (namespace, name), item in sorted(desired.items()):
            try:
                await self._apply_mirror(item, namespace, name, owned)
            except (_ApiError, aiohttp.ClientError, TimeoutError, CatalogError) as err:
                failures.append(f"{item.name}: {self._describe(err, short=True)}")
        # The Service goes first: an EndpointSlice left alone is inert, a Service without one is a black hole.
        for namespace, name in sorted(owned["services"].keys() - desired.keys()):
            try:
                with contextlib.suppress(_NotFoundError):
                    await self._request(self._delete_call("services", namespace, name))
            except (_ApiError, aiohttp.ClientError, TimeoutError, CatalogError) as err:
                failures.append(f"stale mirror Service {namespace}/{name}: {self._describe(err, short=True)}")
                owned["endpointslices"].pop((namespace, name), None)  # keep its endpoints while it stays
        for namespace, name in sorted(owned["endpointslices"].keys() - desired.keys()):
            try:
                with contextlib.suppress(_NotFoundError):
                    await self._request(self._delete_call("endpointslices", namespace, name))
            except (_ApiError, aiohttp.ClientError, TimeoutError, CatalogError) as err:
                failures.append(f"stale mirror EndpointSlice {namespace}/{name}: {self._describe(err, short=True)}")
        if failures:
            raise CatalogError(
                f"cannot mirror every import of zone {self._zone} into the Kubernetes API at {self.server}: "
                f"{len(failures)} change(s) failed, the others are applied and the next publish retries — "
                + "; ".join(failures)
            )

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
            reason = describe_validation_error(reason)
        if what not in self._skipped:
            self._skipped.add(what)
            log.warning("Kubernetes: skipping %s, which meshfed cannot represent: %s", what, reason)

    # -- mirrors ----------------------------------------------------------------------------------------

    async def _owned_mirrors(self, kind: str) -> dict[tuple[str, str], Document]:
        """This zone's mirrors of ``kind``: in the mirror namespace, or across namespaces without one."""
        selector = f"{MIRROR_LABEL}=true,{OWNER_LABEL}={self._zone}"
        document = await self._request(self._list_call(kind, self._settings.mirror_namespace, label_selector=selector))
        return {(item["metadata"]["namespace"], _name(item)): item for item in document.get("items") or []}

    async def _apply_mirror(
        self, item: LocalImport, namespace: str, name: str, owned: dict[str, dict[tuple[str, str], Document]]
    ) -> None:
        """Create or update one import's Service and EndpointSlice, leaving both or neither."""
        service, endpoints = self._mirror_documents(item, namespace, name)
        current = owned["services"].get((namespace, name))
        if current is None:
            # Created before its EndpointSlice: a name held by someone else's Service is refused here,
            # before an EndpointSlice could add our endpoint to their Service.
            await self._create_owned("services", namespace, service)
        elif not _same_mirror(current, service, "services"):
            await self._request(
                self._replace_call("services", namespace, name, _replacement(current, service, "services"))
            )
        current_slice = owned["endpointslices"].get((namespace, name))
        missing = current_slice is None or current_slice.get("addressType") != endpoints["addressType"]
        try:
            if current_slice is not None and missing:
                # addressType is immutable: another address family needs a new EndpointSlice.
                with contextlib.suppress(_NotFoundError):
                    await self._request(self._delete_call("endpointslices", namespace, name))
            if missing:
                await self._create_owned("endpointslices", namespace, endpoints)
            elif current_slice is not None and not _same_mirror(current_slice, endpoints, "endpointslices"):
                replacement = _replacement(current_slice, endpoints, "endpointslices")
                await self._request(self._replace_call("endpointslices", namespace, name, replacement))
        except (_ApiError, aiohttp.ClientError, TimeoutError, CatalogError) as err:
            if not missing:
                raise  # the previous EndpointSlice still serves the Service
            try:
                with contextlib.suppress(_NotFoundError):
                    await self._request(self._delete_call("services", namespace, name))
            except (_ApiError, aiohttp.ClientError, TimeoutError, CatalogError) as cleanup:
                raise CatalogError(
                    f"{self._describe(err, short=True)}; and removing its Service {namespace}/{name} again, so it is "
                    f"not left without endpoints, failed too: {self._describe(cleanup, short=True)}"
                ) from None
            raise

    async def _create_owned(self, kind: str, namespace: str, document: Document) -> None:
        """Create ``document``; if its name is taken, take it over only when this zone owns it."""
        name = _name(document)
        try:
            await self._request(self._create_call(kind, namespace, document))
            return
        except _ApiError as err:
            if err.status != 409:
                raise
        # Not in this zone's list, yet there: someone else's object, or ours created since the list.
        current = await self._request(self._read_call(kind, namespace, name))
        labels = (current.get("metadata") or {}).get("labels") or {}
        if labels.get(MIRROR_LABEL) != "true" or labels.get(OWNER_LABEL) != self._zone:
            owner = labels.get(OWNER_LABEL)
            whose = f" (it is labelled {OWNER_LABEL}={owner})" if owner else ""
            raise _ForeignObjectError(
                f"{_KINDS[kind]} {namespace}/{name} exists and is not managed by meshfed zone {self._zone}{whose}; "
                "rename or delete it so meshfed can mirror the import there, or set [kubernetes] mirror_namespace "
                "to a namespace of meshfed's own"
            )
        if not _same_mirror(current, document, kind):
            await self._request(self._replace_call(kind, namespace, name, _replacement(current, document, kind)))

    def _mirror_documents(self, item: LocalImport, namespace: str, name: str) -> tuple[Document, Document]:
        labels = {
            MIRROR_LABEL: "true",
            OWNER_LABEL: self._zone,
            PEER_LABEL: item.peer,
            SERVICE_LABEL: item.service,
            NAMESPACE_LABEL: item.namespace,
        }
        annotations = {IMPORT_ANNOTATION: item.name}
        ports = sorted(item.ports.items())
        if not ports:
            raise CatalogError(f"import {item.name} has no ports to mirror")
        service: Document = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations},
            "spec": {
                "type": "ClusterIP",
                "ports": [
                    {"name": port_name, "port": port, "targetPort": port, "protocol": "TCP"}
                    for port_name, (_, port) in ports
                ],
            },
        }
        # Every egress listener of a zone binds the same egress host, so one endpoint carries all ports.
        address = _check_egress_address(ports[0][1][0])
        endpoints: Document = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {**labels, SERVICE_NAME_LABEL: name, MANAGED_BY_LABEL: MANAGED_BY},
                "annotations": annotations,
            },
            "addressType": f"IPv{address.version}",
            "endpoints": [{"addresses": [str(address)], "conditions": {"ready": True}}],
            "ports": [{"name": port_name, "port": port, "protocol": "TCP"} for port_name, (_, port) in ports],
        }
        return service, endpoints

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

    def _read_call(self, kind: str, namespace: str, name: str) -> Callable[[], Awaitable[Any]]:
        if kind == "services":
            return lambda: self._core().read_namespaced_service(name, namespace, _preload_content=False)
        return lambda: self._discovery().read_namespaced_endpoint_slice(name, namespace, _preload_content=False)

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

    def _describe(self, err: BaseException, *, short: bool = False) -> str:
        """What went wrong and what to check; ``short`` leaves out which server (said once by the caller)."""
        where = "the Kubernetes API" if short else f"the Kubernetes API at {self.server}"
        if isinstance(err, CatalogError):
            return str(err)
        if isinstance(err, aiohttp.ClientConnectorError):
            return f"{where} refused the connection ({err.os_error}) — is the kubeconfig's server right?"
        if isinstance(err, _ApiError) and err.status == 401:
            # Authentication, not authorization: RBAC never answers 401.
            source = f"the user of {self._settings.kubeconfig}" if self._settings.kubeconfig else "the pod's token"
            return (
                f"{where} did not accept meshfed's credentials ({err}) — is the token expired, revoked or for another "
                f"cluster? check {source}"
            )
        if isinstance(err, _ApiError) and err.status == 403:
            return f"{where} {_forbidden_hint(err.message, self._settings.mirror_namespace)} ({err})"
        if isinstance(err, _ApiError) and err.status == 404 and 'namespaces "' in err.message:
            return f"{where}: {err.message} — create the namespace first ({err})"
        if isinstance(err, TimeoutError):
            return f"{where} did not answer in time"
        return f"{where}: {err}"


class _ForeignObjectError(CatalogError):
    """An object with a mirror's name that this zone does not own: never updated or deleted."""


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


def mirror_name(zone: str, item: LocalImport) -> str:
    """The name of ``item``'s mirror Service and EndpointSlice in zone ``zone``: ``<service>-<peer>-<digest>``.

    The digest (10 characters of the base32 SHA-256 of ``<service>.<namespace>.<peer>@<zone>``) makes
    names of different imports differ even where the readable part, cut to 52 characters, does not.
    """
    identity = f"{item.service}.{item.namespace}.{item.peer}@{zone}"
    digest = base64.b32encode(hashlib.sha256(identity.encode()).digest()).decode().lower()[:_DIGEST_LENGTH]
    readable = re.sub(r"[^a-z0-9-]+", "-", f"{item.service}-{item.peer}".lower()).strip("-")
    if not readable[:1].isalpha():
        readable = f"x{readable}"  # a Service name is a DNS-1035 label: it starts with a letter
    return f"{readable[: 62 - _DIGEST_LENGTH].rstrip('-')}-{digest}"


def _check_egress_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The egress address as an EndpointSlice takes it; refuse the ones the API server refuses there."""
    fix = (
        "run `meshfed up` with --egress-advertise-host set to an address pods can reach (the pod IP), "
        "and --egress-host set to bind it (such as 0.0.0.0)"
    )
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise CatalogError(
            f"egress address {host!r} is not an IP address, which an EndpointSlice needs — {fix}"
        ) from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    # The API server's ValidateEndpointIP refuses these in an EndpointSlice.
    if address.is_loopback:
        problem = "loopback"
    elif address.is_unspecified:
        problem = "unspecified"
    elif address.is_link_local or address in _LINK_LOCAL_MULTICAST[address.version]:
        problem = "link-local"
    else:
        return address
    raise CatalogError(f"egress address {host} is {problem}; the API server refuses it in an EndpointSlice — {fix}")


_LINK_LOCAL_MULTICAST = {4: ipaddress.ip_network("224.0.0.0/24"), 6: ipaddress.ip_network("ff02::/16")}


def _forbidden_hint(message: str, mirror_namespace: str | None) -> str:
    """Which permission was missing, from the Status message of a 403, and where meshfed needs it."""
    match = _FORBIDDEN.search(message)
    if match is None:
        return "refused access: does the identity have the RBAC the meshfed chart grants?"
    resource = match["resource"] if not match["group"] else f"{match['resource']}.{match['group']}"
    scope = f"in namespace {match['namespace']}" if match["namespace"] else "at the cluster scope"
    role = "a Role there" if match["namespace"] else "a ClusterRole"
    hint = (
        f"forbids {match['user']} to {match['verb']} {resource} {scope} — grant it with {role} "
        "(the meshfed chart grants list/watch on Services and EndpointSlices in each watched namespace, and "
        "get/list/create/update/delete in its mirror namespace)"
    )
    if not match["namespace"] and mirror_namespace is None:
        hint += "; or set [kubernetes] mirror_namespace, so stale mirrors are looked for there, not cluster-wide"
    return hint


def _replacement(current: Document, desired: Document, kind: str) -> Document:
    """``current`` with meshfed's fields set as ``desired`` has them; what the server set stays (clusterIP...)."""
    replacement = copy.deepcopy(current)
    metadata = replacement.setdefault("metadata", {})
    metadata["labels"] = dict(desired["metadata"]["labels"])
    metadata["annotations"] = {**(metadata.get("annotations") or {}), **desired["metadata"]["annotations"]}
    if kind == "services":
        spec = replacement.setdefault("spec", {})
        spec.pop("selector", None)
        spec["type"] = "ClusterIP"
        spec["ports"] = copy.deepcopy(desired["spec"]["ports"])
    else:
        for key in ("addressType", "endpoints", "ports"):
            replacement[key] = copy.deepcopy(desired[key])
    return replacement


def _same_mirror(current: Document, desired: Document, kind: str) -> bool:
    """True if ``current`` already is ``desired`` in every field meshfed sets (server defaults aside)."""
    metadata, wanted = current.get("metadata") or {}, desired["metadata"]
    if (metadata.get("labels") or {}) != wanted["labels"]:
        return False
    annotations = metadata.get("annotations") or {}
    if any(annotations.get(key) != value for key, value in wanted["annotations"].items()):
        return False
    if kind == "services":
        spec = current.get("spec") or {}
        ports = [
            {key: port.get(key) for key in ("name", "port", "targetPort", "protocol")}
            for port in spec.get("ports") or []
        ]
        return spec.get("type") == "ClusterIP" and not spec.get("selector") and ports == desired["spec"]["ports"]
    endpoints = [
        {"addresses": entry.get("addresses"), "conditions": {"ready": (entry.get("conditions") or {}).get("ready")}}
        for entry in current.get("endpoints") or []
    ]
    ports = [{key: port.get(key) for key in ("name", "port", "protocol")} for port in current.get("ports") or []]
    return bool(
        current.get("addressType") == desired["addressType"]
        and endpoints == desired["endpoints"]
        and ports == desired["ports"]
    )


__all__ = ["MIRROR_LABEL", "OWNER_LABEL", "KubernetesCatalog", "mirror_name"]
