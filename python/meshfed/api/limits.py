"""What one API request may cost the zone: a body cap, and validation errors that stay small.

Every list in a request model has a ``max_length`` from the constants here, so
no single call can grow the zone's state without bound; the body cap bounds
what is read and parsed before validation even starts. Both are written once
here and appear in the OpenAPI spec (``maxItems``) or in the 413's message.

A 422 names what is wrong (``loc``, ``msg``, ``type``) and never echoes the
input back: a megabyte of bad input must not become a megabyte of error.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY_BYTES = 1 << 20  # 1 MiB: a trust bundle or a peering token is a few KiB
MAX_EXPORT_PEERS = 1000  # peers named in one export request ('*' covers any number)
MAX_REPORTED_ERRORS = 20  # validation errors listed in one 422; the rest are counted
_MAX_ERROR_TEXT = 200  # characters of one message or location part kept in a 422

# As numbers: Starlette renamed both constants (413 "Content Too Large", 422 "Unprocessable Content").
_TOO_LARGE_STATUS, _UNPROCESSABLE = 413, 422
_TOO_LARGE = f"the request body is larger than {MAX_BODY_BYTES} bytes (1 MiB); send less per call"


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413, whether or not it declares its length.

    A declared Content-Length over the cap is refused before anything is read;
    a chunked or understated body is counted as it streams and refused as soon
    as it passes the cap, so it is never buffered whole.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _too_large(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException passes through FastAPI's body parsing to its handler, which answers 413.
                    raise HTTPException(_TOO_LARGE_STATUS, _TOO_LARGE)
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length itself
    return None


async def _too_large(scope: Scope, receive: Receive, send: Send) -> None:
    response = JSONResponse({"detail": _TOO_LARGE}, status_code=_TOO_LARGE_STATUS)
    await response(scope, receive, send)


def install(app: FastAPI) -> None:
    """Add the body cap and the compact validation-error handler to ``app``."""
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    app.add_exception_handler(RequestValidationError, _validation_error)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    body: dict[str, Any] = {"detail": [_compact(error) for error in errors[:MAX_REPORTED_ERRORS]]}
    if len(errors) > MAX_REPORTED_ERRORS:
        body["omitted"] = len(errors) - MAX_REPORTED_ERRORS
    return JSONResponse(body, status_code=_UNPROCESSABLE)


def _compact(error: Any) -> dict[str, Any]:
    # loc parts may be keys of the input (a dict field's keys): cut them like messages.
    return {
        "loc": [part if isinstance(part, int) else _cut(str(part)) for part in error.get("loc", ())],
        "msg": _cut(str(error.get("msg", ""))),
        "type": str(error.get("type", "")),
    }


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_ERROR_TEXT else f"{text[:_MAX_ERROR_TEXT]}..."


__all__ = ["MAX_BODY_BYTES", "MAX_EXPORT_PEERS", "MAX_REPORTED_ERRORS", "BodyLimit", "install"]
