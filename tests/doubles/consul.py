"""A Consul HTTP API double, from https://developer.hashicorp.com/consul/api-docs.

What it implements, as documented:

* ``GET /v1/catalog/services``, ``GET /v1/health/service/:service``,
  ``GET /v1/catalog/node/:node``: blocking queries — with ``index`` > 0 the
  request waits until the index it reports passes ``index`` or ``wait``
  (default 5m, at most 10m, plus up to wait/16 of jitter) elapses; every
  answer carries ``X-Consul-Index``. Health queries report the service's own
  index (Consul's per-service index), or the services table's if the service
  does not exist.
* ``PUT /v1/catalog/register`` / ``PUT /v1/catalog/deregister``, and the agent's
  ``PUT /v1/agent/service/register`` / ``PUT /v1/agent/service/deregister/:id``;
  JSON keys are matched case-insensitively, as Consul's Go decoder does
  (py-consul sends ``node``, ``address``, ``service``).
* ACLs: with ``acl_token`` set, a request without that token (``X-Consul-Token``
  header or ``token`` parameter) gets 403 ``Permission denied``.
* ``dc`` other than the double's datacenter: 500 ``No path to datacenter``.
* ``ns`` (Enterprise namespaces) filters services by namespace.

Test hooks: :meth:`register`, :meth:`set_check`, :meth:`deregister`,
:meth:`reset_index` (a snapshot restore: the index goes backwards and blocked
queries return), :meth:`fail_next` (5xx or non-JSON answers).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading
from typing import Any

from aiohttp import web

from tests.doubles.server import BackgroundServer

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
AGENT_NODE = "node-1"


def _duration(text: str) -> float:
    match = _DURATION.match(text)
    if not match:
        raise web.HTTPBadRequest(text=f"Invalid wait time: {text!r}")
    return float(match.group(1)) * _UNIT[match.group(2)]


def _ci(document: dict[str, Any], key: str, default: Any = None) -> Any:
    """A JSON field looked up the way Go's encoding/json does: case-insensitively."""
    for name, value in document.items():
        if name.lower() == key.lower():
            return value
    return default


