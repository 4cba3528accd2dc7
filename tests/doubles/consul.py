"""A Consul HTTP API double, from https://developer.hashicorp.com/consul/api-docs and a real Consul 1.14.

``tests/test_catalog_consul.py`` runs the same tests against this double and a
real ``consul agent -dev`` with ACLs; where the real server answered
differently from the docs, the double answers as the server did. The double
stays for what the real server will not do on demand: :meth:`reset_index` (a
snapshot restore: the index goes backwards and blocked queries return) and
:meth:`fail_next` (5xx or non-JSON answers), and for Consul Enterprise
namespaces (``enterprise=True``) and ``Service.Locality`` (Consul 1.17+).

What it implements:

* ``GET /v1/catalog/services``, ``GET /v1/health/service/:service``,
  ``GET /v1/catalog/node/:node``, ``GET /v1/catalog/nodes``: blocking queries — with ``index`` > 0 the
  request waits until the index it reports passes ``index`` or ``wait``
  (default 5m, at most 10m, plus up to wait/16 of jitter) elapses; every
  answer carries ``X-Consul-Index``. Health queries report the service's own
  index (Consul's per-service index), or the services table's if the service
  does not exist.
* ``PUT /v1/catalog/register`` / ``PUT /v1/catalog/deregister``, decoded as
  Consul decodes them: keys match case-insensitively, and an unknown field is
  ``400 Request decode failed: json: unknown field "WriteRequest"``. The node's
  ``Meta`` and ``TaggedAddresses`` are what the last registration sent (absent:
  null), as in Consul.
* ACLs, with ``management_token`` set (``default_policy = "deny"``): tokens
  and policies through ``PUT /v1/acl/policy[/:id]``, ``PUT /v1/acl/token``
  and their ``DELETE`` (management token only), with ``service``/``node`` rules and their
  ``_prefix`` forms (exact beats prefix, longest prefix wins; rules the double
  does not model are refused, not ignored as Consul ignores unknown ones). A
  token Consul does not know gets ``403 ACL not found``. Reads are filtered,
  not refused: what the token may not read is left out and the answer carries
  ``X-Consul-Results-Filtered-By-Acls: true`` (never for the anonymous token,
  whose reads are filtered silently); listing a service's instances needs
  ``node:read`` on their nodes too. Writes the token may not make get ``403
  Permission denied: token with AccessorID '…' lacks permission 'service:write'
  on "api-west"``; registering needs ``service:write`` on the service and,
  when the node is new or changes, ``node:write`` on the node;
  ``node:write`` alone may deregister anything on the node. Every answer
  carries ``X-Consul-Default-Acl-Policy: deny``.
* ``dc`` other than the double's datacenter: 500 ``No path to datacenter``.
* ``ns`` (Enterprise only; OSS refuses it as Consul OSS does): the namespace
  a query lists, ``default`` when absent.

Test hooks that change state directly (no ACLs): :meth:`register`,
:meth:`set_check`, :meth:`deregister`, :meth:`registered`.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.doubles.server import BackgroundServer

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
AGENT_NODE = "node-1"
ANONYMOUS = "anonymous"
FILTERED_HEADER = "X-Consul-Results-Filtered-By-Acls"

# The fields Consul 1.14 OSS decodes (lower-cased: Go's decoder matches keys case-insensitively). WriteRequest
# is embedded, so its Token is a field of its own, but "WriteRequest" is not.
_REGISTER_FIELDS = {
    "id",
    "node",
    "address",
    "datacenter",
    "taggedaddresses",
    "nodemeta",
    "service",
    "check",
    "checks",
    "skipnodeupdate",
    "peername",
    "token",
}
_SERVICE_FIELDS = {
    "kind",
    "id",
    "service",
    "tags",
    "address",
    "taggedaddresses",
    "meta",
    "port",
    "socketpath",
    "weights",
    "enabletagoverride",
    "proxy",
    "connect",
    "peername",
    "createindex",
    "modifyindex",
    "locality",  # Consul 1.17+
}
_CHECK_FIELDS = {
    "node",
    "checkid",
    "name",
    "status",
    "notes",
    "output",
    "serviceid",
    "servicename",
    "servicetags",
    "type",
    "definition",
    "interval",
    "timeout",
    "exposedport",
    "createindex",
    "modifyindex",
}
_DEREGISTER_FIELDS = {"node", "serviceid", "checkid", "datacenter", "token"}
_ENTERPRISE_FIELDS = {"namespace", "partition"}

_RULE = re.compile(r'(service|node|session|key)(_prefix)?\s+"([^"]*)"\s*\{\s*policy\s*=\s*"(read|write|deny)"\s*\}')
_COMMENT = re.compile(r"(#|//)[^\n]*")
# Among rules for the same resource, deny wins over write, and write over read (Consul's policy merger).
_PRECEDENCE = {"deny": 3, "write": 2, "read": 1}


def _duration(text: str) -> float | None:
    match = _DURATION.match(text)
    return float(match.group(1)) * _UNIT[match.group(2)] if match else None


def _ci(document: dict[str, Any], key: str, default: Any = None) -> Any:
    """A JSON field looked up the way Go's encoding/json does: case-insensitively."""
    for name, value in document.items():
        if name.lower() == key.lower():
            return value
    return default


