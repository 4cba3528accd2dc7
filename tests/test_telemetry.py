"""Traces of control-plane work and JSON logs that carry their trace ids."""

from __future__ import annotations

import asyncio
import logging

import orjson
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshfed.controller import Controller
from meshfed.logs import JsonFormatter


def test_config_applies_are_traced_and_logs_carry_the_trace_id(make_zone):
    exporter = InMemorySpanExporter()
    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            # Format now: the trace context is only current while the record is emitted.
            record.msg = JsonFormatter().format(record)
            record.args = None
            records.append(record)

    handler = Capture(level=logging.DEBUG)
    logger = logging.getLogger("meshfed.controller")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:

        async def scenario() -> None:
            async with Controller(make_zone("east"), gateway_address="127.0.0.1:0", span_exporter=exporter) as east:
                await east.reconfigure()

        asyncio.run(scenario())
    finally:
        logger.removeHandler(handler)

    (span,) = [span for span in exporter.get_finished_spans() if span.name == "meshfed.gateway.apply"]
    assert span.attributes is not None
    assert span.attributes["meshfed.zone"] == "east"
    assert span.attributes["meshfed.gateway.listeners"] == 1
    applied = [orjson.loads(r.getMessage()) for r in records if "gateway config applied" in r.getMessage()]
    assert applied, "no log line for the apply"
    assert applied[0]["trace_id"] == format(span.context.trace_id, "032x")
    assert applied[0]["level"] == "debug"
    assert applied[0]["logger"] == "meshfed.controller"


def test_json_formatter_outside_a_span_has_no_trace_id():
    record = logging.LogRecord("meshfed.x", logging.WARNING, __file__, 1, "peer %s is %s", ("east", "FAILING"), None)
    line = orjson.loads(JsonFormatter().format(record))
    assert line["message"] == "peer east is FAILING"
    assert line["level"] == "warning"
    assert "trace_id" not in line
