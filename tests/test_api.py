"""The zone API on a real uvicorn server on loopback, with a real gateway behind it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from meshfed.api import create_app
from meshfed.catalog import EmbeddedCatalog, Endpoint, Service
from meshfed.controller import Controller, ControllerSettings
from meshfed.trust.bundle import parse_bundle
from meshfed.zone import Zone
from tests.conftest import free_port, write_svid


@dataclass
class RunningZone:
    zone: Zone
    controller: Controller
    api: httpx.Client

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.zone.admin_token()}"}

    @property
    def reader(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.zone.read_token()}"}


@pytest.fixture
def running_east(make_zone) -> Iterator[RunningZone]:
    zone = make_zone("east")
    controller = Controller(zone, ControllerSettings(gateway_address="127.0.0.1:0", egress_port_base=0))
    server = uvicorn.Server(uvicorn.Config(create_app(controller), host="127.0.0.1", port=0, log_level="warning"))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive(), "the API server died while starting"
        assert time.monotonic() < deadline, "the API server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        yield RunningZone(zone, controller, client)
    server.should_exit = True
    thread.join(timeout=20)
    loop.close()
    assert not controller.ready, "the lifespan did not stop the controller"


def test_health_readiness_and_zone_info(running_east):
    assert running_east.api.get("/healthz").json() == {"status": "ok"}
    assert running_east.api.get("/readyz").status_code == 200
    assert running_east.api.get("/v1/zone").status_code == 401
    info = running_east.api.get("/v1/zone", headers=running_east.reader).json()
    assert info["name"] == "east"
    assert info["trust_domain"] == "east.mesh"
    paths = running_east.api.get("/openapi.json").json()["paths"]
    assert {"/healthz", "/readyz", "/metrics", "/v1/zone", "/v1/gateway/stats"} <= set(paths)


def test_mutating_calls_need_the_admin_token(running_east):
    api = running_east.api
    assert api.post("/v1/gateway/reconfigure").status_code == 401
    wrong = api.post("/v1/gateway/reconfigure", headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 403
    assert api.post("/v1/gateway/reconfigure", headers=running_east.admin).status_code == 204
    assert api.get("/v1/gateway/config").status_code == 401


def test_gateway_config_is_served_without_the_private_key(running_east):
    response = running_east.api.get("/v1/gateway/config", headers=running_east.admin)
    assert response.status_code == 200
    assert response.json()["identity"]["private_key_pem"] == "<redacted>"
    assert "PRIVATE KEY" not in response.text


def test_imported_trust_reaches_the_running_gateway_without_restart(running_east, make_zone, tmp_path):
    east = running_east.zone
    west = make_zone("west")
    ingress = running_east.controller.gateway.address("ingress")
    caller = write_svid(west, "spiffe://west.mesh/ns/default/sa/app", tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=east.trust.own_bundle().to_pem().decode())
    context.load_cert_chain(caller.cert, caller.key)

    def outcome_of_one_call() -> tuple[int, int]:
        """(handshake failures, no-route refusals) after one more call: which side of the handshake refused it."""
        with (
            socket.create_connection(ingress, timeout=5) as raw,
            contextlib.suppress(ssl.SSLError, ConnectionError),
            context.wrap_socket(raw) as tls,
        ):
            tls.sendall(b"hello")
            tls.recv(1)
        listeners = running_east.api.get("/v1/gateway/stats", headers=running_east.reader).json()["listeners"]
        ingress_stats = listeners["ingress"]
        return ingress_stats["handshake_failures"], ingress_stats["no_route"]

    # west.mesh not trusted yet: refused at the handshake.
    assert outcome_of_one_call() == (1, 0)
    east.trust.import_bundle(parse_bundle(west.trust_domain, west.trust.own_bundle().to_spiffe_json()))
    assert running_east.api.post("/v1/gateway/reconfigure", headers=running_east.admin).status_code == 204
    # Now the SVID verifies, and the call gets as far as routing (nothing is exported to west).
    assert outcome_of_one_call() == (1, 1)
    assert running_east.controller.gateway.address("ingress") == ingress


def test_metrics_serve_gateway_series(running_east):
    with socket.create_connection(running_east.controller.gateway.address("ingress"), timeout=5) as sock:
        sock.sendall(b"not tls at all\r\n\r\n")
        # The gateway closes at once, the bytes unread: a reset, or an orderly close if it comes first.
        with contextlib.suppress(ConnectionResetError):
            sock.recv(1)
    text = running_east.api.get("/metrics").text
    assert 'meshfed_gateway_connections_total{listener="ingress"' in text
    assert 'meshfed_gateway_handshake_failures_total{listener="ingress"' in text


def _side_ports() -> list[str]:
    """Free loopback ports for the listeners a test does not look at."""
    return [
        "--peering-address",
        f"127.0.0.1:{free_port()}",
        "--establish-address",
        f"127.0.0.1:{free_port()}",
        "--egress-port-base",
        "0",
    ]


def test_meshfed_up_serves_until_sigterm_and_exits_cleanly(tmp_path: Path):
    Zone.init(tmp_path / "east", "east", "east.mesh")
    api_port, gateway_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshfed",
            "up",
            "--dir",
            str(tmp_path / "east"),
            "--api-address",
            f"127.0.0.1:{api_port}",
            "--gateway-address",
            f"127.0.0.1:{gateway_port}",
            *_side_ports(),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{api_port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "meshfed up did not become ready"
            time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", gateway_port), timeout=5):
            pass
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        process.kill()
        process.wait()
    for port in (api_port, gateway_port):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"


def test_meshfed_up_reports_a_busy_gateway_port_in_one_line(tmp_path: Path):
    Zone.init(tmp_path / "east", "east", "east.mesh")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "meshfed",
                "up",
                "--dir",
                str(tmp_path / "east"),
                "--api-address",
                f"127.0.0.1:{free_port()}",
                "--gateway-address",
                f"127.0.0.1:{port}",
                *_side_ports(),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"--gateway-address 127.0.0.1:{port}: cannot listen there: address already in use" in result.stderr
    assert "is another zone or program using the port?" in result.stderr


def test_exports_and_catalog_over_the_api(running_east):
    api, admin, reader = running_east.api, running_east.admin, running_east.reader
    with EmbeddedCatalog(running_east.zone.directory) as catalog:
        catalog.register(Service(name="web", ports={"http": 8080}, endpoints=[Endpoint(address="127.0.0.1", port=9)]))
    deadline = time.monotonic() + 5
    while not api.get("/v1/catalog", headers=reader).json()["services"]:
        assert time.monotonic() < deadline, "the controller did not see the new service"
        time.sleep(0.05)
    assert api.get("/v1/catalog", headers=reader).json()["services"][0]["name"] == "web"

    body = {"service": "web", "to": ["west"]}
    assert api.post("/v1/exports", json=body).status_code == 401
    assert api.post("/v1/exports", json=body, headers=admin).status_code == 201
    assert api.get("/v1/exports", headers=reader).json() == [{"service": "web", "namespace": "default", "peer": "west"}]
    for bad in ({"service": "Web", "to": ["west"]}, {"service": "web", "to": []}, {"service": "web", "to": ["a b"]}):
        assert api.post("/v1/exports", json=bad, headers=admin).status_code in (400, 422), bad
    assert api.delete("/v1/exports/default/nothing", headers=admin).status_code == 404
    assert api.delete("/v1/exports/default/web", headers=admin).json() == {
        "service": "web",
        "namespace": "default",
        "to": None,
        "removed": 1,
    }
    assert api.get("/v1/exports", headers=reader).json() == []
