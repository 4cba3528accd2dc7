"""The one interface every catalog source implements: list, then watch from a version."""

from __future__ import annotations

from typing import Protocol

from meshfed.catalog.model import CatalogSnapshot


class CatalogSource(Protocol):
    """A zone's services. ``watch`` returns as soon as the version passes ``since``, or on timeout."""

    async def snapshot(self) -> CatalogSnapshot: ...

    async def watch(self, since: int, timeout: float) -> CatalogSnapshot: ...
