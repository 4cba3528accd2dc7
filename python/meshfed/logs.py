"""Structured logs: one JSON object per line, carrying the active trace and span ids.

Log lines and traces join on ``trace_id``: an operator who finds a slow config
apply in the traces finds its log lines by the same id.
"""

from __future__ import annotations

import datetime as dt
import logging
from enum import StrEnum
from typing import Any

import orjson
from opentelemetry import trace


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", "trace_id", "span_id", "error"}`` per record."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            line["trace_id"] = format(context.trace_id, "032x")
            line["span_id"] = format(context.span_id, "016x")
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def configure_logging(level: str, json: bool) -> None:
    """Route every logger (meshfed's, uvicorn's, grpc's) through one handler on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


class LogLevel(StrEnum):
    """``meshfed up --log-level``: refused at parse unless one of these."""

    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


class LogFormat(StrEnum):
    """``meshfed up --log-format``: one JSON object per line, or text."""

    json = "json"
    text = "text"
