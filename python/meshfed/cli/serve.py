"""``meshfed up``: one zone's controller, services and API in the foreground."""

from __future__ import annotations

import asyncio
import signal

import uvicorn

from meshfed.errors import MeshfedError
from meshfed.logs import configure_logging
from meshfed.runtime import ZoneSettings, assemble_zone, check_settings, raise_open_file_limit
from meshfed.zone import Zone


def serve_zone(zone: Zone, settings: ZoneSettings, *, api_address: str, log_level: str, json_logs: bool) -> None:
    """Start the zone (errors surface as one line), then serve the API until a signal."""
    host, port = split_address(api_address, "--api-address")
    check_settings(zone, settings)
    configure_logging(log_level, json=json_logs)
    raise_open_file_limit()
    asyncio.run(_serve(zone, settings, host, port, log_level))


async def _serve(zone: Zone, settings: ZoneSettings, host: str, port: int, log_level: str) -> None:
    runtime = assemble_zone(zone, settings)
    await runtime.controller.start()
    # uvicorn drains on SIGTERM, then re-raises the signal to the handler it
    # found; a no-op handler makes a drained shutdown exit 0, as orchestrators expect.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        config = uvicorn.Config(
            runtime.app(), host=host, port=port, log_level=log_level, access_log=False, log_config=None
        )
        server = uvicorn.Server(config)
        await server.serve()
        if not server.started:
            raise MeshfedError(f"the API could not listen on {host}:{port}; is the port free? (--api-address)")
    finally:
        await runtime.controller.stop()


def split_address(address: str, option: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) → (host, port), or a one-line error naming the option."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise MeshfedError(f"{option} {address!r} is not host:port")
    return host.strip("[]"), int(port)
