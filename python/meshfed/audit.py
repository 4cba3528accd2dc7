"""The zone's audit log: one JSON line per admin mutation, whoever made it.

Mutations arrive two ways: through the API (an admin token) and through the
CLI, which writes the zone directory directly. Both call :func:`record`, which
appends to ``audit.log`` in the zone directory and logs the same line on the
``meshfed.audit`` logger, so an operator finds who changed what and when in the
file that survives restarts and in the log pipeline alike.
"""

from __future__ import annotations

import datetime as dt
import getpass
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from starlette.requests import Request

AUDIT_FILE = "audit.log"
_log = logging.getLogger("meshfed.audit")


def cli_actor() -> str:
    """``cli:<os user>``: who ran a command that writes the zone directory."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid-{os.getuid()}"
    return f"cli:{user}"


def api_actor(request: Request) -> str:
    """``api:admin@<client host>``: who made an admin call (the admin token is the only one that mutates)."""
    host = request.client.host if request.client is not None else "unknown"
    return f"api:admin@{host}"


def record(zone_directory: Path, *, actor: str, action: str, target: str, **detail: Any) -> None:
    """Append ``{"ts", "actor", "action", "target", ...detail}`` to the zone's audit log.

    ``action`` is a verb on a noun (``export.add``, ``authz.remove``); ``target`` names the object
    (``cart.shop``, ``peer west``). A failure to write the file is logged, never raised: the
    mutation already happened, and hiding it from the caller would be worse than a missing line.
    """
    line: dict[str, Any] = {
        "ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        "actor": actor,
        "action": action,
        "target": target,
        **detail,
    }
    data = orjson.dumps(line)
    _log.info("audit: %s", data.decode())
    path = zone_directory / AUDIT_FILE
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(descriptor, data + b"\n")
        finally:
            os.close(descriptor)
    except OSError as err:
        _log.error("cannot append to the audit log %s: %s; check the zone directory's permissions", path, err)
