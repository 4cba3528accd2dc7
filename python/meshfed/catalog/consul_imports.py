"""Registering a zone's imports in Consul, on the zone's own synthetic node ``meshfed-<zone>``.

Imports are registered through the catalog API (``/v1/catalog/register``) on
one synthetic node per zone, ``meshfed-<zone>``, the way consul-k8s catalog
sync registers external services: no local agent is needed, and listing that
node finds everything meshfed owns. Each import ``<service>.<namespace>.<peer>``
becomes the Consul service ``<service>-<peer>`` (``<service>-<namespace>-<peer>``
outside namespace ``default``): Consul accepts dots in names, but its DNS
interface cannot serve them, and Consul DNS is how many clients look. The
service meta ``meshfed-managed=true`` (:data:`MANAGED_META`) marks what meshfed
owns; listing skips those (an import is never re-exported) and publishing
removes stale ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp
import consul

from meshfed.catalog.consul_api import ConsulApi
from meshfed.catalog.model import LocalImport
from meshfed.errors import CatalogError

MANAGED_META = "meshfed-managed"
PORT_NAME_META = "meshfed-port-name"
# The synthetic node's meta, as consul-k8s catalog sync and consul-esm expect of an external node.
_NODE_META = {MANAGED_META: "true", "external-node": "true", "external-probe": "false"}


def registrations(zone: str, imports: list[LocalImport]) -> dict[str, dict[str, Any]]:
    """The catalog registration of each import, by service ID."""
    return {registration["ID"]: registration for registration in (_registration(zone, item) for item in imports)}


async def register_imports(api: ConsulApi, desired: dict[str, dict[str, Any]]) -> None:
    """Register exactly ``desired`` on ``api.node``; deregister what meshfed registered there before."""
    path = f"/v1/catalog/node/{api.node}"
    try:
        answer = await api.get(path)
        if answer.filtered:
            # What the token cannot see would be registered again on every pass, and never removed when stale.
            raise CatalogError(f"cannot register imports: {api.hidden(path)}")
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
            await api.put(
                "/v1/catalog/register",
                {
                    "Node": api.node,
                    "Address": registration["Address"],
                    "NodeMeta": _NODE_META,
                    "Service": registration,
                },
            )
            node_current = True
        for service_id in owned.keys() - desired.keys():
            await api.put("/v1/catalog/deregister", {"Node": api.node, "ServiceID": service_id})
    except (consul.ConsulException, aiohttp.ClientError, TimeoutError) as err:
        raise CatalogError(f"cannot register imports: {api.describe(err)}") from None


def _registration(zone: str, item: LocalImport) -> dict[str, Any]:
    port_name, (host, port) = min(item.ports.items())
    name = f"{item.service}-{item.peer}" if item.namespace == "default" else item.name.replace(".", "-")
    meta = {
        MANAGED_META: "true",
        "meshfed-zone": zone,
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


def _same_registration(existing: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    if existing is None:
        return False
    return all(existing.get(key) == desired[key] for key in ("Service", "Address", "Port", "Tags", "Meta"))


__all__ = ["MANAGED_META", "PORT_NAME_META", "register_imports", "registrations"]
