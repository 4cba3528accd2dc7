"""Catalogs: the services of a zone, from one source (embedded SQLite, Consul, Kubernetes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshfed.catalog.embedded import EmbeddedCatalog, EmbeddedCatalogSource
from meshfed.catalog.model import CatalogSnapshot, Endpoint, LocalImport, Locality, Service
from meshfed.catalog.settings import ConsulSettings, KubernetesSettings
from meshfed.catalog.source import CatalogSource
from meshfed.errors import CatalogError

if TYPE_CHECKING:
    from meshfed.zone import Zone

__all__ = [
    "CatalogSnapshot",
    "CatalogSource",
    "ConsulSettings",
    "EmbeddedCatalog",
    "EmbeddedCatalogSource",
    "Endpoint",
    "KubernetesSettings",
    "LocalImport",
    "Locality",
    "Service",
    "open_catalog",
]


def open_catalog(zone: Zone) -> CatalogSource:
    """The catalog source ``zone.toml`` names (``catalog = "embedded" | "consul" | "kubernetes"``)."""
    mode = zone.config.catalog
    if mode == "embedded":
        return EmbeddedCatalogSource(zone.directory)
    # Imported here: the Consul and Kubernetes clients are heavy, and an embedded zone needs neither.
    if mode == "consul":
        from meshfed.catalog.consul import ConsulCatalog

        return ConsulCatalog(zone.config.consul or ConsulSettings(), zone=zone.name)
    if mode == "kubernetes":
        from meshfed.catalog.kubernetes import KubernetesCatalog

        return KubernetesCatalog(zone.config.kubernetes or KubernetesSettings(), zone=zone.name)
    raise CatalogError(f"catalog mode {mode!r} is not available; use embedded, consul or kubernetes")
