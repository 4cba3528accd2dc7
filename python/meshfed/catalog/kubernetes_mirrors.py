"""Publishing a zone's imports into Kubernetes: each one mirrored as a Service plus its EndpointSlice.

Imports are materialized the way Linkerd mirrors services: a selector-less
Service plus an EndpointSlice of the same name pointing at the gateway's egress
listener, in ``mirror_namespace`` (or else the import's own namespace). Both are
labelled ``meshfed.io/mirror=true``, ``meshfed.io/owner=<zone>`` and
``meshfed.io/service``/``namespace``/``peer``, so a client finds its mirror with
``kubectl get services -l meshfed.io/service=web,meshfed.io/peer=west``.
With ``mirror_selector`` a mirror is instead a Service selecting those pods (the
zone's gateway replicas) on the egress port, whose EndpointSlices Kubernetes
keeps; the slices it writes carry the Service's labels, so this zone's own are
told apart by their ``managed-by`` label.

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
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import ipaddress
import re

import aiohttp

from meshfed.catalog.kubernetes_api import (
    SERVICE_NAME_LABEL,
    ApiError,
    Document,
    KubernetesApi,
    NotFoundError,
    object_name,
)
from meshfed.catalog.model import LocalImport
from meshfed.catalog.settings import KubernetesSettings
from meshfed.errors import CatalogError

MIRROR_LABEL = "meshfed.io/mirror"
OWNER_LABEL = "meshfed.io/owner"
PEER_LABEL = "meshfed.io/peer"
SERVICE_LABEL = "meshfed.io/service"
NAMESPACE_LABEL = "meshfed.io/namespace"
IMPORT_ANNOTATION = "meshfed.io/import"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
# A label value: no "/" (the API server refuses "meshfed.io/controller" with 422 Invalid).
MANAGED_BY = "controller.meshfed.io"
_KINDS = {"services": "Service", "endpointslices": "EndpointSlice"}
_DIGEST_LENGTH = 10


class KubernetesMirrors:
    """One zone's mirrors of its imports, written through ``api``."""

    def __init__(self, api: KubernetesApi, settings: KubernetesSettings, *, zone: str) -> None:
        self._api = api
        self._settings = settings
        self._zone = zone

    def check(self, imports: list[LocalImport]) -> None:
        """Refuse, before anything is sent, imports whose egress address no EndpointSlice takes (none is
        written with ``mirror_selector``: the Services select the gateway's pods)."""
        if self._settings.mirror_selector is not None:
            return
        for item in imports:
            for host, _ in item.ports.values():
                _check_egress_address(host)

    async def publish(self, imports: list[LocalImport]) -> None:
        """Mirror exactly ``imports`` (through a connected ``api``); delete this zone's stale mirrors."""
        desired: dict[tuple[str, str], LocalImport] = {}
        for item in imports:
            desired[(self._settings.mirror_namespace or item.namespace, mirror_name(self._zone, item))] = item
        try:
            owned = {kind: await self._owned_mirrors(kind) for kind in _KINDS}
        except (ApiError, aiohttp.ClientError, TimeoutError, CatalogError) as err:
            raise CatalogError(f"cannot mirror imports: {self._api.describe(err)}") from None
        failures: list[str] = []
        for (namespace, name), item in sorted(desired.items()):
            try:
                await self._apply_mirror(item, namespace, name, owned)
            except (ApiError, aiohttp.ClientError, TimeoutError, CatalogError) as err:
                failures.append(f"{item.name}: {self._api.describe(err, short=True)}")
        # The Service goes first: an EndpointSlice left alone is inert, a Service without one is a black hole.
        for namespace, name in sorted(owned["services"].keys() - desired.keys()):
            try:
                with contextlib.suppress(NotFoundError):
                    await self._api.request(self._api.delete_call("services", namespace, name))
            except (ApiError, aiohttp.ClientError, TimeoutError, CatalogError) as err:
                failures.append(f"stale mirror Service {namespace}/{name}: {self._api.describe(err, short=True)}")
                owned["endpointslices"].pop((namespace, name), None)  # keep its endpoints while it stays
        for namespace, name in sorted(owned["endpointslices"].keys() - desired.keys()):
            try:
                with contextlib.suppress(NotFoundError):
                    await self._api.request(self._api.delete_call("endpointslices", namespace, name))
            except (ApiError, aiohttp.ClientError, TimeoutError, CatalogError) as err:
                failures.append(f"stale mirror EndpointSlice {namespace}/{name}: {self._api.describe(err, short=True)}")
        if failures:
            raise CatalogError(
                f"cannot mirror every import of zone {self._zone} into the Kubernetes API at {self._api.server}: "
                f"{len(failures)} change(s) failed, the others are applied and the next publish retries — "
                + "; ".join(failures)
            )

    async def _owned_mirrors(self, kind: str) -> dict[tuple[str, str], Document]:
        """This zone's mirrors of ``kind``: in the mirror namespace, or across namespaces without one."""
        selector = f"{MIRROR_LABEL}=true,{OWNER_LABEL}={self._zone}"
        if kind == "endpointslices":
            # Only ours: Kubernetes' EndpointSlice controller gives the slices of a selecting mirror
            # (mirror_selector) the Service's labels too, and owns them.
            selector += f",{MANAGED_BY_LABEL}={MANAGED_BY}"
        call = self._api.list_call(kind, self._settings.mirror_namespace, label_selector=selector)
        document = await self._api.request(call)
        return {(item["metadata"]["namespace"], object_name(item)): item for item in document.get("items") or []}

    async def _apply_mirror(
        self, item: LocalImport, namespace: str, name: str, owned: dict[str, dict[tuple[str, str], Document]]
    ) -> None:
        """Create or update one import's Service and EndpointSlice, leaving both or neither."""
        api = self._api
        service, endpoints = self._mirror_documents(item, namespace, name)
        current = owned["services"].get((namespace, name))
        if current is None:
            # Created before its EndpointSlice: a name held by someone else's Service is refused here,
            # before an EndpointSlice could add our endpoint to their Service.
            await self._create_owned("services", namespace, service)
        elif not _same_mirror(current, service, "services"):
            await api.request(api.replace_call("services", namespace, name, _replacement(current, service, "services")))
        current_slice = owned["endpointslices"].get((namespace, name))
        if endpoints is None:  # the Service selects the pods: Kubernetes keeps its endpoints, not this zone
            if current_slice is not None:
                with contextlib.suppress(NotFoundError):
                    await api.request(api.delete_call("endpointslices", namespace, name))
            return
        missing = current_slice is None or current_slice.get("addressType") != endpoints["addressType"]
        try:
            if current_slice is not None and missing:
                # addressType is immutable: another address family needs a new EndpointSlice.
                with contextlib.suppress(NotFoundError):
                    await api.request(api.delete_call("endpointslices", namespace, name))
            if missing:
                await self._create_owned("endpointslices", namespace, endpoints)
            elif current_slice is not None and not _same_mirror(current_slice, endpoints, "endpointslices"):
                replacement = _replacement(current_slice, endpoints, "endpointslices")
                await api.request(api.replace_call("endpointslices", namespace, name, replacement))
        except (ApiError, aiohttp.ClientError, TimeoutError, CatalogError) as err:
            if not missing:
                raise  # the previous EndpointSlice still serves the Service
            try:
                with contextlib.suppress(NotFoundError):
                    await api.request(api.delete_call("services", namespace, name))
            except (ApiError, aiohttp.ClientError, TimeoutError, CatalogError) as cleanup:
                raise CatalogError(
                    f"{api.describe(err, short=True)}; and removing its Service {namespace}/{name} again, so it is "
                    f"not left without endpoints, failed too: {api.describe(cleanup, short=True)}"
                ) from None
            raise

    async def _create_owned(self, kind: str, namespace: str, document: Document) -> None:
        """Create ``document``; if its name is taken, take it over only when this zone owns it."""
        name = object_name(document)
        try:
            await self._api.request(self._api.create_call(kind, namespace, document))
            return
        except ApiError as err:
            if err.status != 409:
                raise
        # Not in this zone's list, yet there: someone else's object, or ours created since the list.
        current = await self._api.request(self._api.read_call(kind, namespace, name))
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
            await self._api.request(
                self._api.replace_call(kind, namespace, name, _replacement(current, document, kind))
            )

    def _mirror_documents(self, item: LocalImport, namespace: str, name: str) -> tuple[Document, Document | None]:
        """The mirror Service of ``item``, and its EndpointSlice (None when the Service selects the gateway's pods)."""
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
        if self._settings.mirror_selector is not None:
            # The pods listen where the egress listeners do, on every pod address: the ports are the same.
            service["spec"]["selector"] = dict(self._settings.mirror_selector)
            return service, None
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


class _ForeignObjectError(CatalogError):
    """An object with a mirror's name that this zone does not own: never updated or deleted."""


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


def _replacement(current: Document, desired: Document, kind: str) -> Document:
    """``current`` with meshfed's fields set as ``desired`` has them; what the server set stays (clusterIP...)."""
    replacement = copy.deepcopy(current)
    metadata = replacement.setdefault("metadata", {})
    metadata["labels"] = dict(desired["metadata"]["labels"])
    metadata["annotations"] = {**(metadata.get("annotations") or {}), **desired["metadata"]["annotations"]}
    if kind == "services":
        spec = replacement.setdefault("spec", {})
        spec.pop("selector", None)
        if "selector" in desired["spec"]:
            spec["selector"] = dict(desired["spec"]["selector"])
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
        return bool(
            spec.get("type") == "ClusterIP"
            and (spec.get("selector") or None) == desired["spec"].get("selector")
            and ports == desired["spec"]["ports"]
        )
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


__all__ = ["MIRROR_LABEL", "OWNER_LABEL", "KubernetesMirrors", "mirror_name"]
