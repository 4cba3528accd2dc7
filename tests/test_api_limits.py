"""What one API call may cost a zone: bodies capped at 1 MiB as they stream, bounded lists, small 422s.

The zone's app (``create_app``) on a real uvicorn server on loopback, so bodies
really stream: declared, chunked, and larger than they claim.
"""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import orjson
import pytest
import uvicorn

from meshfed.api import create_app
from meshfed.api.limits import MAX_BODY_BYTES, MAX_EXPORT_PEERS, MAX_REPORTED_ERRORS
from meshfed.controller import Controller, ControllerSettings
from meshfed.federation.exports import ExportRules
from meshfed.zone import Zone


@dataclass
class Api:
    zone: Zone
    client: httpx.Client
    address: tuple[str, int]

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.zone.admin_token()}", "Content-Type": "application/json"}

    def exports(self) -> int:
        with ExportRules(self.zone.directory) as rules:
            return len(rules.rules())


@pytest.fixture
def api(make_zone) -> Iterator[Api]:
    zone = make_zone("east")
    # The routes under test need no running controller: no lifespan, no gateway.
    app = create_app(Controller(zone, ControllerSettings(gateway_address="127.0.0.1:0", egress_port_base=0)))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    # Listening before the server runs: requests queue in the backlog until it accepts, no waiting here.
    listener = socket.create_server(("127.0.0.1", 0))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(sockets=[listener]),), daemon=True)
    thread.start()
    address = listener.getsockname()[:2]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{address[1]}", timeout=30) as client:
            yield Api(zone, client, address)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        loop.close()
        listener.close()


def _export(peers: int) -> bytes:
    return orjson.dumps({"service": "web", "to": [f"peer-{index}" for index in range(peers)]})


def test_a_ten_megabyte_export_is_refused_with_413_and_changes_nothing(api):
    """The issue's case: a million `to` entries used to return 201 and grow the zone to 737 MB."""
    body = _export(1_000_000)
    assert len(body) > 10 * MAX_BODY_BYTES
    response = api.client.post("/v1/exports", content=body, headers=api.admin)
    assert response.status_code == 413
    assert response.json() == {
        "detail": f"the request body is larger than {MAX_BODY_BYTES} bytes (1 MiB); send less per call"
    }
    assert api.exports() == 0


def test_a_chunked_body_is_counted_as_it_streams(api):
    """No Content-Length to check: the cap holds on the bytes received."""
    body = _export(200_000)
    assert len(body) > MAX_BODY_BYTES

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    response = api.client.post("/v1/exports", content=chunks(), headers=api.admin)
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert api.exports() == 0


def test_a_body_that_never_ends_is_refused_once_past_the_cap(api):
    """A chunked body with no last chunk: a server that buffered it whole would never answer.

    The client stops sending (without ending the body) at 64x the cap, so a broken server fails the test by
    its deadline rather than by memory.
    """
    head = (
        "POST /v1/exports HTTP/1.1\r\nHost: zone\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {api.zone.admin_token()}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"[" * 65536
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    deadline = time.monotonic() + 30
    with socket.create_connection(api.address, timeout=30) as sock, selectors.DefaultSelector() as selector:
        sock.sendall(head)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        pending, reply, sent = framed, b"", 0
        while not reply:
            assert time.monotonic() < deadline, "no answer while the body kept coming"
            for _, events in selector.select(deadline - time.monotonic()):
                if events & selectors.EVENT_READ:
                    reply = sock.recv(65536)
                elif events & selectors.EVENT_WRITE:
                    try:
                        written = sock.send(pending)
                    except (BrokenPipeError, ConnectionResetError):
                        selector.modify(sock, selectors.EVENT_READ)  # refused: read the answer
                        continue
                    sent += written
                    pending = pending[written:] or framed
                    if sent >= 64 * MAX_BODY_BYTES:
                        selector.modify(sock, selectors.EVENT_READ)
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]


def test_a_body_under_the_cap_is_served(api):
    response = api.client.post("/v1/exports", content=_export(3), headers=api.admin)
    assert response.status_code == 201
    assert api.exports() == 3


def test_list_fields_are_capped_and_the_cap_is_in_the_spec(api):
    too_many = api.client.post("/v1/exports", content=_export(MAX_EXPORT_PEERS + 1), headers=api.admin)
    assert too_many.status_code == 422
    limit = f"List should have at most {MAX_EXPORT_PEERS} items after validation, not {MAX_EXPORT_PEERS + 1}"
    assert too_many.json() == {
        "detail": [
            {
                "loc": ["body", "to"],
                "msg": limit,
                "type": "too_long",
            }
        ]
    }
    assert api.exports() == 0
    at_cap = api.client.post("/v1/exports", content=_export(MAX_EXPORT_PEERS), headers=api.admin)
    assert at_cap.status_code == 201
    schemas = api.client.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["ExportRequest"]["properties"]["to"]["maxItems"] == MAX_EXPORT_PEERS


def test_every_list_field_of_every_request_model_is_capped(api):
    """A new request model with an unbounded list fails here, not in production."""
    spec = api.client.get("/openapi.json").json()
    request_schemas = set()
    for path in spec["paths"].values():
        for operation in path.values():
            content = operation.get("requestBody", {}).get("content", {})
            for media in content.values():
                reference = media.get("schema", {}).get("$ref", "")
                if reference:
                    request_schemas.add(reference.rsplit("/", 1)[1])
    assert "ExportRequest" in request_schemas
    schemas = spec["components"]["schemas"]
    for name in request_schemas:
        for field, schema in schemas[name]["properties"].items():
            for variant in schema.get("anyOf", [schema]):
                if variant.get("type") == "array":
                    assert "maxItems" in variant, f"{name}.{field} is a list without max_length"


def test_a_422_never_echoes_the_input(api):
    secretive = "x" * 100_000
    body = orjson.dumps({"service": secretive, "namespace": {"k" * 5000: 1}, "to": [secretive] * 5, "extra": secretive})
    response = api.client.post("/v1/exports", content=body, headers=api.admin)
    assert response.status_code == 422
    assert len(response.content) < 5000, "the 422 grew with the input"
    assert "x" * 300 not in response.text
    for error in response.json()["detail"]:
        assert set(error) == {"loc", "msg", "type"}


def test_a_422_reports_a_bounded_number_of_errors(api):
    body = orjson.dumps({"service": "web", "to": ["x" * 64] * 500})  # 500 names over 63 characters
    response = api.client.post("/v1/exports", content=body, headers=api.admin)
    assert response.status_code == 422
    document = response.json()
    assert len(document["detail"]) == MAX_REPORTED_ERRORS
    assert document["omitted"] == 500 - MAX_REPORTED_ERRORS
    assert document["detail"][0] == {
        "loc": ["body", "to", 0],
        "msg": "String should have at most 63 characters",
        "type": "string_too_long",
    }


def test_malformed_json_is_a_small_422(api):
    response = api.client.post("/v1/exports", content=b'{"service": "web", "to": [' + b"1," * 1000, headers=api.admin)
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"
    assert len(response.content) < 500
