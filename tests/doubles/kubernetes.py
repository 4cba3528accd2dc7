"""A Kubernetes API server double for Services and EndpointSlices, from the API reference and API concepts.

What it implements, as https://kubernetes.io/docs/reference/using-api/api-concepts/ documents:

* ``GET`` collection (namespaced, or across namespaces) → ``<Kind>List`` with
  ``metadata.resourceVersion``; ``labelSelector`` with ``k=v``, ``k!=v``, ``k``.
* ``?watch=1``: a chunked stream of JSON events, one per line (``ADDED``,
  ``MODIFIED``, ``DELETED``, ``BOOKMARK`` with ``allowWatchBookmarks``),
  starting after ``resourceVersion`` (or, unset or "0", with synthetic
  ``ADDED`` events for what exists); ends after ``timeoutSeconds``. A
  ``resourceVersion`` older than the retained history gets an ``ERROR`` event
  carrying a ``Status`` with code 410 (reason ``Expired``), as the real server
  sends once the watch has started.
* ``POST`` (409 ``AlreadyExists``), ``GET``/``PUT``/``DELETE`` by name (404
  ``NotFound``; ``PUT`` with a stale ``metadata.resourceVersion`` → 409 ``Conflict``).
* Bearer-token authentication: with ``token`` set, anything else → 401.

Test hooks: :meth:`apply`, :meth:`delete`, :meth:`compact` (drop history so
older versions are 410 Gone), :meth:`fail_next`, :meth:`objects`,
:meth:`write_kubeconfig`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.doubles.server import BackgroundServer

Document = dict[str, Any]

_KINDS = {
    "services": ("v1", "Service"),
    "endpointslices": ("discovery.k8s.io/v1", "EndpointSlice"),
}


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return web.json_response(body, status=code)


def _go_bool(value: str | None) -> bool:
    """Query booleans as the API server parses them (Go's strconv.ParseBool): the client sends ``True``."""
    return value in ("1", "t", "T", "TRUE", "true", "True")


def _matches(labels: dict[str, str], selector: str | None) -> bool:
    for term in filter(None, (selector or "").split(",")):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.split("=", 1)
            if labels.get(key.strip().rstrip("=")) != value.strip():
                return False
        elif term.strip() not in labels:
            return False
    return True


class KubernetesDouble:
    """Services and EndpointSlices behind a real HTTP server on loopback."""

    def __init__(self, *, token: str | None = "double-token", bookmark_interval: float = 0.5) -> None:
        self.token = token
        self.bookmark_interval = bookmark_interval
        self._lock = threading.Lock()
        self.resource_version = 100
        self._oldest = 100  # events after this version are retained
        self._store: dict[tuple[str, str, str], Document] = {}
        self._events: list[tuple[int, str, str, Document]] = []  # (version, kind, type, object)
        self._failures: list[tuple[int, str]] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._changed: asyncio.Event | None = None
        app = web.Application()
        for kind in _KINDS:
            prefix = "/api/v1" if kind == "services" else "/apis/discovery.k8s.io/v1"
            app.router.add_get(f"{prefix}/{kind}", self._collection(kind, namespaced=False))
            app.router.add_get(f"{prefix}/namespaces/{{namespace}}/{kind}", self._collection(kind, namespaced=True))
            app.router.add_post(f"{prefix}/namespaces/{{namespace}}/{kind}", self._create(kind))
            app.router.add_get(f"{prefix}/namespaces/{{namespace}}/{kind}/{{name}}", self._get(kind))
            app.router.add_put(f"{prefix}/namespaces/{{namespace}}/{kind}/{{name}}", self._replace(kind))
            app.router.add_delete(f"{prefix}/namespaces/{{namespace}}/{kind}/{{name}}", self._delete(kind))
        self._server = BackgroundServer(app)
        self._server.call(self._make_event)
        self.url = self._server.url

    async def _make_event(self) -> None:
        self._changed = asyncio.Event()

    def __enter__(self) -> KubernetesDouble:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.close()

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig whose current context points at this double (JSON is valid YAML)."""
        user: Document = {"token": self.token} if self.token else {}
        document = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "meshfed", "user": user}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "meshfed"}}],
            "current-context": "double",
        }
        path.write_text(json.dumps(document))
        return path

    # -- test hooks (any thread) ------------------------------------------------------------------------

    def apply(self, document: Document) -> Document:
        """Create or replace ``document`` (kind from its ``kind``), as ``kubectl apply`` would."""
        kind = next(plural for plural, (_, name) in _KINDS.items() if name == document["kind"])
        metadata = document["metadata"]
        with self._lock:
            key = (kind, metadata.get("namespace", "default"), metadata["name"])
            stored = self._write(kind, key, copy.deepcopy(document), "MODIFIED" if key in self._store else "ADDED")
        self._notify()
        return stored

    def delete(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            self._remove(kind, (kind, namespace, name))
        self._notify()

    def compact(self) -> None:
        """Forget the event history, as etcd compaction does: watches from older versions get 410 Gone."""
        with self._lock:
            self.resource_version += 1
            self._oldest = self.resource_version
            self._events.clear()
        self._notify()

    def fail_next(self, count: int, status: int = 500, body: str | None = None) -> None:
        """Answer the next ``count`` requests with ``status`` (a Status object, or ``body`` verbatim)."""
        with self._lock:
            self._failures.extend([(status, body or "")] * count)

    def objects(self, kind: str, namespace: str | None = None, selector: str | None = None) -> list[Document]:
        with self._lock:
            return [
                copy.deepcopy(item)
                for (k, ns, _), item in sorted(self._store.items())
                if k == kind and namespace in (None, ns) and _matches(item["metadata"].get("labels") or {}, selector)
            ]

    # -- state (under the lock) -------------------------------------------------------------------------

    def _write(self, kind: str, key: tuple[str, str, str], document: Document, event: str) -> Document:
        self.resource_version += 1
        api_version, kind_name = _KINDS[kind]
        old = self._store.get(key)
        metadata = document.setdefault("metadata", {})
        metadata.update(
            name=key[2],
            namespace=key[1],
            resourceVersion=str(self.resource_version),
            uid=(old or {}).get("metadata", {}).get("uid") or str(uuid.uuid4()),
            creationTimestamp=(old or {}).get("metadata", {}).get("creationTimestamp") or "2026-01-01T00:00:00Z",
        )
        document["apiVersion"], document["kind"] = api_version, kind_name
        self._store[key] = document
        self._events.append((self.resource_version, kind, event, copy.deepcopy(document)))
        return copy.deepcopy(document)

    def _remove(self, kind: str, key: tuple[str, str, str]) -> Document | None:
        document = self._store.pop(key, None)
        if document is None:
            return None
        self.resource_version += 1
        document["metadata"]["resourceVersion"] = str(self.resource_version)
        self._events.append((self.resource_version, kind, "DELETED", copy.deepcopy(document)))
        return document

    def _notify(self) -> None:
        def wake() -> None:
            assert self._changed is not None
            self._changed.set()
            self._changed = asyncio.Event()

        self._server.loop.call_soon_threadsafe(wake)

    # -- HTTP ---------------------------------------------------------------------------------------------

    def _admit(self, request: web.Request) -> web.Response | None:
        self.requests.append((request.method, request.path, dict(request.query)))
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return _status(401, "Unauthorized", "Unauthorized")
        with self._lock:
            failure = self._failures.pop(0) if self._failures else None
        if failure is None:
            return None
        status, body = failure
        if body:
            return web.Response(status=status, text=body, content_type="application/json")
        return _status(status, "InternalError", 'an error on the server ("injected by the test") has prevented it')

    def _collection(self, kind: str, *, namespaced: bool) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            if (refusal := self._admit(request)) is not None:
                return refusal
            namespace = request.match_info.get("namespace") if namespaced else None
            selector = request.query.get("labelSelector")
            if _go_bool(request.query.get("watch")):
                try:
                    return await self._watch(request, kind, namespace, selector)
                except (ConnectionResetError, asyncio.CancelledError):
                    # The client went away (or the double is closing): a watch simply ends.
                    return web.Response()
            api_version, kind_name = _KINDS[kind]
            with self._lock:
                items = [
                    copy.deepcopy(item)
                    for (k, ns, _), item in sorted(self._store.items())
                    if k == kind
                    and namespace in (None, ns)
                    and _matches(item["metadata"].get("labels") or {}, selector)
                ]
                version = str(self.resource_version)
            body = {
                "kind": f"{kind_name}List",
                "apiVersion": api_version,
                "metadata": {"resourceVersion": version},
                "items": items,
            }
            return web.json_response(body)

        return handler

    async def _watch(
        self, request: web.Request, kind: str, namespace: str | None, selector: str | None
    ) -> web.StreamResponse:
        timeout = float(request.query.get("timeoutSeconds", "1800"))
        bookmarks = _go_bool(request.query.get("allowWatchBookmarks"))
        since_text = request.query.get("resourceVersion", "")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)

        async def send(event_type: str, item: Document) -> None:
            await response.write(json.dumps({"type": event_type, "object": item}).encode() + b"\n")

        def selected(event_kind: str, item: Document) -> bool:
            return (
                event_kind == kind
                and namespace in (None, item["metadata"].get("namespace"))
                and _matches(item["metadata"].get("labels") or {}, selector)
            )

        with self._lock:
            if since_text in ("", "0"):
                pending = [("ADDED", copy.deepcopy(item)) for (k, _, _), item in sorted(self._store.items())]
                pending = [(t, item) for t, item in pending if selected(kind, item)]
                cursor = self.resource_version
            else:
                cursor = int(since_text)
                if cursor < self._oldest:
                    gone = {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Failure",
                        "message": f"too old resource version: {cursor} ({self._oldest})",
                        "reason": "Expired",
                        "code": 410,
                    }
                    pending, cursor = [("ERROR", gone)], -1
                else:
                    pending = []
        for event_type, item in pending:
            await send(event_type, item)
        if cursor < 0:
            return response
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (remaining := deadline - loop.time()) > 0:
            with self._lock:
                if cursor < self._oldest:  # compacted under a live watch: the server ends it with 410 as well
                    events: list[tuple[int, str, str, Document]] = []
                    expired = True
                else:
                    events = [event for event in self._events if event[0] > cursor]
                    expired = False
                changed = self._changed
            if expired:
                await send(
                    "ERROR",
                    {
                        "kind": "Status",
                        "status": "Failure",
                        "reason": "Expired",
                        "code": 410,
                        "message": f"too old resource version: {cursor} ({self._oldest})",
                    },
                )
                return response
            for version, event_kind, event_type, item in events:
                cursor = version
                if selected(event_kind, item):
                    await send(event_type, item)
            assert changed is not None
            try:
                await asyncio.wait_for(changed.wait(), min(remaining, self.bookmark_interval))
            except TimeoutError:
                if bookmarks:
                    api_version, kind_name = _KINDS[kind]
                    with self._lock:
                        cursor = max(cursor, self.resource_version) if not self._pending_after(cursor) else cursor
                    await send(
                        "BOOKMARK",
                        {"kind": kind_name, "apiVersion": api_version, "metadata": {"resourceVersion": str(cursor)}},
                    )
        return response

    def _pending_after(self, cursor: int) -> bool:
        return any(event[0] > cursor for event in self._events)

    def _create(self, kind: str) -> Any:
        async def handler(request: web.Request) -> web.Response:
            if (refusal := self._admit(request)) is not None:
                return refusal
            body = await request.json()
            namespace = request.match_info["namespace"]
            name = (body.get("metadata") or {}).get("name")
            if not name:
                return _status(422, "Invalid", f"{_KINDS[kind][1]} is invalid: metadata.name: Required value")
            key = (kind, namespace, name)
            with self._lock:
                if key in self._store:
                    return _status(409, "AlreadyExists", f'{kind} "{name}" already exists')
                stored = self._write(kind, key, body, "ADDED")
            self._notify()
            return web.json_response(stored, status=201)

        return handler

    def _get(self, kind: str) -> Any:
        async def handler(request: web.Request) -> web.Response:
            if (refusal := self._admit(request)) is not None:
                return refusal
            key = (kind, request.match_info["namespace"], request.match_info["name"])
            with self._lock:
                item = copy.deepcopy(self._store.get(key))
            if item is None:
                return _status(404, "NotFound", f'{kind} "{key[2]}" not found')
            return web.json_response(item)

        return handler

    def _replace(self, kind: str) -> Any:
        async def handler(request: web.Request) -> web.Response:
            if (refusal := self._admit(request)) is not None:
                return refusal
            body = await request.json()
            key = (kind, request.match_info["namespace"], request.match_info["name"])
            with self._lock:
                current = self._store.get(key)
                if current is None:
                    return _status(404, "NotFound", f'{kind} "{key[2]}" not found')
                wanted = (body.get("metadata") or {}).get("resourceVersion")
                if wanted and wanted != current["metadata"]["resourceVersion"]:
                    return _status(
                        409,
                        "Conflict",
                        f'Operation cannot be fulfilled on {kind} "{key[2]}": the object has been modified; '
                        "please apply your changes to the latest version and try again",
                    )
                stored = self._write(kind, key, body, "MODIFIED")
            self._notify()
            return web.json_response(stored)

        return handler

    def _delete(self, kind: str) -> Any:
        async def handler(request: web.Request) -> web.Response:
            if (refusal := self._admit(request)) is not None:
                return refusal
            key = (kind, request.match_info["namespace"], request.match_info["name"])
            with self._lock:
                removed = self._remove(kind, key)
            if removed is None:
                return _status(404, "NotFound", f'{kind} "{key[2]}" not found')
            self._notify()
            return web.json_response(
                {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": {"name": key[2]}}
            )

        return handler


def service(
    name: str, namespace: str = "default", ports: dict[str, int] | None = None, labels: dict[str, str] | None = None
) -> Document:
    """A selector Service, as a user would apply it."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {
            "type": "ClusterIP",
            "ports": [
                {"name": port_name, "port": port, "protocol": "TCP"}
                for port_name, port in (ports or {"http": 80}).items()
            ],
            "selector": {"app": name},
        },
    }


def endpoint_slice(
    service_name: str,
    endpoints: list[tuple[str, bool | None, str]],
    port: int,
    port_name: str = "http",
    namespace: str = "default",
    suffix: str = "abcde",
) -> Document:
    """An EndpointSlice as the EndpointSlice controller writes it: (address, ready, zone) per endpoint."""
    items = []
    for address, ready, zone in endpoints:
        entry: Document = {"addresses": [address], "conditions": {} if ready is None else {"ready": ready}}
        if zone:
            entry["zone"] = zone
        items.append(entry)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service_name}-{suffix}",
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": service_name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "endpoints": items,
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
    }
