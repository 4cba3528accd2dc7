"""A Kubernetes API server double, from the API reference and API concepts, checked against kube-apiserver.

``tests/test_catalog_kubernetes.py`` runs every test that both can answer
against this double and the real kube-apiserver (``tests/servers``), so where
both are tested they agree; the double stays for the faults the real server
will not produce on demand (410 Gone after compaction, 5xx, non-JSON bodies).

What it implements, as https://kubernetes.io/docs/reference/using-api/api-concepts/ documents:

* Services and ``discovery.k8s.io/v1`` EndpointSlices: ``GET`` collection
  (namespaced, or across namespaces) → ``<Kind>List`` with
  ``metadata.resourceVersion``; ``labelSelector`` with ``k=v``, ``k!=v``, ``k``.
* ``?watch=1``: a chunked stream of JSON events, one per line (``ADDED``,
  ``MODIFIED``, ``DELETED``, ``BOOKMARK`` with ``allowWatchBookmarks``),
  starting after ``resourceVersion`` (or, unset or "0", with synthetic
  ``ADDED`` events for what exists); ends after ``timeoutSeconds``. A
  ``resourceVersion`` older than the retained history gets an ``ERROR`` event
  carrying a ``Status`` with code 410 (reason ``Expired``), as the real server
  sends once the watch has started.
* ``POST`` (409 ``AlreadyExists``; 404 when the namespace does not exist),
  ``GET``/``PUT``/``DELETE`` by name (404 ``NotFound``; ``PUT`` with a stale
  ``metadata.resourceVersion`` → 409 ``Conflict``, without one it is
  unconditional; a ``PUT`` that changes nothing keeps the resourceVersion).
* Validation as the real server does it, answered 422 ``Invalid`` with its
  message shape and ``details.causes``: object names (a Service name is a
  DNS-1123 label, an EndpointSlice name a DNS-1123 subdomain), label keys and
  values, Service and EndpointSlice ports, EndpointSlice addresses (not
  loopback, unspecified, link-local or IPv4-mapped), immutable ``clusterIPs``
  and ``addressType``.
* Server-set fields: ``metadata.uid``/``creationTimestamp``/``resourceVersion``
  (and ``generation`` on EndpointSlices, ``conditions: {}`` on their endpoints); a Service's ``clusterIP(s)``,
  ``ipFamilies``, ``ipFamilyPolicy``, ``sessionAffinity``,
  ``internalTrafficPolicy``, ``type``, ports' ``protocol`` and ``targetPort``,
  kept across a ``PUT`` that leaves them out, as the real server keeps them.
* Namespaces, ServiceAccounts with ``TokenRequest`` (``.../serviceaccounts/NAME/token``),
  and RBAC (Roles, ClusterRoles and their bindings) stored as given.
* Authentication by bearer token: ``admin_token`` and ``token`` may do
  anything (``system:masters``); a ServiceAccount's token may do what its RBAC
  bindings allow, else 403 ``Forbidden`` with the real message (``services "x"
  is forbidden: User "system:serviceaccount:ns:sa" cannot create resource
  "services" in API group "" in the namespace "y"``); anything else → 401.

Test hooks (any thread; they bypass authentication and admission, as writing
to etcd would): :meth:`apply`, :meth:`delete`, :meth:`compact` (drop history
so older versions are 410 Gone), :meth:`fail_next`, :meth:`objects`,
:meth:`write_kubeconfig`. ``requests`` records every request,
``authorizations`` what each ServiceAccount was allowed to do.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import ipaddress
import json
import re
import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.doubles.server import BackgroundServer

Document = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class _Resource:
    group: str
    version: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    @property
    def qualified_kind(self) -> str:
        """``Kind.group`` as Invalid messages name it (``Service``, ``EndpointSlice.discovery.k8s.io``)."""
        return f"{self.kind}.{self.group}" if self.group else self.kind


_RBAC = "rbac.authorization.k8s.io"
_RESOURCES = {
    "namespaces": _Resource("", "v1", "Namespace", namespaced=False),
    "services": _Resource("", "v1", "Service", namespaced=True),
    "serviceaccounts": _Resource("", "v1", "ServiceAccount", namespaced=True),
    "endpointslices": _Resource("discovery.k8s.io", "v1", "EndpointSlice", namespaced=True),
    "roles": _Resource(_RBAC, "v1", "Role", namespaced=True),
    "rolebindings": _Resource(_RBAC, "v1", "RoleBinding", namespaced=True),
    "clusterroles": _Resource(_RBAC, "v1", "ClusterRole", namespaced=False),
    "clusterrolebindings": _Resource(_RBAC, "v1", "ClusterRoleBinding", namespaced=False),
}
# What a fresh cluster holds (the controller-manager would add each namespace's "default" ServiceAccount).
_INITIAL_NAMESPACES = ("default", "kube-node-lease", "kube-public", "kube-system")
_MASTERS = "system:masters"
_SERVICE_RANGE = ipaddress.ip_network("10.96.0.0/16")


def _status(code: int, reason: str, message: str, details: Document | None = None) -> web.Response:
    body: Document = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return web.json_response(body, status=code)


def _details(resource: _Resource, plural: str, name: str) -> Document:
    details: Document = {"name": name, "kind": plural} if name else {"kind": plural}
    if resource.group:
        details["group"] = resource.group
    return details


def _qualified_resource(resource: _Resource, plural: str) -> str:
    return f"{plural}.{resource.group}" if resource.group else plural


def _not_found(resource: _Resource, plural: str, name: str) -> web.Response:
    message = f'{_qualified_resource(resource, plural)} "{name}" not found'
    return _status(404, "NotFound", message, _details(resource, plural, name))


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


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- validation, as k8s.io/apimachinery words it ---------------------------------------------------------


def _regex_error(message: str, fmt: str, *examples: str) -> str:
    """apimachinery's RegexError, spacing included."""
    if not examples:
        return f"{message} (regex used for validation is '{fmt}')"
    shown = " or ".join(f"'{example}', " for example in examples)
    return f"{message} (e.g. {shown}regex used for validation is '{fmt}')"


