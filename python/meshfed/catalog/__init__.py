"""Catalogs: the services of a zone, from one source (embedded SQLite, Consul, Kubernetes)."""

from pathlib import Path

from meshfed.catalog.embedded import EmbeddedCatalog
from meshfed.catalog.model import CatalogSnapshot, Endpoint, LocalImport, Locality, Service
from meshfed.catalog.source import CatalogSource
from meshfed.errors import CatalogError

__all__ = [
    "CatalogSnapshot",
    "CatalogSource",
    "EmbeddedCatalog",
    "Endpoint",
    "LocalImport",
    "Locality",
    "Service",
    "open_catalog",
]


def open_catalog(zone_directory: Path, mode: str) -> CatalogSource:
    """The catalog source a zone's config names."""
    if mode == "embedded":
        return EmbeddedCatalog(zone_directory)
    raise CatalogError(f"catalog mode {mode!r} is not available; use embedded")
