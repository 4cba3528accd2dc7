"""Three zones as operators run them: `meshfed up` processes, driven only by the CLI and the HTTP API.

east and north both run `web` and export it to west; west reaches it through one failover
listener. Stopping east's backend moves west's traffic to north. Nothing here imports the
controller: every step is a command or an HTTP call, as in the README.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from meshfed.zone import Zone
from tests.conftest import EchoServer, free_port, round_trip, running_echo_server


def meshfed(*args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "meshfed", *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"meshfed {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


@dataclass
class RunningZone:
    directory: Path
    api: httpx.Client

    def until(self, what: str, check: object, timeout: float = 20.0) -> None:
        assert callable(check)
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)


@contextlib.contextmanager
def meshfed_up(directory: Path) -> Iterator[RunningZone]:
    api_port = free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "meshfed", "up", "--dir", str(directory)),
            *("--api-address", f"127.0.0.1:{api_port}"),
            *("--gateway-address", f"127.0.0.1:{free_port()}"),
            *("--peering-address", f"127.0.0.1:{free_port()}"),
            *("--establish-address", f"127.0.0.1:{free_port()}"),
            *("--advertise-host", "127.0.0.1", "--egress-port-base", "0", "--health-check-interval", "1s"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1"),
    )
    api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=5)
    try:
        zone = RunningZone(directory, api)

        def ready() -> bool:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            with contextlib.suppress(httpx.TransportError):
                return api.get("/readyz").status_code == 200
            return False

        zone.until(f"{directory.name} ready", ready, timeout=30)
        yield zone
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=20)
        # A crash says where: faulthandler's trace of every thread is the end of the zone's stderr.
        assert code == 0, (code, process.stderr.read().decode()[-8000:] if process.stderr else "")
    finally:
        api.close()
        process.kill()
        process.wait()


def call(address: tuple[str, int], payload: bytes) -> bytes:
    try:
        with socket.create_connection(address, timeout=5) as sock:
            return round_trip(sock, payload)
    except OSError:
        return b""


def test_three_meshfed_up_zones_peer_by_cli_and_fail_over(tmp_path):
    for name in ("east", "north", "west"):
        meshfed("zone", "init", "--dir", str(tmp_path / name), "--name", name, "--trust-domain", f"{name}.mesh")
    with contextlib.ExitStack() as stack:
        backends: dict[str, EchoServer] = {}
        for name in ("east", "north"):
            backends[name] = stack.enter_context(running_echo_server())
            meshfed(
                *("service", "register", "--dir", str(tmp_path / name), "--name", "web", "--port", "tcp=7"),
                *("--endpoint", backends[name].endpoint),
            )
            meshfed("export", "add", "--dir", str(tmp_path / name), "--service", "web", "--to", "west")
        zones = {name: stack.enter_context(meshfed_up(tmp_path / name)) for name in ("east", "north", "west")}
        west = zones["west"]

        # Token misuse is refused and leaves nothing behind.
        refused = subprocess.run(
            [sys.executable, "-m", "meshfed", "peer", "establish", "--dir", str(tmp_path / "west"), "garbage"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert refused.returncode != 0
        assert "Traceback" not in refused.stderr
        for exporter in ("east", "north"):
            token = meshfed("peer", "token", "--dir", str(tmp_path / exporter), "--peer", "west").strip()
            meshfed("peer", "establish", "--dir", str(tmp_path / "west"), "--name", exporter, "-", stdin=token)
        reused = subprocess.run(
            [sys.executable, "-m", "meshfed", "peer", "establish", "--dir", str(tmp_path / "west"), "--name", "x", "-"],
            input=token,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert reused.returncode != 0

        def group_address() -> tuple[str, int] | None:
            reader = {"Authorization": f"Bearer {Zone.open(west.directory).read_token()}"}
            groups = west.api.get("/v1/catalog", headers=reader).json()["failover_groups"]
            if not groups or "tcp" not in groups[0]["listeners"]:
                return None
            assert groups[0]["sources"] == ["east", "north"]
            host, port = groups[0]["listeners"]["tcp"].rsplit(":", 1)
            return host, int(port)

        west.until("west's failover group for web", lambda: group_address() is not None)
        address = group_address()
        assert address is not None
        west.until("web answered through the gateways", lambda: call(address, b"ping") == b"ping")
        assert backends["east"].received.startswith(b"ping")
        assert not backends["north"].received

        backends["east"].stop()
        stopped = time.monotonic()
        west.until("traffic failed over to north", lambda: call(address, b"failover") == b"failover")
        failover_seconds = time.monotonic() - stopped
        for _ in range(10):
            assert call(address, b"steady") == b"steady"
        assert backends["north"].received.endswith(b"steady" * 10)
        print(f"failover through `meshfed up` zones: {failover_seconds:.1f} s")

        # /metrics serves peering and gateway series; writes need the admin token.
        metrics = west.api.get("/metrics").text
        assert 'meshfed_peering_state{peer="east",state="ACTIVE"} 1.0' in metrics
        assert "meshfed_gateway_cluster_connections_total" in metrics
        body = {"service": "web", "to": ["east"]}
        assert west.api.post("/v1/exports", json=body).status_code == 401
        wrong = {"Authorization": "Bearer not-the-token"}
        assert west.api.post("/v1/exports", json=body, headers=wrong).status_code == 403
        admin = {"Authorization": f"Bearer {Zone.open(tmp_path / 'west').admin_token()}"}
        assert west.api.post("/v1/exports", json=body, headers=admin).status_code == 201