_DNS1123_LABEL_FMT = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN_FMT = _DNS1123_LABEL_FMT + r"(\." + _DNS1123_LABEL_FMT + ")*"
_LABEL_KEY_FMT = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_LABEL_VALUE_FMT = f"({_LABEL_KEY_FMT})?"
_LABEL_KEY_MESSAGE = (
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
)


def _dns1123_label(value: str) -> list[str]:
    errors = ["must be no more than 63 characters"] if len(value) > 63 else []
    if not re.fullmatch(_DNS1123_LABEL_FMT, value):
        if re.fullmatch(_DNS1123_SUBDOMAIN_FMT, value):
            errors.append("must not contain dots")
        else:
            message = (
                "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
                "start and end with an alphanumeric character"
            )
            errors.append(_regex_error(message, _DNS1123_LABEL_FMT, "my-name", "123-abc"))
    return errors


def _dns1123_subdomain(value: str) -> list[str]:
    errors = ["must be no more than 253 characters"] if len(value) > 253 else []
    if not re.fullmatch(_DNS1123_SUBDOMAIN_FMT, value):
        message = (
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must "
            "start and end with an alphanumeric character"
        )
        errors.append(_regex_error(message, _DNS1123_SUBDOMAIN_FMT, "example.com"))
    return errors


