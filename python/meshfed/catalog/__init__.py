"""Catalogs: the services of a zone, from one source (embedded SQLite, Consul, Kubernetes)."""

from meshfed.catalog.embedded import EmbeddedCatalog
from meshfed.catalog.model import CatalogSnapshot, Endpoint, Locality, Service
from meshfed.catalog.source import CatalogSource

__all__ = ["CatalogSnapshot", "CatalogSource", "EmbeddedCatalog", "Endpoint", "Locality", "Service"]
