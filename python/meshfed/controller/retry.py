"""Retrying what the controller must get done: applying config after a change it cannot refuse."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from meshfed.errors import MeshfedError

# The controller's parts log as the controller: operators (and tests) follow one logger.
log = logging.getLogger("meshfed.controller")


async def retrying(zone: str, what: str, action: Callable[[], Awaitable[object]]) -> None:
    """Run ``action`` until it succeeds, logging MeshfedErrors and backing off up to 30 s."""
    delay = 0.5
    while True:
        try:
            await action()
            return
        except MeshfedError as err:
            log.error("zone %s: %s failed, retrying in %.1f s: %s", zone, what, delay, err)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