def _label_key(value: str) -> list[str]:
    errors: list[str] = []
    parts = value.split("/")
    if len(parts) > 2:
        return [
            "a valid label key "
            + _regex_error(_LABEL_KEY_MESSAGE, _LABEL_KEY_FMT, "MyName", "my.name", "123-abc")
            + " with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        ]
    name = parts[-1]
    if len(parts) == 2:
        if not parts[0]:
            errors.append("prefix part must be non-empty")
        else:
            errors += [f"prefix part {message}" for message in _dns1123_subdomain(parts[0])]
    if not name:
        errors.append("name part must be non-empty")
    elif len(name) > 63:
        errors.append("name part must be no more than 63 characters")
    if not re.fullmatch(_LABEL_KEY_FMT, name):
        errors.append("name part " + _regex_error(_LABEL_KEY_MESSAGE, _LABEL_KEY_FMT, "MyName", "my.name", "123-abc"))
    return errors


def _label_value(value: str) -> list[str]:
    errors = ["must be no more than 63 characters"] if len(value) > 63 else []
    if not re.fullmatch(_LABEL_VALUE_FMT, value):
        message = (
            "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must "
            "start and end with an alphanumeric character"
        )
        errors.append(_regex_error(message, _LABEL_VALUE_FMT, "MyValue", "my_value", "12345"))
    return errors


class _Invalid:
    """A field.ErrorList: each cause as the API reports it."""

    def __init__(self) -> None:
        self.causes: list[Document] = []

    def invalid(self, path: str, value: Any, detail: str) -> None:
        # Go's rendering: %q for strings, %v for numbers and booleans, JSON for the rest.
        if isinstance(value, bool):
            shown = str(value).lower()
        elif isinstance(value, int | float):
            shown = str(value)
        else:
            shown = json.dumps(value, separators=(",", ":"))
        message = f"Invalid value: {shown}: {detail}"
        self.causes.append({"reason": "FieldValueInvalid", "message": message, "field": path})

    def required(self, path: str, detail: str = "") -> None:
        message = f"Required value: {detail}" if detail else "Required value"
        self.causes.append({"reason": "FieldValueRequired", "message": message, "field": path})

    def unsupported(self, path: str, value: str, supported: list[str]) -> None:
        choices = ", ".join(json.dumps(choice) for choice in supported)
        message = f"Unsupported value: {json.dumps(value)}: supported values: {choices}"
        self.causes.append({"reason": "FieldValueNotSupported", "message": message, "field": path})

    def duplicate(self, path: str, value: Any) -> None:
        shown = json.dumps(value) if isinstance(value, str) else value
        self.causes.append({"reason": "FieldValueDuplicate", "message": f"Duplicate value: {shown}", "field": path})

    def response(self, resource: _Resource, name: str) -> web.Response | None:
        if not self.causes:
            return None
        messages = list(dict.fromkeys(f"{cause['field']}: {cause['message']}" for cause in self.causes))
        summary = messages[0] if len(messages) == 1 else "[" + ", ".join(messages) + "]"
        details: Document = {"name": name, "kind": resource.kind, "causes": self.causes}
        if resource.group:
            details["group"] = resource.group
        return _status(422, "Invalid", f'{resource.qualified_kind} "{name}" is invalid: {summary}', details)


def _validate_metadata(errors: _Invalid, document: Document, name_rule: Callable[[str], list[str]]) -> None:
    metadata = document.get("metadata") or {}
    name = metadata.get("name") or ""
    if not name:
        errors.required("metadata.name", "name or generateName is required")
    for message in name_rule(name) if name else []:
        errors.invalid("metadata.name", name, message)
    for key, value in (metadata.get("labels") or {}).items():
        for message in _label_key(key):
            errors.invalid("metadata.labels", key, message)
        for message in _label_value(str(value)):
            errors.invalid("metadata.labels", value, message)
    for key in metadata.get("annotations") or {}:
        for message in _label_key(key):
            errors.invalid("metadata.annotations", key, message)


def _validate_port(errors: _Invalid, path: str, port: Document, *, name_required: bool, names: set[str]) -> None:
    name = port.get("name") or ""
    if name_required and not name:
        errors.required(f"{path}.name")
    elif name:
        for message in _dns1123_label(name):
            errors.invalid(f"{path}.name", name, message)
        if name in names:
            errors.duplicate(f"{path}.name", name)
        names.add(name)
    number = port.get("port")
    if not isinstance(number, int) or not 1 <= number <= 65535:
        errors.invalid(f"{path}.port", number, "must be between 1 and 65535, inclusive")
    if port.get("protocol") not in ("TCP", "UDP", "SCTP"):
        errors.unsupported(f"{path}.protocol", str(port.get("protocol")), ["SCTP", "TCP", "UDP"])


def _validate_service(document: Document, old: Document | None) -> _Invalid:
    errors = _Invalid()
    # kube-apiserver 1.37 takes any DNS-1123 label as a Service name; older ones wanted DNS-1035 (no leading digit).
    _validate_metadata(errors, document, _dns1123_label)
    spec = document.get("spec") or {}
    ports = spec.get("ports") or []
    names: set[str] = set()
    for index, port in enumerate(ports):
        _validate_port(errors, f"spec.ports[{index}]", port, name_required=len(ports) > 1, names=names)
    if old is not None:
        before = (old.get("spec") or {}).get("clusterIPs") or []
        if before and (spec.get("clusterIPs") or [])[:1] != before[:1]:
            errors.invalid("spec.clusterIPs[0]", spec.get("clusterIPs"), "may not change once set")
    return errors


def _validate_endpoint_slice(document: Document, old: Document | None) -> _Invalid:
    errors = _Invalid()
    _validate_metadata(errors, document, _dns1123_subdomain)
    family = document.get("addressType")
    if family not in ("IPv4", "IPv6", "FQDN"):
        errors.unsupported("addressType", str(family), ["FQDN", "IPv4", "IPv6"])
    names: set[str] = set()
    for index, port in enumerate(document.get("ports") or []):
        _validate_port(errors, f"ports[{index}]", port, name_required=False, names=names)
    for index, entry in enumerate(document.get("endpoints") or []):
        path = f"endpoints[{index}].addresses"
        addresses = entry.get("addresses") or []
        if not addresses:
            errors.required(path, "must contain at least 1 address")
        for position, address in enumerate(addresses):
            _validate_endpoint_address(errors, f"{path}[{position}]", path, address, str(family))
    if old is not None and old.get("addressType") != family:
        errors.invalid("addressType", None, "field is immutable")  # the real server shows null, not the value
    return errors


_LINK_LOCAL_MULTICAST = (ipaddress.ip_network("224.0.0.0/24"), ipaddress.ip_network("ff02::/16"))


def _validate_endpoint_address(errors: _Invalid, path: str, family_path: str, address: str, family: str) -> None:
    if family not in ("IPv4", "IPv6"):
        return
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        errors.invalid(path, address, "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)")
        return
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None and family == "IPv6":
        errors.invalid(path, address, "must not be an IPv4-mapped IPv6 address")
        return
    if f"IPv{ip.version}" != family:
        errors.invalid(family_path, address, f"must be an {family} address")
    # ValidateEndpointIP, in this order.
    if ip.is_unspecified:
        errors.invalid(path, address, f"may not be unspecified ({address})")
    if ip.is_loopback:
        errors.invalid(path, address, "may not be in the loopback range (127.0.0.0/8, ::1/128)")
    if ip.is_link_local:
        errors.invalid(path, address, "may not be in the link-local range (169.254.0.0/16, fe80::/10)")
    if any(ip in network for network in _LINK_LOCAL_MULTICAST if network.version == ip.version):
        errors.invalid(path, address, "may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)")


_VALIDATORS: dict[str, Callable[[Document, Document | None], _Invalid]] = {
    "services": _validate_service,
    "endpointslices": _validate_endpoint_slice,
}


# -- RBAC ---------------------------------------------------------------------------------------------------


def _same_content(new: Document, old: Document) -> bool:
    """Whether an update changes nothing but what the server keeps anyway."""

    def content(document: Document) -> Document:
        trimmed = copy.deepcopy(document)
        metadata = trimmed.setdefault("metadata", {})
        for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields", "namespace"):
            metadata.pop(key, None)
        for key in ("labels", "annotations"):
            if not metadata.get(key):
                metadata.pop(key, None)
        trimmed.pop("apiVersion", None)
        trimmed.pop("kind", None)
        return trimmed

    return content(new) == content(old)


def _rule_allows(rule: Document, verb: str, group: str, resource: str) -> bool:
    return (
        any(value in ("*", group) for value in rule.get("apiGroups") or [])
        and any(value in ("*", resource) for value in rule.get("resources") or [])
        and any(value in ("*", verb) for value in rule.get("verbs") or [])
    )


def _binds(binding: Document, user: str, groups: list[str]) -> bool:
    for subject in binding.get("subjects") or []:
        kind = subject.get("kind")
        if kind == "ServiceAccount" and user == f"system:serviceaccount:{subject.get('namespace')}:{subject['name']}":
            return True
        if (kind == "User" and subject.get("name") == user) or (kind == "Group" and subject.get("name") in groups):
            return True
    return False


class KubernetesDouble:
    """Services, EndpointSlices, namespaces, ServiceAccounts and RBAC behind a real HTTP server on loopback."""

    def __init__(
        self,
        *,
        token: str | None = "double-token",
        admin_token: str = "double-admin-token",
        bookmark_interval: float = 0.5,
    ) -> None:
        self.token = token
        self.admin_token = admin_token
        self.bookmark_interval = bookmark_interval
        self._lock = threading.Lock()
        self.resource_version = 100
        self._oldest = 100  # events after this version are retained
        self._store: dict[tuple[str, str, str], Document] = {}
        self._events: list[tuple[int, str, str, Document]] = []  # (version, kind, type, object)
        self._failures: list[tuple[int, str]] = []
        self._service_accounts: dict[str, str] = {}  # token -> user
        self._next_cluster_ip = 10
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        # (user, verb, group, resource, namespace) of each request RBAC allowed a ServiceAccount.
        self.authorizations: list[tuple[str, str, str, str, str]] = []
        self._changed: asyncio.Event | None = None
        for namespace in _INITIAL_NAMESPACES:
            self._write("namespaces", ("namespaces", "", namespace), self._namespace_document(namespace), "ADDED")
        app = web.Application()
        for plural, resource in _RESOURCES.items():
            collection = f"{resource.prefix}/namespaces/{{namespace}}/{plural}" if resource.namespaced else None
            everywhere = f"{resource.prefix}/{plural}"
            app.router.add_get(everywhere, self._list(plural))
            if collection is None:
                collection = everywhere
            else:
                app.router.add_get(collection, self._list(plural))
            app.router.add_post(collection, self._create(plural))
            app.router.add_get(f"{collection}/{{name}}", self._get(plural))
            app.router.add_put(f"{collection}/{{name}}", self._replace(plural))
            app.router.add_delete(f"{collection}/{{name}}", self._delete(plural))
        app.router.add_post("/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", self._token_request)
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

    def write_kubeconfig(self, path: Path, token: str | None = None) -> Path:
        """A kubeconfig whose current context points at this double (JSON is valid YAML), as ``token``'s user."""
        token = token or self.token
        user: Document = {"token": token} if token else {}
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
        """Create or replace ``document`` (kind from its ``kind``), with no admission (not even validation)."""
        plural = next(plural for plural, resource in _RESOURCES.items() if resource.kind == document["kind"])
        metadata = document["metadata"]
        namespace = metadata.get("namespace", "default") if _RESOURCES[plural].namespaced else ""
        with self._lock:
            key = (plural, namespace, metadata["name"])
            stored = self._write(plural, key, copy.deepcopy(document), "MODIFIED" if key in self._store else "ADDED")
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

    def _write(self, plural: str, key: tuple[str, str, str], document: Document, event: str) -> Document:
        self.resource_version += 1
        resource = _RESOURCES[plural]
        old = self._store.get(key)
        old_metadata = (old or {}).get("metadata") or {}
        metadata = document.setdefault("metadata", {})
        metadata.update(
            name=key[2],
            resourceVersion=str(self.resource_version),
            uid=old_metadata.get("uid") or str(uuid.uuid4()),
            creationTimestamp=old_metadata.get("creationTimestamp") or _now(),
        )
        if resource.namespaced:
            metadata["namespace"] = key[1]
        if plural == "endpointslices":
            changed = old is None or any(old.get(field) != document.get(field) for field in ("endpoints", "ports"))
            metadata["generation"] = int(old_metadata.get("generation") or 0) + (1 if changed else 0)
        document["apiVersion"], document["kind"] = resource.api_version, resource.kind
        self._store[key] = document
        self._events.append((self.resource_version, plural, event, copy.deepcopy(document)))
        return copy.deepcopy(document)

    def _remove(self, plural: str, key: tuple[str, str, str]) -> Document | None:
        document = self._store.pop(key, None)
        if document is None:
            return None
        self.resource_version += 1
        document["metadata"]["resourceVersion"] = str(self.resource_version)
        self._events.append((self.resource_version, plural, "DELETED", copy.deepcopy(document)))
        if plural == "namespaces":
            # The namespace controller deletes what the namespace held.
            for inner in [k for k in self._store if k[1] == key[2] and _RESOURCES[k[0]].namespaced]:
                self._remove(inner[0], inner)
        return document

    def _notify(self) -> None:
        def wake() -> None:
            assert self._changed is not None
            self._changed.set()
            self._changed = asyncio.Event()

        self._server.loop.call_soon_threadsafe(wake)

    @staticmethod
    def _namespace_document(name: str) -> Document:
        return {
            "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }

    def _defaults(self, plural: str, document: Document, old: Document | None) -> None:
        """The fields the real server sets, kept from ``old`` on an update that leaves them out."""
        if plural == "services":
            spec = document.setdefault("spec", {})
            old_spec = (old or {}).get("spec") or {}
            spec.setdefault("type", "ClusterIP")
            if "clusterIP" not in spec:
                if old_spec.get("clusterIP"):
                    spec["clusterIP"] = old_spec["clusterIP"]
                else:
                    spec["clusterIP"] = str(_SERVICE_RANGE[self._next_cluster_ip])
                    self._next_cluster_ip += 1
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
            spec.setdefault("ipFamilies", old_spec.get("ipFamilies") or ["IPv4"])
            spec.setdefault("ipFamilyPolicy", old_spec.get("ipFamilyPolicy") or "SingleStack")
            spec.setdefault("sessionAffinity", "None")
            spec.setdefault("internalTrafficPolicy", "Cluster")
            for port in spec.get("ports") or []:
                port.setdefault("protocol", "TCP")
                port.setdefault("targetPort", port.get("port"))
            document.setdefault("status", {"loadBalancer": {}})
        elif plural == "endpointslices":
            for port in document.get("ports") or []:
                port.setdefault("protocol", "TCP")
            for entry in document.get("endpoints") or []:
                entry.setdefault("conditions", {})
        elif plural == "namespaces":
            document.setdefault("spec", {"finalizers": ["kubernetes"]})
            document.setdefault("status", {"phase": "Active"})
            name = (document.get("metadata") or {}).get("name", "")
            document["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = name

    # -- HTTP ---------------------------------------------------------------------------------------------

    def _user(self, request: web.Request) -> tuple[str, list[str]] | None:
        header = request.headers.get("Authorization", "")
        presented = header.removeprefix("Bearer ") if header.startswith("Bearer ") else None
        if presented == self.admin_token:
            return "meshfed-test-admin", [_MASTERS]
        if self.token is None or presented == self.token:
            return "meshfed", [_MASTERS]
        user = self._service_accounts.get(presented or "")
        if user is None:
            return None
        namespace = user.split(":")[2]
        return user, ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"]

    def _allowed(self, user: str, groups: list[str], verb: str, group: str, resource: str, namespace: str) -> bool:
        if _MASTERS in groups:
            return True
        with self._lock:
            bindings = [
                item
                for (plural, ns, _), item in self._store.items()
                if plural == "clusterrolebindings" or (plural == "rolebindings" and namespace and ns == namespace)
            ]
            for binding in bindings:
                if not _binds(binding, user, groups):
                    continue
                ref = binding.get("roleRef") or {}
                if ref.get("kind") == "ClusterRole":
                    role = self._store.get(("clusterroles", "", ref.get("name", "")))
                else:
                    role = self._store.get(("roles", binding["metadata"]["namespace"], ref.get("name", "")))
                if role and any(_rule_allows(rule, verb, group, resource) for rule in role.get("rules") or []):
                    self.authorizations.append((user, verb, group, resource, namespace))
                    return True
        return False

    def _admit(self, request: web.Request, verb: str, plural: str, name: str = "") -> web.Response | None:
        self.requests.append((request.method, request.path, dict(request.query)))
        who = self._user(request)
        if who is None:
            return _status(401, "Unauthorized", "Unauthorized")
        resource = _RESOURCES.get(plural)
        namespace = request.match_info.get("namespace", "")
        group = resource.group if resource else ""
        if not self._allowed(*who, verb, group, plural, namespace):
            where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
            reason = f'User "{who[0]}" cannot {verb} resource "{plural}" in API group "{group}" {where}'
            qualified = f"{plural}.{group}" if group else plural
            subject = f'{qualified} "{name}"' if name else qualified
            details: Document = {"name": name, "kind": plural} if name else {"kind": plural}
            if group:
                details["group"] = group
            return _status(403, "Forbidden", f"{subject} is forbidden: {reason}", details)
        with self._lock:
            failure = self._failures.pop(0) if self._failures else None
        if failure is None:
            return None
        status, body = failure
        if body:
            return web.Response(status=status, text=body, content_type="application/json")
        return _status(status, "InternalError", 'an error on the server ("injected by the test") has prevented it')

    def _list(self, plural: str) -> Handler:
        resource = _RESOURCES[plural]

        async def handler(request: web.Request) -> web.StreamResponse:
            watch = _go_bool(request.query.get("watch"))
            if (refusal := self._admit(request, "watch" if watch else "list", plural)) is not None:
                return refusal
            namespace = request.match_info.get("namespace")
            selector = request.query.get("labelSelector")
            if watch:
                try:
                    return await self._watch(request, plural, namespace, selector)
                except (ConnectionResetError, asyncio.CancelledError):
                    # The client went away (or the double is closing): a watch simply ends.
                    return web.Response()
            with self._lock:
                items = [
                    copy.deepcopy(item)
                    for (k, ns, _), item in sorted(self._store.items())
                    if k == plural
                    and namespace in (None, ns)
                    and _matches(item["metadata"].get("labels") or {}, selector)
                ]
                version = str(self.resource_version)
            body = {
                "kind": f"{resource.kind}List",
                "apiVersion": resource.api_version,
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
                    resource = _RESOURCES[kind]
                    with self._lock:
                        cursor = max(cursor, self.resource_version) if not self._pending_after(cursor) else cursor
                    await send(
                        "BOOKMARK",
                        {
                            "kind": resource.kind,
                            "apiVersion": resource.api_version,
                            "metadata": {"resourceVersion": str(cursor)},
                        },
                    )
        return response

    def _pending_after(self, cursor: int) -> bool:
        return any(event[0] > cursor for event in self._events)

    def _key(self, plural: str, request: web.Request, name: str) -> tuple[str, str, str]:
        return plural, request.match_info.get("namespace", ""), name

    def _create(self, plural: str) -> Handler:
        resource = _RESOURCES[plural]

        async def handler(request: web.Request) -> web.StreamResponse:
            if (refusal := self._admit(request, "create", plural)) is not None:
                return refusal
            body = await request.json()
            name = str((body.get("metadata") or {}).get("name") or "")
            key = self._key(plural, request, name)
            if resource.namespaced:
                with self._lock:
                    exists = ("namespaces", "", key[1]) in self._store
                if not exists:
                    return _not_found(_RESOURCES["namespaces"], "namespaces", key[1])
            with self._lock:
                self._defaults(plural, body, None)  # defaulting comes before validation, as in the real server
            validator = _VALIDATORS.get(plural)
            if validator is not None and (refused := validator(body, None).response(resource, name)) is not None:
                return refused
            if not name:
                unnamed = _Invalid()
                unnamed.required("metadata.name", "name or generateName is required")
                return unnamed.response(resource, name) or web.Response(status=500)
            with self._lock:
                if key in self._store:
                    message = f'{_qualified_resource(resource, plural)} "{name}" already exists'
                    return _status(409, "AlreadyExists", message, _details(resource, plural, name))
                stored = self._write(plural, key, body, "ADDED")
            self._notify()
            return web.json_response(stored, status=201)

        return handler

    def _get(self, plural: str) -> Handler:
        resource = _RESOURCES[plural]

        async def handler(request: web.Request) -> web.StreamResponse:
            name = request.match_info["name"]
            if (refusal := self._admit(request, "get", plural, name)) is not None:
                return refusal
            with self._lock:
                item = copy.deepcopy(self._store.get(self._key(plural, request, name)))
            if item is None:
                return _not_found(resource, plural, name)
            return web.json_response(item)

        return handler

    def _replace(self, plural: str) -> Handler:
        resource = _RESOURCES[plural]

        async def handler(request: web.Request) -> web.StreamResponse:
            name = request.match_info["name"]
            if (refusal := self._admit(request, "update", plural, name)) is not None:
                return refusal
            body = await request.json()
            key = self._key(plural, request, name)
            with self._lock:
                current = copy.deepcopy(self._store.get(key))
            if current is None:
                return _not_found(resource, plural, name)
            # Without metadata.resourceVersion an update is unconditional (Services and EndpointSlices allow it).
            wanted = (body.get("metadata") or {}).get("resourceVersion")
            self._defaults(plural, body, current)
            validator = _VALIDATORS.get(plural)
            if validator is not None and (refused := validator(body, current).response(resource, name)) is not None:
                return refused
            with self._lock:
                if wanted and wanted != self._store[key]["metadata"]["resourceVersion"]:
                    return _status(
                        409,
                        "Conflict",
                        f"Operation cannot be fulfilled on {_qualified_resource(resource, plural)} {json.dumps(name)}: "
                        "the object has been modified; please apply your changes to the latest version and try again",
                        _details(resource, plural, name),
                    )
                if _same_content(body, self._store[key]):
                    # A no-op update writes nothing: the resourceVersion stays, no event is sent.
                    return web.json_response(copy.deepcopy(self._store[key]))
                stored = self._write(plural, key, body, "MODIFIED")
            self._notify()
            return web.json_response(stored)

        return handler

    def _delete(self, plural: str) -> Handler:
        resource = _RESOURCES[plural]

        async def handler(request: web.Request) -> web.StreamResponse:
            name = request.match_info["name"]
            if (refusal := self._admit(request, "delete", plural, name)) is not None:
                return refusal
            key = self._key(plural, request, name)
            with self._lock:
                removed = self._remove(plural, key)
            if removed is None:
                return _not_found(resource, plural, name)
            self._notify()
            return web.json_response(
                {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": {"name": name}}
            )

        return handler

    async def _token_request(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if (refusal := self._admit(request, "create", "serviceaccounts/token", name)) is not None:
            return refusal
        namespace = request.match_info["namespace"]
        with self._lock:
            exists = ("serviceaccounts", namespace, name) in self._store
        if not exists:
            return _not_found(_RESOURCES["serviceaccounts"], "serviceaccounts", name)
        token = f"sa-{uuid.uuid4().hex}"
        self._service_accounts[token] = f"system:serviceaccount:{namespace}:{name}"
        body = {
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 3600},
            "status": {"token": token, "expirationTimestamp": _now()},
        }
        return web.json_response(body, status=201)


def service(
    name: str,
    namespace: str = "default",
    ports: dict[str, int] | None = None,
    labels: dict[str, str] | None = None,
    selector: dict[str, str] | None = None,
) -> Document:
    """A Service as a user would apply it; selector-less unless given one (its endpoints then come from slices)."""
    spec: Document = {
        "type": "ClusterIP",
        "ports": [
            {"name": port_name, "port": port, "protocol": "TCP"} for port_name, port in (ports or {"http": 80}).items()
        ],
    }
    if selector:
        spec["selector"] = selector
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": spec,
    }


def endpoint_slice(
    service_name: str,
    endpoints: list[tuple[str, bool | None, str]],
    port: int,
    port_name: str = "http",
    namespace: str = "default",
    suffix: str = "abcde",
) -> Document:
    """An EndpointSlice of a selector-less Service, as its owner writes it: (address, ready, zone) per endpoint.

    Labelled managed-by ``tests.meshfed.io``: the real EndpointSlice controller would reconcile away a slice
    claiming to be its own.
    """
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
                "endpointslice.kubernetes.io/managed-by": "tests.meshfed.io",
            },
        },
        "addressType": "IPv4",
        "endpoints": items,
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
    }
