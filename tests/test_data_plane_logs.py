"""The Rust data plane's log events reach Python's ``logging``, naming what they are about.

The binding forwards the data plane's ``tracing`` events to the logger
``meshfed.gateway.data_plane`` from a thread of its own, with their fields in
the message, so an ejection or a health change shows in ``meshfed up``'s log.
Records arrive asynchronously: each test waits for its record on an event set
by a handler (with a deadline), never for a fixed time.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from meshfed.gateway.config import (
    Cluster,
    Endpoint,
    GatewayConfig,
    HealthCheck,
    PassthroughListener,
    Route,
)
from meshfed.gateway.handle import Gateway
from tests.conftest import EchoServer, client_hello_bytes, dead_endpoint, round_trip
from tests.test_gateway_dataplane import SNI, failing_over

LOGGER = "meshfed.gateway.data_plane"
# Far beyond what loopback and a 20 ms check interval need; only a broken bridge waits this long.
DEADLINE_S = 10.0


class _Arrival(logging.Handler):
    """Sets ``arrived`` when a record ``wanted`` accepts is handled (on the bridge's thread)."""

    def __init__(self, wanted: Callable[[logging.LogRecord], bool]) -> None:
        super().__init__()
        self.wanted = wanted
        self.arrived = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.wanted(record):
            self.arrived.set()


@contextmanager
def arrival_of(wanted: Callable[[logging.LogRecord], bool]) -> Iterator[threading.Event]:
    handler = _Arrival(wanted)
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    try:
        yield handler.arrived
    finally:
        logger.removeHandler(handler)


def _containing(*words: str) -> Callable[[logging.LogRecord], bool]:
    return lambda record: record.name == LOGGER and all(word in record.getMessage() for word in words)


def _records(caplog: pytest.LogCaptureFixture, wanted: Callable[[logging.LogRecord], bool]) -> list[logging.LogRecord]:
    return [record for record in caplog.records if wanted(record)]


def test_an_outlier_ejection_is_logged_naming_the_cluster_and_the_endpoint(
    caplog: pytest.LogCaptureFixture, echo_server: EchoServer
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    dead = dead_endpoint()
    config = failing_over(dead, echo_server.endpoint)
    ejected = _containing("ejected", "cluster=web", f"endpoint={dead}")
    hello = client_hello_bytes(SNI)
    with arrival_of(ejected) as arrived, Gateway(config) as gateway:
        # The first connection tries the dead local endpoint, which ejects it, then fails over.
        with socket.create_connection(gateway.address("in"), timeout=5) as raw:
            assert round_trip(raw, hello) == hello
        assert arrived.wait(DEADLINE_S), f"no ejection record on {LOGGER}: {caplog.messages}"
    (record,) = _records(caplog, ejected)
    assert record.levelno == logging.WARNING
    assert "is it listening" in record.getMessage(), "the record says what to check"


def test_health_changes_are_logged_both_ways_at_the_level_the_logger_had_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Set before the gateway starts: a start reads the logger's level again
    # (the recovery below logs at info, which the default WARNING would drop).
    caplog.set_level(logging.INFO, logger=LOGGER)
    dead = dead_endpoint()
    host, port = dead.rsplit(":", 1)
    config = GatewayConfig(
        listeners=[PassthroughListener(name="in", address="127.0.0.1:0", routes=[Route(sni=SNI, cluster="db")])],
        clusters=[
            Cluster(
                name="db",
                endpoints=[Endpoint(address=dead)],
                health_check=HealthCheck(interval_ms=20, timeout_ms=500, healthy_threshold=1, unhealthy_threshold=1),
            )
        ],
    )
    unhealthy = _containing("unhealthy", "cluster=db", f"endpoint={dead}")
    healthy = _containing("healthy again", "cluster=db", f"endpoint={dead}")
    with arrival_of(unhealthy) as down, arrival_of(healthy) as up, Gateway(config) as gateway:
        assert down.wait(DEADLINE_S), f"no unhealthy record on {LOGGER}: {caplog.messages}"
        assert gateway.unhealthy_endpoints() == {"db": [dead]}
        with socket.create_server((host, int(port))):
            assert up.wait(DEADLINE_S), f"no recovery record on {LOGGER}: {caplog.messages}"
    # The first of each: the endpoint may go down again once the server above closes.
    down_record = _records(caplog, unhealthy)[0]
    assert down_record.levelno == logging.WARNING
    assert "is it listening" in down_record.getMessage(), "the record says what to check"
    assert _records(caplog, healthy)[0].levelno == logging.INFO