class ConsulDouble:
    """A Consul agent's HTTP API on loopback. Use as a context manager or call :meth:`close`."""

    def __init__(self, *, datacenter: str = "dc1", acl_token: str | None = None) -> None:
        self.datacenter = datacenter
        self.acl_token = acl_token
        self._lock = threading.Lock()
        self.index = 10
        self._services_index = 10
        self._service_index: dict[str, int] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.services: dict[tuple[str, str], dict[str, Any]] = {}
        self.checks: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._failures: list[tuple[int, str]] = []
        self._changed: asyncio.Event | None = None
        app = web.Application()
        app.router.add_get("/v1/catalog/services", self._catalog_services)
        app.router.add_get("/v1/health/service/{name}", self._health_service)
        app.router.add_get("/v1/catalog/node/{node}", self._catalog_node)
        app.router.add_put("/v1/catalog/register", self._catalog_register)
        app.router.add_put("/v1/catalog/deregister", self._catalog_deregister)
        app.router.add_put("/v1/agent/service/register", self._agent_register)
        app.router.add_put("/v1/agent/service/deregister/{id}", self._agent_deregister)
        self._server = BackgroundServer(app)
        self._server.call(self._make_event)
        self.address = self._server.url

    async def _make_event(self) -> None:
        self._changed = asyncio.Event()

    def __enter__(self) -> ConsulDouble:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.close()

    # -- test hooks (any thread) ------------------------------------------------------------------------

    def register(
        self,
        name: str,
        address: str,
        port: int,
        *,
        service_id: str | None = None,
        node: str = AGENT_NODE,
        node_address: str = "10.0.0.1",
        tags: list[str] | None = None,
        meta: dict[str, str] | None = None,
        status: str = "passing",
        namespace: str | None = None,
        locality: dict[str, str] | None = None,
    ) -> str:
        """Register an instance with one service check in ``status``; returns its service ID."""
        service_id = service_id or f"{name}-{port}"
        service: dict[str, Any] = {
            "ID": service_id,
            "Service": name,
            "Tags": tags or [],
            "Address": address,
            "Meta": meta or {},
            "Port": port,
            "Weights": {"Passing": 1, "Warning": 1},
        }
        if namespace is not None:
            service["Namespace"] = namespace
        if locality is not None:
            service["Locality"] = locality
        check = {"CheckID": f"service:{service_id}", "Name": f"{name} check", "Status": status, "ServiceID": service_id}
        with self._lock:
            self._put(node, node_address, {}, service, [check])
        self._notify()
        return service_id

    def set_check(self, service_id: str, status: str, node: str = AGENT_NODE) -> None:
        with self._lock:
            check = self.checks[(node, f"service:{service_id}")]
            index = self._bump()
            check.update(Status=status, ModifyIndex=index)
            self._touch(check["ServiceName"], index)
        self._notify()

    def deregister(self, service_id: str, node: str = AGENT_NODE) -> None:
        with self._lock:
            self._remove(node, service_id)
        self._notify()

    def reset_index(self, to: int = 1) -> None:
        """As after a snapshot restore onto a new cluster: every index goes back to ``to``."""
        with self._lock:
            self.index = to
            self._services_index = to
            self._service_index = dict.fromkeys(self._service_index, to)
        self._notify()

    def fail_next(self, count: int, status: int = 500, body: str = "rpc error: No cluster leader") -> None:
        """Answer the next ``count`` reads with ``status`` and ``body`` (status 200 + a non-JSON body: garbage)."""
        with self._lock:
            self._failures.extend([(status, body)] * count)

    def registered(self, node: str) -> dict[str, dict[str, Any]]:
        """The services on ``node``, by ID."""
        with self._lock:
            return {sid: dict(service) for (owner, sid), service in self.services.items() if owner == node}

    # -- state (under the lock) -------------------------------------------------------------------------

    def _bump(self) -> int:
        self.index += 1
        return self.index

    def _touch(self, name: str, index: int) -> None:
        self._service_index[name] = index
        self._services_index = index

    def _put(
        self,
        node: str,
        address: str,
        node_meta: dict[str, str],
        service: dict[str, Any] | None,
        checks: list[dict[str, Any]],
    ) -> None:
        index = self._bump()
        existing = self.nodes.get(node)
        self.nodes[node] = {
            "ID": "",
            "Node": node,
            "Address": address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {"lan": address, "wan": address},
            "Meta": node_meta or (existing or {}).get("Meta", {}),
            "CreateIndex": (existing or {}).get("CreateIndex", index),
            "ModifyIndex": index,
        }
        if service is not None:
            old = self.services.get((node, service["ID"]))
            self.services[(node, service["ID"])] = {
                **service,
                "CreateIndex": (old or {}).get("CreateIndex", index),
                "ModifyIndex": index,
            }
            self._touch(service["Service"], index)
        for check in checks:
            service_name = service["Service"] if service is not None and check.get("ServiceID") else ""
            self.checks[(node, check["CheckID"])] = {
                "Node": node,
                "Notes": "",
                "Output": "",
                "ServiceName": service_name,
                **check,
                "CreateIndex": index,
                "ModifyIndex": index,
            }
            if service_name:
                self._touch(service_name, index)

    def _remove(self, node: str, service_id: str) -> bool:
        service = self.services.pop((node, service_id), None)
        if service is None:
            return False
        index = self._bump()
        for key in [key for key, check in self.checks.items() if key[0] == node and check["ServiceID"] == service_id]:
            del self.checks[key]
        self._touch(service["Service"], index)
        return True

    def _notify(self) -> None:
        def wake() -> None:
            assert self._changed is not None
            self._changed.set()
            self._changed = asyncio.Event()

        self._server.loop.call_soon_threadsafe(wake)

    # -- HTTP ---------------------------------------------------------------------------------------------

    async def _admit(self, request: web.Request) -> web.Response | None:
        """ACL, datacenter and injected failures: the answer to send instead, if any."""
        self.requests.append((request.method, request.path, dict(request.query)))
        token = request.headers.get("X-Consul-Token") or request.query.get("token")
        if self.acl_token is not None and token != self.acl_token:
            return web.Response(status=403, text="Permission denied: token with AccessorID '' lacks permission")
        dc = request.query.get("dc")
        if dc is not None and dc != self.datacenter:
            return web.Response(status=500, text="No path to datacenter")
        with self._lock:
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            return web.Response(status=failure[0], text=failure[1], headers={"X-Consul-Index": str(self.index)})
        return None

    async def _block(self, request: web.Request, current: Any) -> int:
        """Wait as a blocking query does; return the index to report."""
        index = int(request.query.get("index", "0") or 0)
        wait = min(_duration(request.query.get("wait", "5m")), 600.0)
        deadline = asyncio.get_running_loop().time() + wait + random.uniform(0, wait / 16)
        while index > 0:
            with self._lock:
                reported = current()
            if reported != index:  # passed it, or went backwards (a reset): answer now
                return int(reported)
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            assert self._changed is not None
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                break
        with self._lock:
            return int(current())

    def _json(self, document: Any, index: int) -> web.Response:
        headers = {"X-Consul-Index": str(max(index, 0)), "X-Consul-KnownLeader": "true", "X-Consul-LastContact": "0"}
        return web.Response(text=json.dumps(document), content_type="application/json", headers=headers)

    def _in_namespace(self, service: dict[str, Any], request: web.Request) -> bool:
        namespace = request.query.get("ns")
        return namespace is None or service.get("Namespace", "default") == namespace

    async def _catalog_services(self, request: web.Request) -> web.Response:
        if (refusal := await self._admit(request)) is not None:
            return refusal
        index = await self._block(request, lambda: self._services_index)
        with self._lock:
            names: dict[str, set[str]] = {}
            for service in self.services.values():
                if self._in_namespace(service, request):
                    names.setdefault(service["Service"], set()).update(service["Tags"])
        return self._json({name: sorted(tags) for name, tags in sorted(names.items())}, index)

    async def _health_service(self, request: web.Request) -> web.Response:
        if (refusal := await self._admit(request)) is not None:
            return refusal
        name = request.match_info["name"]
        index = await self._block(request, lambda: self._service_index.get(name, self._services_index))
        passing_only = "passing" in request.query
        tag = request.query.get("tag")
        with self._lock:
            entries = []
            for (node, service_id), service in sorted(self.services.items()):
                if service["Service"] != name or not self._in_namespace(service, request):
                    continue
                if tag is not None and tag not in service["Tags"]:
                    continue
                checks = [
                    dict(check)
                    for (owner, _), check in sorted(self.checks.items())
                    if owner == node and check["ServiceID"] in ("", service_id)
                ]
                if passing_only and any(check["Status"] != "passing" for check in checks):
                    continue
                entries.append({"Node": dict(self.nodes[node]), "Service": dict(service), "Checks": checks})
        return self._json(entries, index)

    async def _catalog_node(self, request: web.Request) -> web.Response:
        if (refusal := await self._admit(request)) is not None:
            return refusal
        node = request.match_info["node"]
        index = await self._block(request, lambda: self.index)
        with self._lock:
            if node not in self.nodes:
                return self._json(None, index)
            services = {sid: dict(service) for (owner, sid), service in self.services.items() if owner == node}
            return self._json({"Node": dict(self.nodes[node]), "Services": services}, index)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.text() or "{}")
        except json.JSONDecodeError as err:
            raise web.HTTPBadRequest(text=f"Request decode failed: {err}") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="Request decode failed: not an object")
        return body

    async def _catalog_register(self, request: web.Request) -> web.Response:
        if (refusal := await self._admit(request)) is not None:
            return refusal
        body = await self._body(request)
        node, address = _ci(body, "Node"), _ci(body, "Address")
        if not node:
            return web.Response(status=400, text="Must provide node")
        if not address:
            return web.Response(status=400, text="Must provide address")
        service = _ci(body, "Service")
        normalized: dict[str, Any] | None = None
        if service is not None:
            name = _ci(service, "Service")
            if not name:
                return web.Response(status=400, text="Must provide service name")
            normalized = {
                "ID": _ci(service, "ID") or name,
                "Service": name,
                "Tags": _ci(service, "Tags") or [],
                "Address": _ci(service, "Address") or "",
                "Meta": _ci(service, "Meta") or {},
                "Port": int(_ci(service, "Port") or 0),
                "Weights": _ci(service, "Weights") or {"Passing": 1, "Warning": 1},
            }
        checks = [_ci(body, "Check")] if _ci(body, "Check") else list(_ci(body, "Checks") or [])
        with self._lock:
            self._put(node, address, _ci(body, "NodeMeta") or {}, normalized, checks)
        self._notify()
        return self._json(True, self.index)

    async def _catalog_deregister(self, request: web.Request) -> web.Response:
        if (refusal := await self._admit(request)) is not None:
            return refusal
        body = await self._body(request)
        node = _ci(body, "Node")
        if not node:
            return web.Response(status=400, text="Must provide node")
        service_id = _ci(body, "ServiceID")
        with self._lock:
            if service_id:
                self._remove(node, service_id)
            else:
                for owner, sid in [key for key in self.services if key[0] == node]:
                    self._remove(owner, sid)
                self.nodes.pop(node, None)
        self._notify()
        return self._json(True, self.index)

    async def _agent_register(self, request: web.Request) -> web.Response:
        if (refusal := await self._admit(request)) is not None:
            return refusal
        body = await self._body(request)
        name = _ci(body, "Name")
        if not name:
            return web.Response(status=400, text="Missing service name")
        service = {
            "ID": _ci(body, "ID") or name,
            "Service": name,
            "Tags": _ci(body, "Tags") or [],
            "Address": _ci(body, "Address") or "",
            "Meta": _ci(body, "Meta") or {},
            "Port": int(_ci(body, "Port") or 0),
            "Weights": {"Passing": 1, "Warning": 1},
        }
        with self._lock:
            self._put(AGENT_NODE, self.nodes.get(AGENT_NODE, {}).get("Address", "127.0.0.1"), {}, service, [])
        self._notify()
        return web.Response(text="")

    async def _agent_deregister(self, request: web.Request) -> web.Response:
        if (refusal := await self._admit(request)) is not None:
            return refusal
        with self._lock:
            found = self._remove(AGENT_NODE, request.match_info["id"])
        if not found:
            return web.Response(status=404, text=f'Unknown service ID "{request.match_info["id"]}"')
        self._notify()
        return web.Response(text="")
