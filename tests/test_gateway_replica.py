"""Gateway replicas (``meshfed gateway``) serve what their zone's leader publishes, and go on when it is gone.

East runs `meshfed up --state-secret --gateway-feed` against the real kube-apiserver and
tells its peers to reach its gateway at 127.0.0.2, where only a replica listens (its
own gateway is on 127.0.0.1). West's traffic to east's services therefore crosses the
replica, and so does east's traffic to west's `web` when sent to the replica's egress
port. A service exported after the replica started reaches it through the feed; east's
leader is then SIGKILLed and traffic both ways goes on through the replica; on SIGTERM
the replica stops being ready, accepts through its drain time, then lets the connection
still open finish before it exits 0.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import orjson

from meshfed.replica.gateway_feed import decode_feed
from tests.conftest import free_port, round_trip, running_echo_server
from tests.servers import real_kubernetes
from tests.test_leadership import NAMESPACE, ProcessLog, up_candidate
from tests.test_up_federation import call, meshfed, meshfed_up
from tests.test_zone_takeover import _imported, _kubectl, _until

REPLICA_HOST = "127.0.0.2"  # loopback too; nothing else listens there


def _replica(name: str, metrics_port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "meshfed", "gateway", "--state-secret", f"{NAMESPACE}/{name}"),
            *("--listen-host", REPLICA_HOST, "--metrics-address", f"{REPLICA_HOST}:{metrics_port}"),
            *("--drain-time", "2s", "--finish-time", "20s", "--log-format", "text"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1", KUBECONFIG=real_kubernetes().admin_kubeconfig),
    )


def _readiness(metrics_port: int) -> tuple[int, dict[str, object]] | None:
    with contextlib.suppress(httpx.TransportError):
        answer = httpx.get(f"http://{REPLICA_HOST}:{metrics_port}/readyz", timeout=2)
        return answer.status_code, answer.json()
    return None


def _feed_generation(name: str) -> int:
    stored = base64.b64decode(
        _kubectl("get", "secret", f"{name}-gateway", "-n", NAMESPACE, "-o", "jsonpath={.data.manifest}")
    )
    header, config = decode_feed(stored, name, largest=1 << 20)
    assert orjson.loads(config)["identity"]["cert_chain_pem"]  # the gateway's SVID travels with its config
    return header.generation


def test_a_gateway_replica_serves_the_leaders_config_and_keeps_serving_when_the_leader_dies(tmp_path: Path) -> None:
    west_dir, east_dir = tmp_path / "west", tmp_path / "east"
    meshfed("zone", "init", "--dir", str(west_dir), "--name", "west", "--trust-domain", "west.mesh")
    meshfed("zone", "init", "--dir", str(east_dir), "--name", "east", "--trust-domain", "east.mesh")
    name = f"meshfed-test-{uuid.uuid4().hex[:8]}"
    gateway_port, egress_base, metrics_port = free_port(), free_port(), free_port()
    ports = (free_port(), free_port())
    processes: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        web, api_backend, late_backend = (stack.enter_context(running_echo_server()) for _ in range(3))
        meshfed(
            *("service", "register", "--dir", str(west_dir), "--name", "web", "--port", "tcp=7"),
            *("--endpoint", web.endpoint),
        )
        meshfed("export", "add", "--dir", str(west_dir), "--service", "web", "--to", "east")
        west = stack.enter_context(meshfed_up(west_dir))
        try:
            flags = [
                *("--state-secret", f"{NAMESPACE}/{name}", "--gateway-feed"),
                *("--gateway-address", f"127.0.0.1:{gateway_port}"),
                *("--gateway-advertise", f"{REPLICA_HOST}:{gateway_port}"),
                *("--egress-port-base", str(egress_base), "--advertise-host", "127.0.0.1"),
            ]
            env = {"KUBECONFIG": real_kubernetes().admin_kubeconfig}
            leader = up_candidate(east_dir, "east-a", flags, *ports, env)
            processes.append(leader)
            ProcessLog(leader).wait_for("API on")
            east_api = stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{ports[0]}", timeout=5))
            token = meshfed("peer", "token", "--dir", str(west_dir), "--peer", "east").strip()
            meshfed("peer", "establish", "--dir", str(east_dir), "--name", "west", "-", stdin=token)
            meshfed(
                *("service", "register", "--dir", str(east_dir), "--name", "api", "--port", "tcp=7"),
                *("--endpoint", api_backend.endpoint),
            )
            meshfed("export", "add", "--dir", str(east_dir), "--service", "api", "--to", "west")
            _until("east's import of web", lambda: _imported(east_api, east_dir, "web.default.west") is not None)

            replica = _replica(name, metrics_port)
            processes.append(replica)
            replica_log = ProcessLog(replica)
            replica_log.wait_for("applied zone east's gateway config")
            ready = _readiness(metrics_port)
            assert ready is not None
            assert ready[0] == 200, ready
            assert ready[1]["zone"] == "east"

            # West reaches east's api through the replica: only it listens where east says its gateway is.
            _until("west's import of east's api", lambda: _imported(west.api, west_dir, "api.default.east") is not None)
            api_address = _imported(west.api, west_dir, "api.default.east")
            assert api_address is not None
            _until("api through the replica", lambda: call(api_address, b"via replica") == b"via replica")
            # East's import of web, on the replica's egress listener (the leader's port, the replica's host).
            web_address = _imported(east_api, east_dir, "web.default.west")
            assert web_address is not None
            replica_web = (REPLICA_HOST, web_address[1])
            assert call(replica_web, b"out via replica") == b"out via replica"
            assert web.received.endswith(b"out via replica")
            # The replica's own data plane, in its own metrics.
            metrics = httpx.get(f"http://{REPLICA_HOST}:{metrics_port}/metrics", timeout=5).text
            assert "meshfed_gateway_connections" in metrics, metrics[:2000]

            # A change made after the replica started reaches it through the feed.
            generation = _feed_generation(name)
            meshfed(
                *("service", "register", "--dir", str(east_dir), "--name", "late", "--port", "tcp=7"),
                *("--endpoint", late_backend.endpoint),
            )
            meshfed("export", "add", "--dir", str(east_dir), "--service", "late", "--to", "west")
            _until("west's import of late", lambda: _imported(west.api, west_dir, "late.default.east") is not None)
            late_address = _imported(west.api, west_dir, "late.default.east")
            assert late_address is not None
            _until("late through the replica", lambda: call(late_address, b"late") == b"late")
            assert _feed_generation(name) > generation

            # The leader dies; nothing on the replica's connection path needed it.
            leader.kill()
            leader.wait()
            assert call(api_address, b"leaderless") == b"leaderless"
            assert call(late_address, b"leaderless too") == b"leaderless too"
            assert call(replica_web, b"still out") == b"still out"
            after = _readiness(metrics_port)
            assert after is not None
            assert after[0] == 200, after

            # SIGTERM: not ready at once, accepting through the drain time; then no new connections while
            # the open ones go on to their end, and a clean exit as soon as the last one ends.
            with socket.create_connection(api_address, timeout=5) as held:
                assert round_trip(held, b"held open") == b"held open"
                replica.send_signal(signal.SIGTERM)
                replica_log.wait_for("stopping; accepting new connections")
                draining = _readiness(metrics_port)
                assert draining is not None
                assert draining == (503, {"status": "draining"})
                assert call(api_address, b"while draining") == b"while draining"
                replica_log.wait_for("stopped accepting; open connections: 1,")
                assert call(replica_web, b"refused now") == b""
                assert round_trip(held, b"still held") == b"still held"
            assert replica.wait(timeout=15) == 0  # well before --finish-time: the last connection ended
            assert not any("still open after" in line for line in replica_log.seen)
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        _kubectl("delete", "secret", "-n", NAMESPACE, f"{name}-gateway", "--ignore-not-found")
        _kubectl("delete", "secrets", "-n", NAMESPACE, "-l", f"meshfed.io/state-replica={name}")
