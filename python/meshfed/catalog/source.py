"""The one interface every catalog source implements.

A source lists a zone's services and watches them from a version (DESIGN §4:
list + watch, restart on resource-version loss — the source hides that), and
publishes the zone's imports back where local clients look for services:
Consul registers them, Kubernetes mirrors them as Services, the embedded
catalog shows them in ``meshfed catalog list`` from the zone's own state.
"""

from __future__ import annotations

from typing import Protocol

from meshfed.catalog.model import CatalogSnapshot, LocalImport


class CatalogSource(Protocol):
    """A zone's services, from wherever the zone keeps them."""

    async def snapshot(self) -> CatalogSnapshot:
        """Every service now."""
        ...

    async def watch(self, since: int, timeout: float) -> CatalogSnapshot:
        """Return as soon as the version passes ``since``, or the current snapshot after ``timeout`` seconds."""
        ...

    async def publish_imports(self, imports: list[LocalImport]) -> None:
        """Make exactly these imports visible to local clients (replacing what was published before)."""
        ...

    async def aclose(self) -> None:
        """Release connections; the source is not used afterwards."""
        ...

    @property
    def last_error(self) -> str | None:
        """What the last failed read said, or None while the source answers."""
        ...
