"""The Consul catalog source (the HTTP API, through py-consul's asyncio client).

Listing follows Consul's blocking-query rules
(https://developer.hashicorp.com/consul/api-docs/features/blocking):

* one blocking query on ``/v1/catalog/services`` learns which services exist;
  one per service on ``/v1/health/service/<name>`` learns their instances and
  checks; each passes the last ``X-Consul-Index`` as ``index`` with a ``wait``;
* an index that goes backwards (a snapshot restore, a rebuilt cluster) means
  the server's history is gone: start again from scratch with a non-blocking
  query; an index of 0 is treated as 1 so the next query still blocks;
* a wake-up may be spurious, so results are compared, not trusted to differ;
* errors back off exponentially and keep the last good snapshot.

Reads and writes go through py-consul's HTTP client (its aiohttp session and
its status-to-exception mapping) but not its endpoint wrappers: those hide the
``X-Consul-Results-Filtered-By-Acls`` header, and ``catalog.register`` /
``deregister`` put the token into the JSON body as ``WriteRequest``, which a
Consul with ACLs refuses (``Request decode failed: json: unknown field
"WriteRequest"``), and send node meta as a query filter that register ignores.
The token travels in the ``X-Consul-Token`` header only.

ACLs: Consul does not refuse a read the token may not make, it filters the
answer, and says so in ``X-Consul-Results-Filtered-By-Acls`` (never for the
anonymous token). A filtered answer is published as it is (it is all Consul
shows) and reported in :attr:`ConsulCatalog.last_error`, logged once. The rules
meshfed's token needs are in ``helm/meshfed/examples/consul-acl-policy.hcl``.

Mapping: a Consul service is a meshfed :class:`Service` in its Consul
Enterprise namespace (``default`` otherwise). Its one port is named by the
``meshfed-port-name`` service meta (``default`` otherwise). An instance's
address is ``Service.Address`` or else ``Node.Address``; it is healthy when
every check (node and service) is ``passing``; its labels are the service
meta plus ``key=value`` tags; its weight is ``Weights.Passing``; its locality
is ``Service.Locality`` (Consul 1.17+).

Imports are registered through the catalog API (``/v1/catalog/register``) on
one synthetic node per zone, ``meshfed-<zone>``, the way consul-k8s catalog
sync registers external services: no local agent is needed, and listing that
node finds everything meshfed owns. Each import ``<service>.<namespace>.<peer>``
becomes the Consul service ``<service>-<peer>`` (``<service>-<namespace>-<peer>``
outside namespace ``default``): Consul accepts dots in names, but its DNS
interface cannot serve them, and Consul DNS is how many clients look. The
service meta ``meshfed-managed=true`` marks what meshfed owns; listing skips
those (an import is never re-exported) and publishing removes stale ones.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
import consul
import consul.aio
from consul.callback import CB
from pydantic import ValidationError

from meshfed.aio import cancel_and_wait
from meshfed.catalog.model import CatalogSnapshot, Endpoint, LocalImport, Locality, Service
from meshfed.catalog.remote import Backoff, SnapshotCache
from meshfed.catalog.settings import ConsulSettings
from meshfed.errors import CatalogError
from meshfed.validation import describe_validation_error

log = logging.getLogger(__name__)

MANAGED_META = "meshfed-managed"
PORT_NAME_META = "meshfed-port-name"
DEFAULT_PORT_NAME = "default"
_MESHFED_META_PREFIX = "meshfed-"
# The synthetic node's meta, as consul-k8s catalog sync and consul-esm expect of an external node.
_NODE_META = {MANAGED_META: "true", "external-node": "true", "external-probe": "false"}
# Named in error hints: the one place that says which ACL rules meshfed's token needs.
ACL_POLICY_FILE = "helm/meshfed/examples/consul-acl-policy.hcl"
_FILTERED_HEADER = "X-Consul-Results-Filtered-By-Acls"
# Consul's 403 names the missing permission: lacks permission 'service:write' on "api-west".
_MISSING_PERMISSION = re.compile(r"lacks permission '(\w+):(\w+)'(?: on \"([^\"]*)\")?")


@dataclass(frozen=True)
class _Answer:
    """A Consul read: the raw ``X-Consul-Index``, the decoded body (None on 404), and what ACLs hid."""

    index: str | None
    body: Any
    filtered: bool
    default_deny: bool


def _answer(response: Any) -> _Answer:
    body = CB.json()(response)  # raises py-consul's exceptions on 4xx/5xx and on bodies that are not JSON
    headers = response.headers  # case-insensitive (aiohttp)
    return _Answer(
        index=headers.get("X-Consul-Index"),
        body=body,
        filtered=headers.get(_FILTERED_HEADER, "").lower() == "true",
        default_deny=headers.get("X-Consul-Default-Acl-Policy", "").lower() == "deny",
    )


class _HTTPClient(consul.aio.HTTPClient):  # type: ignore[misc]
    """py-consul's aiohttp client, adding the Enterprise ``ns`` / ``partition`` query parameters to every call."""

    extra_params: tuple[tuple[str, str], ...] = ()

    def uri(self, path: str, params: list[tuple[str, Any]] | None = None) -> str:
        uri: str = super().uri(path, params)
        if not self.extra_params:
            return uri
        return f"{uri}{'&' if '?' in uri else '?'}{urlencode(self.extra_params)}"


