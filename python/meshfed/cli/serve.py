"""``meshfed up``: one zone's controller and API in the foreground."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from meshfed.api import create_app
from meshfed.controller import Controller
from meshfed.errors import MeshfedError
from meshfed.zone import Zone


def serve_zone(zone: Zone, *, api_address: str, gateway_address: str | None, log_level: str) -> None:
    """Start the controller (errors surface as one line), then serve the API until a signal."""
    host, port = _split(api_address)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(zone, host, port, gateway_address, log_level))


async def _serve(zone: Zone, host: str, port: int, gateway_address: str | None, log_level: str) -> None:
    controller = Controller(zone, gateway_address=gateway_address)
    await controller.start()
    # uvicorn drains on SIGTERM, then re-raises the signal to the handler it
    # found; a no-op handler makes a drained shutdown exit 0, as orchestrators expect.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server = uvicorn.Server(
            uvicorn.Config(create_app(controller), host=host, port=port, log_level=log_level, access_log=False)
        )
        await server.serve()
        if not server.started:
            raise MeshfedError(f"the API could not listen on {host}:{port}; is the port free? (--api-address)")
    finally:
        await controller.stop()


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise MeshfedError(f"--api-address {address!r} is not host:port")
    return host.strip("[]"), int(port)