def _changes_node(node: dict[str, Any] | None, address: str, meta: Any, tagged: Any) -> bool:
    """Whether a registration changes a node (Consul's ChangesNode; null and empty compare equal here)."""
    if node is None:
        return True
    return (node["Address"], node["Meta"] or None, node["TaggedAddresses"] or None) != (
        address,
        meta or None,
        tagged or None,
    )


class _RefusalError(Exception):
    """An answer other than 200, raised from deep inside a handler."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass(frozen=True)
class Rule:
    kind: str  # "service" | "node" | "session" | "key"
    prefix: bool
    name: str
    policy: str  # "read" | "write" | "deny"


def parse_rules(text: str) -> list[Rule]:
    """The ``service``/``node``/``session``/``key`` (``_prefix``) rules of an HCL policy; anything else is refused,
    not ignored. The double has no sessions or KV store, so their rules are kept but never asked."""
    rules, rest, position = [], [], 0
    text = _COMMENT.sub("", text)
    for match in _RULE.finditer(text):
        rest.append(text[position : match.start()])
        position = match.end()
        kind, prefix, name, policy = match.groups()
        rules.append(Rule(kind, bool(prefix), name, policy))
    rest.append(text[position:])
    leftover = "".join(rest).strip()
    if leftover:
        raise _RefusalError(
            500, f"Failed to parse ACL rules: the Consul double models only service and node rules: {leftover[:200]!r}"
        )
    return rules


@dataclass(frozen=True)
class Authorizer:
    """What one request's token may do: ``rules`` None means everything (ACLs off, or the management token)."""

    accessor: str
    rules: list[Rule] | None

    @property
    def anonymous(self) -> bool:
        return self.accessor == "00000000-0000-0000-0000-000000000002"

    def policy(self, kind: str, name: str) -> str:
        if self.rules is None:
            return "write"
        exact = [rule.policy for rule in self.rules if rule.kind == kind and not rule.prefix and rule.name == name]
        if exact:
            return max(exact, key=_PRECEDENCE.__getitem__)
        matching = [rule for rule in self.rules if rule.kind == kind and rule.prefix and name.startswith(rule.name)]
        if not matching:
            return "deny"  # default_policy = "deny"
        longest = max(len(rule.name) for rule in matching)
        return max((rule.policy for rule in matching if len(rule.name) == longest), key=_PRECEDENCE.__getitem__)

    def can_read(self, kind: str, name: str) -> bool:
        return self.policy(kind, name) in ("read", "write")

    def require_write(self, kind: str, name: str) -> None:
        if self.policy(kind, name) != "write":
            raise _RefusalError(
                403,
                f"Permission denied: token with AccessorID '{self.accessor}' "
                f"lacks permission '{kind}:write' on \"{name}\"",
            )

    def require_acl_write(self) -> None:
        if self.rules is not None:
            raise _RefusalError(
                403, f"Permission denied: token with AccessorID '{self.accessor}' lacks permission 'acl:write'"
            )