class _Consul(consul.aio.Consul):  # type: ignore[misc]
    def __init__(self, *, extra_params: list[tuple[str, str]], **kwargs: Any) -> None:
        self._extra_params = extra_params
        super().__init__(**kwargs)

    def http_connect(self, host: str, port: int, scheme: str, verify: bool | str = True, cert: Any = None) -> Any:
        client = _HTTPClient(
            host,
            port,
            scheme,
            connections_timeout=self.connections_timeout,
            verify=verify,
            cert=cert,
        )
        client.extra_params = tuple(self._extra_params)
        return client


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
        self._settings = settings
        self._zone = zone
        self._wait = blocking_wait
        self._initial_sync_timeout = initial_sync_timeout
        self._backoff = backoff
        self.address = settings.address
        self.node = f"meshfed-{zone}"
        self._token = _read_token(settings.token_file)
        self._cache = SnapshotCache(f"Consul at {self.address}")
        self._client: _Consul | None = None
        self._main: asyncio.Task[None] | None = None
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._services: dict[str, list[Service]] = {}
        self._listed = False
        self._skipped: set[str] = set()
        self._warned_anonymous = False

    # -- the CatalogSource interface -------------------------------------------------------------------

    async def snapshot(self) -> CatalogSnapshot:
        self._start()
        return await self._cache.first(self._initial_sync_timeout)

    async def watch(self, since: int, timeout: float) -> CatalogSnapshot:
        self._start()
        return await self._cache.newer(since, timeout)

    async def publish_imports(self, imports: list[LocalImport]) -> None:
        """Register exactly ``imports`` on node ``meshfed-<zone>``; deregister what meshfed registered before."""
        desired = {registration["ID"]: registration for registration in map(self._registration, imports)}
        path = f"/v1/catalog/node/{self.node}"
        try:
            answer = await self._get(path)
            if answer.filtered:
                # What the token cannot see would be registered again on every pass, and never removed when stale.
                raise CatalogError(f"cannot register imports: {self._hidden(path)}")
            node: Mapping[str, Any] = answer.body if isinstance(answer.body, dict) else {}
            existing: Mapping[str, Any] = node.get("Services") or {}
            # A node registered without its meta (meshfed before NodeMeta went into the body) is rewritten once.
            node_current = (node.get("Node") or {}).get("Meta") == _NODE_META
            owned = {
                service_id: service
                for service_id, service in existing.items()
                if (service.get("Meta") or {}).get(MANAGED_META) == "true"
            }
            for service_id, registration in desired.items():
                if node_current and _same_registration(owned.get(service_id), registration):
                    continue
                await self._put(
                    "/v1/catalog/register",
                    {
                        "Node": self.node,
                        "Address": registration["Address"],
                        "NodeMeta": _NODE_META,
                        "Service": registration,
                    },
                )
                node_current = True
            for service_id in owned.keys() - desired.keys():
                await self._put("/v1/catalog/deregister", {"Node": self.node, "ServiceID": service_id})
        except (consul.ConsulException, aiohttp.ClientError, TimeoutError) as err:
            raise CatalogError(f"cannot register imports: {self._describe(err)}") from None

    async def aclose(self) -> None:
        await cancel_and_wait(self._main, *self._watchers.values())
        self._main, self._watchers = None, {}
        if self._client is not None:
            await self._client.close()
            self._client = None

    @property
    def last_error(self) -> str | None:
        """What the last failed query said, or None while Consul answers."""
        return self._cache.last_error

    @property
    def recent_errors(self) -> list[str]:
        """The last few distinct failures, oldest first, including ones that have since healed."""
        return list(self._cache.recent_errors)

    # -- background queries -----------------------------------------------------------------------------

    def _start(self) -> _Consul:
        if self._client is None:
            self._client = self._connect()
        if self._main is None:
            self._main = asyncio.create_task(self._watch_services(), name=f"meshfed-consul-{self._zone}")
        return self._client

    def _connect(self) -> _Consul:
        parts = urlsplit(self.address)
        settings = self._settings
        extra: list[tuple[str, str]] = []
        if settings.namespace:
            extra.append(("ns", settings.namespace))
        if settings.partition:
            extra.append(("partition", settings.partition))
        cert = (settings.cert_file, settings.key_file) if settings.cert_file and settings.key_file else None
        client = _Consul(
            extra_params=extra,
            host=parts.hostname,
            port=parts.port or (443 if parts.scheme == "https" else 8500),
            scheme=parts.scheme,
            dc=settings.datacenter,
            verify=settings.ca_file or True,
            cert=cert,
            # A blocking query may take wait + wait/16 (Consul's jitter): allow for it, and no more.
            connections_timeout=self._wait * 1.25 + 10,
        )
        # py-consul prefers CONSUL_HTTP_TOKEN over the token it is given; the zone's config wins here.
        client.token = self._token
        return client

    async def _watch_services(self) -> None:
        backoff = Backoff(*self._backoff)
        index = 0
        path = "/v1/catalog/services"
        # After an error, ask once without blocking: a blocking query on the old
        # index would hide for a whole wait that Consul is answering again.
        retrying = False
        while True:
            try:
                answer = await self._get(path, None if retrying else index)
                names = _service_names(answer.body, self.address)
                new_index = _parse_index(answer.index, self.address, path)
            except asyncio.CancelledError:
                raise
            except (consul.ConsulException, aiohttp.ClientError, TimeoutError, CatalogError) as err:
                self._cache.failed(self._describe(err), path)
                retrying = True
                await backoff.sleep()
                continue
            backoff.reset()
            self._report_filtering(path, answer.filtered)
            retrying = False
            if new_index < index:
                # The server's history restarted (snapshot restore, new cluster): start over from scratch.
                log.warning(
                    "Consul at %s: index went back from %d to %d; listing again", self.address, index, new_index
                )
                await self._restart_watchers()
                index = 0
                continue
            index = max(new_index, 1)
            self._follow(names)
            self._listed = True
            self._publish()

    def _follow(self, names: set[str]) -> None:
        for name in names - self._watchers.keys():
            self._watchers[name] = asyncio.create_task(self._watch_service(name), name=f"meshfed-consul-{name}")
        for name in self._watchers.keys() - names:
            self._watchers.pop(name).cancel()
            self._services.pop(name, None)
            self._cache.recovered(f"/v1/health/service/{name}")  # no longer asked: its failure is moot

    async def _restart_watchers(self) -> None:
        watchers, self._watchers = self._watchers, {}
        self._services.clear()
        await cancel_and_wait(*watchers.values())
        for name in watchers:
            self._cache.recovered(f"/v1/health/service/{name}")

    async def _watch_service(self, name: str) -> None:
        backoff = Backoff(*self._backoff)
        index = 0
        path = f"/v1/health/service/{name}"
        retrying = False  # as in _watch_services: the first query after an error does not block
        while True:
            try:
                answer = await self._get(path, None if retrying else index)
                new_index = _parse_index(answer.index, self.address, path)
                services = self._to_services(name, answer.body, path)
            except asyncio.CancelledError:
                raise
            except (consul.ConsulException, aiohttp.ClientError, TimeoutError, CatalogError) as err:
                self._cache.failed(self._describe(err), path)
                retrying = True
                await backoff.sleep()
                continue
            backoff.reset()
            retrying = False
            # Backwards: the history is gone; this answer is current, but the next query must not block on it.
            index = 0 if new_index < index else max(new_index, 1)
            self._services[name] = services
            self._publish()
            self._report_filtering(path, answer.filtered)

    async def _get(self, path: str, index: int | None = None) -> _Answer:
        """One read; with ``index``, a blocking query that returns once Consul's index passes it (or on ``wait``)."""
        params: list[tuple[str, str]] = []
        if self._settings.datacenter:
            params.append(("dc", self._settings.datacenter))
        if index:
            params += [("index", str(index)), ("wait", self._wait_param())]
        answer: _Answer = await self._start().http.get(_answer, path, params=params, headers=self._headers())
        if answer.default_deny and self._token is None and not self._warned_anonymous:
            # Consul filters the anonymous token's reads without saying so: this is the only sign.
            self._warned_anonymous = True
            log.warning(
                "Consul at %s enforces ACLs (default policy deny) and zone.toml names no [consul] token_file: "
                "Consul shows meshfed only what its anonymous token may read, and does not say what it hides "
                "— create a token with the policy in %s",
                self.address,
                ACL_POLICY_FILE,
            )
        return answer

    async def _put(self, path: str, body: dict[str, Any]) -> None:
        """One catalog write, the token in the header only (Consul refuses unknown fields in the body)."""
        if self._settings.datacenter:
            body = {**body, "Datacenter": self._settings.datacenter}
        await self._start().http.put(CB.boolean(), path, data=json.dumps(body), headers=self._headers())

    def _headers(self) -> dict[str, str]:
        return {"X-Consul-Token": self._token} if self._token else {}

    def _report_filtering(self, path: str, filtered: bool) -> None:
        """A query answered: healed, or degraded if ACLs hid part of the answer (which is published regardless)."""
        if filtered:
            self._cache.failed(self._hidden(path), path)
        else:
            self._cache.recovered(path)

    def _publish(self) -> None:
        # The first snapshot waits until every listed service has answered once, so it is complete.
        if not self._listed or any(name not in self._services for name in self._watchers):
            return
        self._cache.update([service for services in self._services.values() for service in services])

    def _wait_param(self) -> str:
        return f"{max(self._wait, 0.001) * 1000:.0f}ms"

    # -- mapping ----------------------------------------------------------------------------------------

    def _to_services(self, name: str, entries: Any, path: str) -> list[Service]:
        if entries is None:
            return []  # 404: the service went away between the two queries
        if not isinstance(entries, list):
            raise CatalogError(f"Consul at {self.address}: {path} returned {type(entries).__name__}, not a list")
        by_namespace: dict[str, list[Endpoint]] = {}
        port_names: dict[str, str] = {}
        ports: dict[str, int] = {}
        for entry in entries:
            try:
                node, instance, checks = entry["Node"], entry["Service"], entry.get("Checks") or []
                meta: dict[str, str] = dict(instance.get("Meta") or {})
                if meta.get(MANAGED_META) == "true":
                    continue  # an import meshfed registered: never list it as a local service
                namespace = instance.get("Namespace") or self._settings.namespace or "default"
                labels = {key: value for key, value in meta.items() if not key.startswith(_MESHFED_META_PREFIX)}
                for tag in instance.get("Tags") or []:
                    key, equals, value = str(tag).partition("=")
                    if equals and key:
                        labels[key] = value
                locality = instance.get("Locality") or {}
                weights = instance.get("Weights") or {}
                endpoint = Endpoint(
                    address=instance.get("Address") or node["Address"],
                    port=int(instance["Port"]),
                    locality=Locality(region=locality.get("Region", ""), zone=locality.get("Zone", "")),
                    weight=max(1, int(weights.get("Passing", 1))),
                    healthy=all(check.get("Status") == "passing" for check in checks),
                    labels=labels,
                )
            except (KeyError, TypeError, AttributeError, ValueError) as err:
                if isinstance(err, ValidationError):
                    self._skip(f"{name}/{entry.get('Service', {}).get('ID')}", err)
                    continue
                raise CatalogError(
                    f"Consul at {self.address}: {path} returned an entry without {err} — is that a Consul HTTP API?"
                ) from None
            by_namespace.setdefault(namespace, []).append(endpoint)
            port_names.setdefault(namespace, meta.get(PORT_NAME_META, DEFAULT_PORT_NAME))
            ports.setdefault(namespace, endpoint.port)
        services = []
        for namespace, endpoints in by_namespace.items():
            common = dict(endpoints[0].labels)
            for endpoint in endpoints[1:]:
                common = {key: value for key, value in common.items() if endpoint.labels.get(key) == value}
            try:
                services.append(
                    Service(
                        name=name,
                        namespace=namespace,
                        ports={port_names[namespace]: ports[namespace]},
                        labels=common,
                        endpoints=sorted(endpoints, key=lambda endpoint: endpoint.key),
                    )
                )
            except ValidationError as err:
                self._skip(f"{name} (namespace {namespace})", err)
        return services

    def _skip(self, what: str, err: ValidationError) -> None:
        if what not in self._skipped:
            self._skipped.add(what)
            reason = describe_validation_error(err)
            log.warning("Consul at %s: skipping %s, which meshfed cannot represent: %s", self.address, what, reason)

    def _registration(self, item: LocalImport) -> dict[str, Any]:
        port_name, (host, port) = min(item.ports.items())
        name = f"{item.service}-{item.peer}" if item.namespace == "default" else item.name.replace(".", "-")
        meta = {
            MANAGED_META: "true",
            "meshfed-zone": self._zone,
            "meshfed-import": item.name,
            "meshfed-peer": item.peer,
            "meshfed-service": item.service,
            "meshfed-namespace": item.namespace,
            PORT_NAME_META: port_name,
        }
        # Consul services have one port; the others ride in meta for clients that read it.
        meta.update({f"meshfed-port-{other}": str(number) for other, (_, number) in item.ports.items()})
        return {
            "ID": f"meshfed-{item.name}",
            "Service": name,
            "Address": host,
            "Port": port,
            "Tags": ["meshfed-import", f"peer={item.peer}"],
            "Meta": meta,
        }

    def _hidden(self, path: str) -> str:
        """What an answer filtered by ACLs lacks, and which rule of the documented policy would show it."""
        where, token = f"Consul at {self.address}", self._token_named()
        if path == "/v1/catalog/services":
            return (
                f"{where} hides services from {token} (ACL-filtered {path}): the catalog lacks them "
                f'— does its policy grant service:read on every service (service_prefix "" read, {ACL_POLICY_FILE})?'
            )
        if path.startswith("/v1/health/service/"):
            # One message for every service, so that a token without node:read is one log line, not one per service.
            return (
                f"{where} hides instances on nodes that {token} cannot read (ACL-filtered /v1/health/service): "
                f'services lack endpoints — does its policy grant node:read on every node (node_prefix "" read, '
                f"{ACL_POLICY_FILE})?"
            )
        return (
            f"{where} hides node {self.node} or its services from {token} (ACL-filtered {path}): meshfed cannot "
            f"tell what it registered there — does its policy grant node:read and service:read ({ACL_POLICY_FILE})?"
        )

    def _token_named(self) -> str:
        if self._settings.token_file is None:
            return "the anonymous ACL token (zone.toml names no [consul] token_file)"
        return f"the ACL token in {self._settings.token_file}"

    def _denied(self, text: str) -> str:
        """A 403, with the ACL rule that would have allowed it when Consul names the missing permission."""
        where, token = f"Consul at {self.address}", self._token_named()
        if self._settings.token_file is None:
            return (
                f"{where} denied access (403 {text}) to {token} — create a token with the policy in {ACL_POLICY_FILE}"
            )
        if "ACL not found" in text:
            return (
                f"{where} does not know {token} (403 ACL not found) — is it the SecretID of a token "
                "that exists in this datacenter?"
            )
        missing = _MISSING_PERMISSION.search(text)
        if missing is None:
            return f"{where} denied access (403 {text}) — does {token} carry the policy in {ACL_POLICY_FILE}?"
        kind, access, name = missing.groups()
        on = f' on "{name}"' if name is not None else ""
        rule = f'{kind} "{name}" {{ policy = "{access}" }}' if name is not None else f'{kind} = "{access}"'
        return (
            f"{where} denied access (403 {text}) — {token} lacks {kind}:{access}{on}: "
            f"add `{rule}` to its policy (see {ACL_POLICY_FILE})"
        )

    def _describe(self, err: BaseException) -> str:
        where = f"Consul at {self.address}"
        if isinstance(err, CatalogError):
            return str(err)
        if isinstance(err, aiohttp.ClientConnectorError):
            return f"{where} refused the connection ({err.os_error}) — is [consul] address in zone.toml right?"
        if isinstance(err, consul.ACLPermissionDenied):
            return self._denied(str(err).strip())
        if isinstance(err, consul.ACLDisabled):
            return f"{where} rejected the request (401 {str(err).strip()}) — check the ACL token"
        if isinstance(err, TimeoutError | consul.Timeout):
            return f"{where} did not answer in time — is it overloaded or behind a proxy that cuts long polls?"
        text = str(err).strip()
        if "Failed to decode JSON" in text:
            return f"{where} sent a response that is not JSON — is that address a Consul HTTP API? ({text[:200]})"
        return f"{where}: {type(err).__name__}: {text[:300]}"


def _read_token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError as err:
        raise CatalogError(f"cannot read the Consul ACL token file {path}: {err.strerror}") from None


def _parse_index(raw: Any, address: str, path: str) -> int:
    try:
        return max(int(raw), 0)
    except (TypeError, ValueError):
        raise CatalogError(f"Consul at {address}: {path} sent X-Consul-Index {raw!r}, not a number") from None


def _service_names(services: Any, address: str) -> set[str]:
    if not isinstance(services, dict):
        raise CatalogError(
            f"Consul at {address}: /v1/catalog/services returned {type(services).__name__}, not an object"
        )
    return {str(name) for name in services}


def _same_registration(existing: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    if existing is None:
        return False
    return all(existing.get(key) == desired[key] for key in ("Service", "Address", "Port", "Tags", "Meta"))


__all__ = ["ACL_POLICY_FILE", "DEFAULT_PORT_NAME", "MANAGED_META", "PORT_NAME_META", "ConsulCatalog"]
