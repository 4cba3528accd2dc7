"""The Kubernetes API as the Kubernetes catalog calls it: credentials, requests, and what a failure means.

Requests go through kubernetes_asyncio's generated client with
``_preload_content=False``: meshfed reads the raw JSON (a watch's lines, a
Status object's reason and message) and maps the status itself — ``404`` to
:class:`NotFoundError`, ``410 Gone`` to :class:`GoneError` (list again), any
other failure to :class:`ApiError`.

Credentials come from ``[kubernetes] kubeconfig`` (and ``context``) in
``zone.toml``, or else from the pod's service account. :meth:`KubernetesApi.describe`
turns a failure into one line saying what to check: a ``401`` is the token, a
``403`` names the permission the Status message says was missing and where
the meshfed chart's Role or ClusterRole grants it.

Used by :mod:`meshfed.catalog.kubernetes_watch` (listing and watching),
:mod:`meshfed.catalog.kubernetes_mirrors` (mirroring imports) and
:mod:`meshfed.leadership` (the controllers' Lease) and :mod:`meshfed.replica` (the zone's state in Secrets).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any, cast

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.config.config_exception import ConfigException

from meshfed.catalog.settings import KubernetesSettings
from meshfed.errors import CatalogError

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# "services "x" is forbidden: User "u" cannot create resource "services" in API group "" in the namespace "y"".
_FORBIDDEN = re.compile(
    r'User "(?P<user>[^"]*)" cannot (?P<verb>\S+) resource "(?P<resource>[^"]+)" in API group "(?P<group>[^"]*)"'
    r'(?: in the namespace "(?P<namespace>[^"]+)")?'
)

Document = dict[str, Any]


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class NotFoundError(ApiError):
    pass


class GoneError(Exception):
    """The resource version was compacted away: list again."""


def api_error(status: int, body: bytes) -> ApiError:
    # The API answers errors with a Status object: its reason and message say what was wrong.
    try:
        document = json.loads(body)
        return ApiError(status, str(document.get("reason", "")), str(document.get("message", "")))
    except (ValueError, AttributeError):
        return ApiError(status, "", body.decode(errors="replace")[:200])


def object_name(item: Document) -> str:
    return str(item["metadata"]["name"])


class KubernetesApi:
    """One API server as a zone's catalog talks to it; ``server`` is its URL once :meth:`connect` has run."""

    def __init__(self, settings: KubernetesSettings) -> None:
        self._settings = settings
        self._api: client.ApiClient | None = None
        self.server = "(not connected)"

    @property
    def connected(self) -> bool:
        return self._api is not None

    async def connect(self) -> None:
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
        self._api = client.ApiClient(configuration)

    async def aclose(self) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None

    # -- HTTP through the generated client ---------------------------------------------------------------

    def _core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self._api)

    def _discovery(self) -> client.DiscoveryV1Api:
        return client.DiscoveryV1Api(self._api)

    def _coordination(self) -> client.CoordinationV1Api:
        return client.CoordinationV1Api(self._api)

    def list_call(self, kind: str, namespace: str | None, **kwargs: Any) -> Callable[[], Awaitable[Any]]:
        kwargs["_preload_content"] = False
        core, discovery = self._core(), self._discovery()
        if kind == "secrets" and namespace is not None:
            return lambda: core.list_namespaced_secret(namespace, **kwargs)
        if kind == "services":
            if namespace is None:
                return lambda: core.list_service_for_all_namespaces(**kwargs)
            return lambda: core.list_namespaced_service(namespace, **kwargs)
        if namespace is None:
            return lambda: discovery.list_endpoint_slice_for_all_namespaces(**kwargs)
        return lambda: discovery.list_namespaced_endpoint_slice(namespace, **kwargs)

    def create_call(self, kind: str, namespace: str, body: Document) -> Callable[[], Awaitable[Any]]:
        if kind == "secrets":
            return lambda: self._core().create_namespaced_secret(namespace, cast(Any, body), _preload_content=False)
        if kind == "leases":
            return lambda: self._coordination().create_namespaced_lease(
                namespace, cast(Any, body), _preload_content=False
            )
        if kind == "services":
            return lambda: self._core().create_namespaced_service(namespace, cast(Any, body), _preload_content=False)
        return lambda: self._discovery().create_namespaced_endpoint_slice(
            namespace, cast(Any, body), _preload_content=False
        )

    def replace_call(self, kind: str, namespace: str, name: str, body: Document) -> Callable[[], Awaitable[Any]]:
        if kind == "secrets":
            return lambda: self._core().replace_namespaced_secret(
                name, namespace, cast(Any, body), _preload_content=False
            )
        if kind == "leases":
            return lambda: self._coordination().replace_namespaced_lease(
                name, namespace, cast(Any, body), _preload_content=False
            )
        if kind == "services":
            return lambda: self._core().replace_namespaced_service(
                name, namespace, cast(Any, body), _preload_content=False
            )
        return lambda: self._discovery().replace_namespaced_endpoint_slice(
            name, namespace, cast(Any, body), _preload_content=False
        )

    def read_call(self, kind: str, namespace: str, name: str) -> Callable[[], Awaitable[Any]]:
        if kind == "secrets":
            return lambda: self._core().read_namespaced_secret(name, namespace, _preload_content=False)
        if kind == "leases":
            return lambda: self._coordination().read_namespaced_lease(name, namespace, _preload_content=False)
        if kind == "services":
            return lambda: self._core().read_namespaced_service(name, namespace, _preload_content=False)
        return lambda: self._discovery().read_namespaced_endpoint_slice(name, namespace, _preload_content=False)

    def label_call(self, namespace: str, pod: str, labels: dict[str, str]) -> Callable[[], Awaitable[Any]]:
        """Set ``labels`` on a pod (the client sends a dict as a strategic merge patch: other labels stay)."""
        body = {"metadata": {"labels": labels}}
        return lambda: self._core().patch_namespaced_pod(pod, namespace, body, _preload_content=False)

    def delete_call(self, kind: str, namespace: str, name: str) -> Callable[[], Awaitable[Any]]:
        if kind == "secrets":
            return lambda: self._core().delete_namespaced_secret(name, namespace, _preload_content=False)
        if kind == "services":
            return lambda: self._core().delete_namespaced_service(name, namespace, _preload_content=False)
        return lambda: self._discovery().delete_namespaced_endpoint_slice(name, namespace, _preload_content=False)

    async def request(self, call: Callable[[], Awaitable[Any]]) -> Document:
        response = await call()
        try:
            body = await response.read()
            if response.status == 404:
                status = api_error(404, body)  # the Status says what is missing: the object, or its namespace
                raise NotFoundError(404, status.reason or "NotFound", status.message)
            if response.status == 410:
                raise GoneError
            if not 200 <= response.status < 300:
                raise api_error(response.status, body)
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

    # -- what went wrong, and what to check ---------------------------------------------------------------

    def describe(self, err: BaseException, *, short: bool = False) -> str:
        """What went wrong and what to check; ``short`` leaves out which server (said once by the caller)."""
        where = "the Kubernetes API" if short else f"the Kubernetes API at {self.server}"
        if isinstance(err, CatalogError):
            return str(err)
        if isinstance(err, aiohttp.ClientConnectorError):
            return f"{where} refused the connection ({err.os_error}) — is the kubeconfig's server right?"
        if isinstance(err, ApiError) and err.status == 401:
            # Authentication, not authorization: RBAC never answers 401.
            source = f"the user of {self._settings.kubeconfig}" if self._settings.kubeconfig else "the pod's token"
            return (
                f"{where} did not accept meshfed's credentials ({err}) — is the token expired, revoked or for another "
                f"cluster? check {source}"
            )
        if isinstance(err, ApiError) and err.status == 403:
            return f"{where} {_forbidden_hint(err.message, self._settings.mirror_namespace)} ({err})"
        if isinstance(err, ApiError) and err.status == 404 and 'namespaces "' in err.message:
            return f"{where}: {err.message} — create the namespace first ({err})"
        if isinstance(err, TimeoutError):
            return f"{where} did not answer in time"
        return f"{where}: {err}"


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


__all__ = [
    "SERVICE_NAME_LABEL",
    "ApiError",
    "Document",
    "GoneError",
    "KubernetesApi",
    "NotFoundError",
    "api_error",
    "object_name",
]