class ConsulDouble:
    """A Consul agent's HTTP API on loopback. Use as a context manager or call :meth:`close`."""

    def __init__(
        self, *, datacenter: str = "dc1", management_token: str | None = None, enterprise: bool = False
    ) -> None:
        self.datacenter = datacenter
        self.management_token = management_token
        self.enterprise = enterprise
        self._lock = threading.Lock()
        self.index = 10
        self._services_index = 10
        self._service_index: dict[str, int] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.services: dict[tuple[str, str], dict[str, Any]] = {}
        self.checks: dict[tuple[str, str], dict[str, Any]] = {}
        self.policies: dict[str, dict[str, Any]] = {}  # by ID
        self.tokens: dict[str, dict[str, Any]] = {}  # by SecretID
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._failures: list[tuple[int, str, str | None]] = []
        self._changed: asyncio.Event | None = None
        app = web.Application(middlewares=[self._headers])
        app.router.add_get("/v1/catalog/services", self._read(self._catalog_services))
        app.router.add_get("/v1/health/service/{name}", self._read(self._health_service))
        app.router.add_get("/v1/catalog/node/{node}", self._read(self._catalog_node))
        app.router.add_get("/v1/catalog/nodes", self._read(self._catalog_nodes))
        app.router.add_put("/v1/catalog/register", self._write(self._catalog_register))
        app.router.add_put("/v1/catalog/deregister", self._write(self._catalog_deregister))
        app.router.add_put("/v1/acl/policy", self._write(self._acl_policy_create))
        app.router.add_put("/v1/acl/policy/{id}", self._write(self._acl_policy_update))
        app.router.add_delete("/v1/acl/policy/{id}", self._write(self._acl_policy_delete))
        app.router.add_put("/v1/acl/token", self._write(self._acl_token_create))
        app.router.add_delete("/v1/acl/token/{accessor}", self._write(self._acl_token_delete))
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
        check = {"CheckID": f"service:{service_id}", "Name": f"{name} check", "Status": status, "ServiceID": service_id}
        with self._lock:
            existing = self.nodes.get(node) or {}
            self._put(node, node_address, existing.get("Meta"), existing.get("TaggedAddresses"), service, [check])
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

    def fail_next(
        self, count: int, status: int = 500, body: str = "rpc error: No cluster leader", *, path: str | None = None
    ) -> None:
        """Answer the next ``count`` reads (of ``path`` only, if given) with ``status`` and ``body``.

        Status 200 with a body that is not JSON is garbage, as from a proxy in the way.
        """
        with self._lock:
            self._failures.extend([(status, body, path)] * count)

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
        node_meta: dict[str, str] | None,
        tagged_addresses: dict[str, str] | None,
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
            "TaggedAddresses": tagged_addresses,
            "Meta": node_meta,
            "CreateIndex": (existing or {}).get("CreateIndex", index),
            "ModifyIndex": index
            if existing is None or _changes_node(existing, address, node_meta, tagged_addresses)
            else existing["ModifyIndex"],
        }
        if service is not None:
            old = self.services.get((node, service["ID"]))
            self.services[(node, service["ID"])] = {
                **service,
                "CreateIndex": (old or {}).get("CreateIndex", index),
                "ModifyIndex": index,
            }
            if old is not None and old["Service"] != service["Service"]:
                self._touch(old["Service"], index)
            self._touch(service["Service"], index)
        for check in checks:
            service_id = check.get("ServiceID") or ""
            owner = self.services.get((node, service_id)) if service_id else None
            self.checks[(node, check["CheckID"])] = {
                "Node": node,
                "Notes": "",
                "Output": "",
                **check,
                "ServiceID": service_id,
                "ServiceName": owner["Service"] if owner else "",
                "CreateIndex": index,
                "ModifyIndex": index,
            }
            # A node check is part of every instance on the node: each of those services moves.
            for moved in [owner] if owner is not None else [s for (n, _), s in self.services.items() if n == node]:
                self._touch(moved["Service"], index)

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

    @web.middleware
    async def _headers(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        response = await handler(request)
        if self.management_token is not None:
            response.headers["X-Consul-Default-Acl-Policy"] = "deny"
        return response

    def _read(
        self, handler: Callable[[web.Request, Authorizer], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def read(request: web.Request) -> web.Response:
            self.requests.append((request.method, request.path, dict(request.query)))
            try:
                authz = self._admit(request)
                with self._lock:
                    failure = next((f for f in self._failures if f[2] in (None, request.path)), None)
                    if failure is not None:
                        self._failures.remove(failure)
                if failure is not None:
                    return web.Response(status=failure[0], text=failure[1], headers={"X-Consul-Index": str(self.index)})
                return await handler(request, authz)
            except _RefusalError as refusal:
                return web.Response(status=refusal.status, text=refusal.text)

        return read

    def _write(
        self, handler: Callable[[web.Request, Authorizer], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def write(request: web.Request) -> web.Response:
            self.requests.append((request.method, request.path, dict(request.query)))
            try:
                response = await handler(request, self._admit(request))
            except _RefusalError as refusal:
                return web.Response(status=refusal.status, text=refusal.text)
            self._notify()
            return response

        return write

    def _admit(self, request: web.Request) -> Authorizer:
        """The request's token, datacenter and namespace, checked; what the token may do."""
        dc = request.query.get("dc")
        if dc is not None and dc != self.datacenter:
            raise _RefusalError(500, "No path to datacenter")
        if "ns" in request.query and not self.enterprise:
            raise _RefusalError(400, 'Invalid query parameter: "ns" - Namespaces are a Consul Enterprise feature')
        if self.management_token is None:
            return Authorizer("", None)
        secret = request.headers.get("X-Consul-Token") or request.query.get("token") or ANONYMOUS
        if secret == self.management_token:
            return Authorizer("management", None)
        if secret == ANONYMOUS:
            return Authorizer("00000000-0000-0000-0000-000000000002", [])
        with self._lock:
            token = self.tokens.get(secret)
            if token is None:
                raise _RefusalError(403, "ACL not found")
            rules = [rule for policy_id in token["PolicyIDs"] for rule in self.policies[policy_id]["rules"]]
        return Authorizer(token["AccessorID"], rules)

    async def _block(self, request: web.Request, current: Callable[[], int]) -> int:
        """Wait as a blocking query does; return the index to report."""
        try:
            index = int(request.query.get("index", "0") or 0)
        except ValueError:
            raise _RefusalError(400, "Invalid index") from None
        wait = _duration(request.query.get("wait", "5m"))
        if wait is None:
            raise _RefusalError(400, "Invalid wait time")
        wait = min(wait, 600.0)
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

    def _json(self, document: Any, index: int | None = None, *, filtered: bool = False) -> web.Response:
        headers = {}
        if index is not None:
            headers = {
                "X-Consul-Index": str(max(index, 0)),
                "X-Consul-KnownLeader": "true",
                "X-Consul-LastContact": "0",
            }
        if filtered:
            headers[FILTERED_HEADER] = "true"
        return web.Response(text=json.dumps(document), content_type="application/json", headers=headers)

    def _in_namespace(self, service: dict[str, Any], request: web.Request) -> bool:
        namespace = request.query.get("ns", "default")
        return namespace == "*" or service.get("Namespace", "default") == namespace

    async def _catalog_services(self, request: web.Request, authz: Authorizer) -> web.Response:
        index = await self._block(request, lambda: self._services_index)
        hidden = False
        with self._lock:
            names: dict[str, set[str]] = {}
            for service in self.services.values():
                if not self._in_namespace(service, request):
                    continue
                if not authz.can_read("service", service["Service"]):
                    hidden = True
                    continue
                names.setdefault(service["Service"], set()).update(service["Tags"] or [])
        document = {name: sorted(tags) for name, tags in sorted(names.items())}
        return self._json(document, index, filtered=hidden and not authz.anonymous)

    async def _health_service(self, request: web.Request, authz: Authorizer) -> web.Response:
        name = request.match_info["name"]
        index = await self._block(request, lambda: self._service_index.get(name, self._services_index))
        passing_only = "passing" in request.query
        tag = request.query.get("tag")
        hidden = False
        with self._lock:
            entries = []
            for (node, service_id), service in sorted(self.services.items()):
                if service["Service"] != name or not self._in_namespace(service, request):
                    continue
                if tag is not None and tag not in (service["Tags"] or []):
                    continue
                # Consul checks both: the service, and the node each instance runs on.
                if not authz.can_read("service", name) or not authz.can_read("node", node):
                    hidden = True
                    continue
                checks = [
                    dict(check)
                    for (owner, _), check in sorted(self.checks.items())
                    if owner == node and check["ServiceID"] in ("", service_id)
                ]
                if passing_only and any(check["Status"] != "passing" for check in checks):
                    continue
                entries.append({"Node": dict(self.nodes[node]), "Service": dict(service), "Checks": checks})
        return self._json(entries, index, filtered=hidden and not authz.anonymous)

    async def _catalog_node(self, request: web.Request, authz: Authorizer) -> web.Response:
        node = request.match_info["node"]
        index = await self._block(request, lambda: self.index)
        with self._lock:
            if node not in self.nodes:
                return self._json(None, index)
            if not authz.can_read("node", node):
                return self._json(None, index, filtered=not authz.anonymous)
            services = {
                sid: dict(service)
                for (owner, sid), service in self.services.items()
                if owner == node and authz.can_read("service", service["Service"])
            }
            hidden = len(services) < len([key for key in self.services if key[0] == node])
            document = {"Node": dict(self.nodes[node]), "Services": services}
        return self._json(document, index, filtered=hidden and not authz.anonymous)

    async def _catalog_nodes(self, request: web.Request, authz: Authorizer) -> web.Response:
        index = await self._block(request, lambda: self.index)
        with self._lock:
            nodes = [dict(node) for name, node in sorted(self.nodes.items()) if authz.can_read("node", name)]
            hidden = len(nodes) < len(self.nodes)
        return self._json(nodes, index, filtered=hidden and not authz.anonymous)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.text() or "{}")
        except json.JSONDecodeError as err:
            raise _RefusalError(400, f"Request decode failed: {err}") from None
        if not isinstance(body, dict):
            raise _RefusalError(400, "Request decode failed: json: cannot unmarshal into Go value of type object")
        return body

    def _strict(self, document: Any, fields: set[str]) -> None:
        """Refuse unknown fields, as Consul's decoder (DisallowUnknownFields) does."""
        if not isinstance(document, dict):
            return
        for key in document:
            lowered = key.lower()
            if lowered in fields or (self.enterprise and lowered in _ENTERPRISE_FIELDS):
                continue
            suffix = " - Namespaces are a Consul Enterprise feature" if lowered == "namespace" else ""
            raise _RefusalError(400, f'Request decode failed: json: unknown field "{key}"{suffix}')

    async def _catalog_register(self, request: web.Request, authz: Authorizer) -> web.Response:
        body = await self._body(request)
        self._strict(body, _REGISTER_FIELDS)
        service = _ci(body, "Service")
        self._strict(service, _SERVICE_FIELDS)
        checks = [_ci(body, "Check")] if _ci(body, "Check") else list(_ci(body, "Checks") or [])
        for check in checks:
            self._strict(check, _CHECK_FIELDS)
        if (_ci(body, "Datacenter") or self.datacenter) != self.datacenter:
            raise _RefusalError(500, "No path to datacenter")
        node, address, skip = _ci(body, "Node"), _ci(body, "Address"), bool(_ci(body, "SkipNodeUpdate"))
        if not node:
            raise _RefusalError(500, "Must provide node")
        if not address and not skip:
            raise _RefusalError(500, "Must provide address if SkipNodeUpdate is not set")
        normalized: dict[str, Any] | None = None
        if service is not None:
            name = _ci(service, "Service") or ""
            normalized = {
                "ID": _ci(service, "ID") or name,
                "Service": name,
                "Tags": _ci(service, "Tags") or [],
                "Address": _ci(service, "Address") or "",
                "Meta": _ci(service, "Meta"),
                "Port": int(_ci(service, "Port") or 0),
                "Weights": _ci(service, "Weights") or {"Passing": 1, "Warning": 1},
            }
            for optional in ("Namespace", "Locality"):
                if _ci(service, optional) is not None:
                    normalized[optional] = _ci(service, optional)
        normalized_checks = [
            {
                "CheckID": _ci(check, "CheckID") or "",
                "Name": _ci(check, "Name") or "",
                "Status": _ci(check, "Status") or "critical",
                "ServiceID": _ci(check, "ServiceID") or "",
            }
            for check in checks
        ]
        with self._lock:
            existing = self.nodes.get(node)
            node_meta, tagged = _ci(body, "NodeMeta"), _ci(body, "TaggedAddresses")
            if skip and existing is not None:
                address, node_meta, tagged = existing["Address"], existing["Meta"], existing["TaggedAddresses"]
            # Consul's order: the service first, then the node (when the registration changes it), then checks.
            if normalized is not None:
                authz.require_write("service", normalized["Service"])
                old = self.services.get((node, normalized["ID"]))
                if old is not None and old["Service"] != normalized["Service"]:
                    authz.require_write("service", old["Service"])
            if _changes_node(existing, address, node_meta, tagged):
                authz.require_write("node", node)
            for check in normalized_checks:
                if not check["ServiceID"]:
                    authz.require_write("node", node)
                    continue
                owner = self.services.get((node, check["ServiceID"]))
                if owner is None and (normalized is None or normalized["ID"] != check["ServiceID"]):
                    raise _RefusalError(
                        500, f"Unknown service ID '{check['ServiceID']}' for check ID '{check['CheckID']}'"
                    )
                authz.require_write("service", (owner or normalized or {})["Service"])
            self._put(node, address, node_meta, tagged, normalized, normalized_checks)
        return self._json(True)

    async def _catalog_deregister(self, request: web.Request, authz: Authorizer) -> web.Response:
        body = await self._body(request)
        self._strict(body, _DEREGISTER_FIELDS)
        node = _ci(body, "Node")
        if not node:
            raise _RefusalError(500, "Must provide node")
        service_id, check_id = _ci(body, "ServiceID"), _ci(body, "CheckID")
        with self._lock:
            # node:write on the node may remove anything on it; otherwise service:write on what goes.
            if authz.policy("node", node) != "write":
                if service_id:
                    service = self.services.get((node, service_id))
                    if service is None:
                        raise _RefusalError(500, f"Unknown service ID '{service_id}' for node '{node}'")
                    authz.require_write("service", service["Service"])
                else:
                    authz.require_write("node", node)
            if service_id:
                self._remove(node, service_id)
            elif check_id:
                self.checks.pop((node, check_id), None)
                self._services_index = self._bump()
            else:
                for owner, sid in [key for key in self.services if key[0] == node]:
                    self._remove(owner, sid)
                for key in [key for key in self.checks if key[0] == node]:
                    del self.checks[key]
                if self.nodes.pop(node, None) is not None:
                    self._services_index = self._bump()
        return self._json(True)

    # -- ACL tokens and policies (management token only) --------------------------------------------------

    async def _acl_policy_create(self, request: web.Request, authz: Authorizer) -> web.Response:
        authz.require_acl_write()
        body = await self._body(request)
        name, rules = _ci(body, "Name") or "", _ci(body, "Rules") or ""
        parsed = parse_rules(rules)
        with self._lock:
            if any(policy["Name"] == name for policy in self.policies.values()):
                raise _RefusalError(500, f'Invalid Policy: A Policy with Name "{name}" already exists')
            policy_id = str(uuid.uuid4())
            self.policies[policy_id] = {"ID": policy_id, "Name": name, "Rules": rules, "rules": parsed}
        return self._json({"ID": policy_id, "Name": name, "Rules": rules})

    async def _acl_policy_update(self, request: web.Request, authz: Authorizer) -> web.Response:
        authz.require_acl_write()
        body = await self._body(request)
        policy_id = request.match_info["id"]
        rules = _ci(body, "Rules") or ""
        parsed = parse_rules(rules)
        with self._lock:
            if policy_id not in self.policies:
                raise _RefusalError(500, f"Cannot find policy {policy_id}")
            name = _ci(body, "Name") or self.policies[policy_id]["Name"]
            self.policies[policy_id] = {"ID": policy_id, "Name": name, "Rules": rules, "rules": parsed}
        return self._json({"ID": policy_id, "Name": name, "Rules": rules})

    async def _acl_policy_delete(self, request: web.Request, authz: Authorizer) -> web.Response:
        authz.require_acl_write()
        with self._lock:
            self.policies.pop(request.match_info["id"], None)
        return self._json(True)

    async def _acl_token_create(self, request: web.Request, authz: Authorizer) -> web.Response:
        authz.require_acl_write()
        body = await self._body(request)
        policy_ids: list[str] = []
        with self._lock:
            for link in _ci(body, "Policies") or []:
                wanted_id, wanted_name = _ci(link, "ID"), _ci(link, "Name")
                found = next(
                    (
                        p
                        for p in self.policies.values()
                        if p["ID"] == wanted_id or (not wanted_id and p["Name"] == wanted_name)
                    ),
                    None,
                )
                if found is None:
                    raise _RefusalError(500, f'No such ACL policy with name "{wanted_name}"')
                policy_ids.append(found["ID"])
            accessor, secret = str(uuid.uuid4()), str(uuid.uuid4())
            self.tokens[secret] = {"AccessorID": accessor, "SecretID": secret, "PolicyIDs": policy_ids}
            links = [{"ID": pid, "Name": self.policies[pid]["Name"]} for pid in policy_ids]
        return self._json(
            {
                "AccessorID": accessor,
                "SecretID": secret,
                "Description": _ci(body, "Description") or "",
                "Policies": links,
            }
        )

    async def _acl_token_delete(self, request: web.Request, authz: Authorizer) -> web.Response:
        authz.require_acl_write()
        accessor = request.match_info["accessor"]
        with self._lock:
            for secret in [s for s, token in self.tokens.items() if token["AccessorID"] == accessor]:
                del self.tokens[secret]
        return self._json(True)
