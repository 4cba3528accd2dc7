"""Reading a Consul datacenter's services: the blocking queries that keep the catalog's snapshot current.

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

An answer filtered by ACLs is published as it is (it is all Consul shows) and
reported in the catalog's ``last_error``, logged once.

Mapping: a Consul service is a meshfed :class:`Service` in its Consul
Enterprise namespace (``default`` otherwise). Its one port is named by the
``meshfed-port-name`` service meta (``default`` otherwise). An instance's
address is ``Service.Address`` or else ``Node.Address``; it is healthy when
every check (node and service) is ``passing``; its labels are the service
meta plus ``key=value`` tags; its weight is ``Weights.Passing``; its locality
is ``Service.Locality`` (Consul 1.17+). Imports meshfed registered
(``meshfed-managed=true``) are skipped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import consul
from pydantic import ValidationError

from meshfed.aio import cancel_and_wait
from meshfed.catalog.consul_api import ConsulApi
from meshfed.catalog.consul_imports import MANAGED_META, PORT_NAME_META
from meshfed.catalog.model import Endpoint, Locality, Service
from meshfed.catalog.remote import Backoff, SnapshotCache
from meshfed.errors import CatalogError
from meshfed.validation import describe_validation_error

# The Consul catalog's one logger, named for meshfed.catalog.consul as before the split into modules.
log = logging.getLogger("meshfed.catalog.consul")

DEFAULT_PORT_NAME = "default"
_MESHFED_META_PREFIX = "meshfed-"


class ConsulWatch:
    """The blocking queries of one Consul catalog, publishing every complete answer into ``cache``."""

    def __init__(self, api: ConsulApi, cache: SnapshotCache, *, zone: str, backoff: tuple[float, float]) -> None:
        self._api = api
        self._cache = cache
        self._zone = zone
        self._backoff = backoff
        self._main: asyncio.Task[None] | None = None
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._services: dict[str, list[Service]] = {}
        self._listed = False
        self._skipped: set[str] = set()

    def start(self) -> None:
        """Start the queries, once."""
        if self._main is None:
            self._main = asyncio.create_task(self._watch_services(), name=f"meshfed-consul-{self._zone}")

    async def aclose(self) -> None:
        await cancel_and_wait(self._main, *self._watchers.values())
        self._main, self._watchers = None, {}

    async def _watch_services(self) -> None:
        backoff = Backoff(*self._backoff)
        index = 0
        path = "/v1/catalog/services"
        # After an error, ask once without blocking: a blocking query on the old
        # index would hide for a whole wait that Consul is answering again.
        retrying = False
        while True:
            try:
                answer = await self._api.get(path, None if retrying else index)
                names = _service_names(answer.body, self._api.address)
                new_index = _parse_index(answer.index, self._api.address, path)
            except asyncio.CancelledError:
                raise
            except (consul.ConsulException, aiohttp.ClientError, TimeoutError, CatalogError) as err:
                self._cache.failed(self._api.describe(err), path)
                retrying = True
                await backoff.sleep()
                continue
            backoff.reset()
            self._report_filtering(path, answer.filtered)
            retrying = False
            if new_index < index:
                # The server's history restarted (snapshot restore, new cluster): start over from scratch.
                log.warning(
                    "Consul at %s: index went back from %d to %d; listing again", self._api.address, index, new_index
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
                answer = await self._api.get(path, None if retrying else index)
                new_index = _parse_index(answer.index, self._api.address, path)
                services = self._to_services(name, answer.body, path)
            except asyncio.CancelledError:
                raise
            except (consul.ConsulException, aiohttp.ClientError, TimeoutError, CatalogError) as err:
                self._cache.failed(self._api.describe(err), path)
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

    def _report_filtering(self, path: str, filtered: bool) -> None:
        """A query answered: healed, or degraded if ACLs hid part of the answer (which is published regardless)."""
        if filtered:
            self._cache.failed(self._api.hidden(path), path)
        else:
            self._cache.recovered(path)

    def _publish(self) -> None:
        # The first snapshot waits until every listed service has answered once, so it is complete.
        if not self._listed or any(name not in self._services for name in self._watchers):
            return
        self._cache.update([service for services in self._services.values() for service in services])

    # -- mapping ----------------------------------------------------------------------------------------

    def _to_services(self, name: str, entries: Any, path: str) -> list[Service]:
        if entries is None:
            return []  # 404: the service went away between the two queries
        if not isinstance(entries, list):
            raise CatalogError(f"Consul at {self._api.address}: {path} returned {type(entries).__name__}, not a list")
        by_namespace: dict[str, list[Endpoint]] = {}
        port_names: dict[str, str] = {}
        ports: dict[str, int] = {}
        for entry in entries:
            try:
                node, instance, checks = entry["Node"], entry["Service"], entry.get("Checks") or []
                meta: dict[str, str] = dict(instance.get("Meta") or {})
                if meta.get(MANAGED_META) == "true":
                    continue  # an import meshfed registered: never list it as a local service
                namespace = instance.get("Namespace") or self._api.settings.namespace or "default"
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
                    f"Consul at {self._api.address}: {path} returned an entry without {err} — is that a Consul HTTP "
                    "API?"
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
            log.warning(
                "Consul at %s: skipping %s, which meshfed cannot represent: %s", self._api.address, what, reason
            )


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


__all__ = ["DEFAULT_PORT_NAME", "ConsulWatch"]
