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
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from meshfed.replica.gateway_feed import decode_feed
from meshfed.zone import Zone
from tests.conftest import EchoServer, free_port, round_trip, running_echo_server, settled
from tests.servers import real_consul, real_kubernetes
from tests.test_catalog_consul import ConsulUnderTest, documented_policy
from tests.test_leadership import NAMESPACE, ProcessLog, up_candidate
from tests.test_up_federation import call, meshfed, meshfed_up
from tests.test_zone_takeover import _imported, _kubectl, _until

REPLICA_HOST = "127.0.0.2"  # loopback too; nothing else listens there
GATEWAY_POLICY = (
    Path(__file__).resolve().parent.parent / "helm" / "meshfed" / "examples" / "consul-gateway-acl-policy.hcl"
)


def _readiness(metrics_port: int) -> tuple[int, dict[str, object]] | None:
    with contextlib.suppress(httpx.TransportError):
        answer = httpx.get(f"http://{REPLICA_HOST}:{metrics_port}/readyz", timeout=2)
        return answer.status_code, answer.json()
    return None


def _accepted(host: str, metrics_port: int) -> float:
    """Connections the replica's listeners accepted, from its own metrics."""
    text = httpx.get(f"http://{host}:{metrics_port}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("meshfed_gateway_connections_total{")
    )


def _feed_generation(name: str) -> int:
    stored = base64.b64decode(
        _kubectl("get", "secret", f"{name}-gateway", "-n", NAMESPACE, "-o", "jsonpath={.data.manifest}")
    )
    header, config = decode_feed(stored, name, largest=1 << 20)
    assert orjson.loads(config)["identity"]["cert_chain_pem"]  # the gateway's SVID travels with its config
    return header.generation


@dataclass
class Zones:
    """West (a plain zone exporting `web` to east) and east's leader (importing it, exporting `api` to west),
    whose peers are told its gateway is at ``advertised``."""

    name: str  # of east's state Secret (and its feed, <name>-gateway)
    west: Any
    west_dir: Path
    east_dir: Path
    east_api: httpx.Client
    leader: subprocess.Popen[bytes]
    web: EchoServer
    api_backend: EchoServer
    processes: list[subprocess.Popen[bytes]]

    def replica(self, host: str, metrics_port: int, *flags: str) -> tuple[subprocess.Popen[bytes], ProcessLog]:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "meshfed", "gateway", "--state-secret", f"{NAMESPACE}/{self.name}"),
                *("--listen-host", host, "--metrics-address", f"{host}:{metrics_port}", "--log-format", "text"),
                *flags,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1", KUBECONFIG=real_kubernetes().admin_kubeconfig),
        )
        self.processes.append(process)
        log = ProcessLog(process)
        log.wait_for("applied zone east's gateway config")
        return process, log

    def west_import(self, service: str) -> tuple[str, int]:
        """Where west's clients reach east's ``service`` (waiting for the import)."""
        _until(f"west's import of {service}", lambda: _imported(self.west.api, self.west_dir, service) is not None)
        address = _imported(self.west.api, self.west_dir, service)
        assert address is not None
        return address


@contextlib.contextmanager
def _zones(tmp_path: Path, gateway_port: int, advertised: list[str]) -> Iterator[Zones]:
    west_dir, east_dir = tmp_path / "west", tmp_path / "east"
    meshfed("zone", "init", "--dir", str(west_dir), "--name", "west", "--trust-domain", "west.mesh")
    meshfed("zone", "init", "--dir", str(east_dir), "--name", "east", "--trust-domain", "east.mesh")
    name = f"meshfed-test-{uuid.uuid4().hex[:8]}"
    processes: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        web, api_backend = stack.enter_context(running_echo_server()), stack.enter_context(running_echo_server())
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
                *(flag for address in advertised for flag in ("--gateway-advertise", address)),
                *("--egress-port-base", str(free_port()), "--advertise-host", "127.0.0.1"),
            ]
            ports = (free_port(), free_port())
            leader = up_candidate(east_dir, "east-a", flags, *ports, {"KUBECONFIG": real_kubernetes().admin_kubeconfig})
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
            yield Zones(name, west, west_dir, east_dir, east_api, leader, web, api_backend, processes)
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            _kubectl("delete", "secret", "-n", NAMESPACE, f"{name}-gateway", "--ignore-not-found")
            _kubectl("delete", "secrets", "-n", NAMESPACE, "-l", f"meshfed.io/state-replica={name}")


def test_a_gateway_replica_serves_the_leaders_config_and_keeps_serving_when_the_leader_dies(tmp_path: Path) -> None:
    gateway_port, metrics_port = free_port(), free_port()
    with _zones(tmp_path, gateway_port, [f"{REPLICA_HOST}:{gateway_port}"]) as zones, running_echo_server() as late:
        replica, replica_log = zones.replica(REPLICA_HOST, metrics_port, "--drain-time", "2s", "--finish-time", "20s")
        ready = _readiness(metrics_port)
        assert ready is not None
        assert ready[0] == 200, ready
        assert ready[1]["zone"] == "east"

        # West reaches east's api through the replica: only it listens where east says its gateway is.
        api_address = zones.west_import("api.default.east")
        _until("api through the replica", lambda: call(api_address, b"via replica") == b"via replica")
        # East's import of web, on the replica's egress listener (the leader's port, the replica's host).
        web_address = _imported(zones.east_api, zones.east_dir, "web.default.west")
        assert web_address is not None
        replica_web = (REPLICA_HOST, web_address[1])
        assert call(replica_web, b"out via replica") == b"out via replica"
        assert zones.web.received.endswith(b"out via replica")
        # The replica's own data plane, in its own metrics.
        metrics = httpx.get(f"http://{REPLICA_HOST}:{metrics_port}/metrics", timeout=5).text
        assert "meshfed_gateway_connections" in metrics, metrics[:2000]

        # A change made after the replica started reaches it through the feed.
        generation = _feed_generation(zones.name)
        meshfed(
            *("service", "register", "--dir", str(zones.east_dir), "--name", "late", "--port", "tcp=7"),
            *("--endpoint", late.endpoint),
        )
        meshfed("export", "add", "--dir", str(zones.east_dir), "--service", "late", "--to", "west")
        late_address = zones.west_import("late.default.east")
        _until("late through the replica", lambda: call(late_address, b"late") == b"late")
        assert _feed_generation(zones.name) > generation

        # The leader dies; nothing on the replica's connection path needed it.
        zones.leader.kill()
        zones.leader.wait()
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


def test_replacing_gateway_replicas_one_at_a_time_fails_no_request(tmp_path: Path) -> None:
    """A rolling update at process level: of two replicas both serving peers, each is stopped (SIGTERM)
    and replaced in turn while west calls east's api in a loop; not one call fails. A stream west opens
    on a replica that no longer serves is answered 421 or refused before any client byte moved, so west
    opens it again on the other replica (the tunnel's open/accept); what was open ends first (the drain)."""
    hosts = ("127.0.0.2", "127.0.0.3")
    gateway_port, metrics = free_port(), {host: free_port() for host in hosts}
    with _zones(tmp_path, gateway_port, [f"{host}:{gateway_port}" for host in hosts]) as zones:
        drain = ("--drain-time", "1s", "--finish-time", "10s")
        running = {host: zones.replica(host, metrics[host], *drain) for host in hosts}
        api_address = zones.west_import("api.default.east")
        _until("api through the replicas", lambda: call(api_address, b"up") == b"up")
        outcomes: list[bool] = []
        stop = threading.Event()

        def calls() -> None:  # bounded: each call times out in 5 s, and the loop ends when told
            while not stop.is_set():
                outcomes.append(call(api_address, b"ping") == b"ping")

        def count() -> int:
            return len(outcomes)

        caller = threading.Thread(target=calls, daemon=True)
        caller.start()
        try:
            for host in hosts:
                process, _ = running[host]
                # It carries some of the calls: the loop does cross the replica being stopped.
                accepted: Callable[[], float] = functools.partial(_accepted, host, metrics[host])
                settled(accepted, (20.0).__lt__, f"calls via {host}", every=0.1)
                process.send_signal(signal.SIGTERM)
                assert process.wait(timeout=30) == 0
                # Its successor, on its address, from the feed (the leader still runs and publishes).
                before = len(outcomes)
                running[host] = zones.replica(host, metrics[host], *drain)
                settled(count, (before + 50).__lt__, "calls after the replacement", every=0.1)
            settled(count, (200).__lt__, "calls in all", every=0.1)
        finally:
            stop.set()
            caller.join(timeout=30)
        failed = outcomes.count(False)
        print(f"{len(outcomes)} calls across two replica replacements, {failed} failed")
        assert failed == 0, f"{failed} of {len(outcomes)} calls failed"


def test_a_gateway_replica_reads_the_feed_in_consul_kv_with_a_token_that_reads_nothing_else(tmp_path: Path) -> None:
    """`meshfed up --state-kv --gateway-feed` and `meshfed gateway --state-kv`, against the real Consul with ACLs:
    the replica's token comes from the documented policy, which lets it read the feed and not the zone's state."""
    real = real_consul()
    consul = ConsulUnderTest(real.address, real.management_token)
    try:
        state = f"meshfed/{consul.zone}/state"
        rules = GATEWAY_POLICY.read_text()
        assert rules.count('"meshfed/east/state/') == 1, f"{GATEWAY_POLICY} no longer names meshfed/east/state"
        replica_token = consul.token_file(tmp_path, rules.replace('"meshfed/east/state/', f'"{state}/'), "gateway")
        zone_token = consul.meshfed_token(tmp_path)
        Zone.init(tmp_path / "east", consul.zone, "east.mesh")
        with (tmp_path / "east" / "zone.toml").open("a") as config:
            config.write(f'\n[consul]\naddress = "{consul.address}"\ntoken_file = "{zone_token}"\n')
        api_port, leader_metrics = ports()
        leader = up_candidate(
            tmp_path / "east", "east-a", ["--state-kv", state, "--gateway-feed"], api_port, leader_metrics, {}
        )
        replica: subprocess.Popen[bytes] | None = None
        try:
            ProcessLog(leader).wait_for("API on")
            metrics_port = free_port()
            replica = subprocess.Popen(
                [
                    *(sys.executable, "-m", "meshfed", "gateway", "--state-kv", state),
                    *("--consul-address", consul.address, "--consul-token-file", str(replica_token)),
                    *("--listen-host", REPLICA_HOST, "--metrics-address", f"{REPLICA_HOST}:{metrics_port}"),
                    *("--log-format", "text"),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
            ProcessLog(replica).wait_for(f"applied zone {consul.zone}'s gateway config")
            ready = _readiness(metrics_port)
            assert ready is not None
            assert (ready[0], ready[1]["zone"]) == (200, consul.zone)
            # The same token may not read the zone's state (its CA key among it): Consul refuses it.
            secret = replica_token.read_text().strip()
            refused = httpx.get(f"{consul.address}/v1/kv/{state}/manifest", headers={"X-Consul-Token": secret})
            assert refused.status_code == 403, refused.text

            # The zone's token loses its write on the prefix: the leader cannot keep its state durable,
            # and its /readyz says so instead of "ready".
            rules_now = documented_policy(consul.node, [])
            consul.update_policy(
                zone_token,
                rules_now.replace(
                    f'key_prefix "{state}/" {{\n  policy = "write"', f'key_prefix "{state}/" {{\n  policy = "read"'
                ),
            )
            meshfed(
                "service",
                "register",
                "--dir",
                str(tmp_path / "east"),
                "--name",
                "api",
                "--port",
                "tcp=7",
                "--endpoint",
                "127.0.0.1:9",
            )

            def leader_problems() -> list[str]:
                with contextlib.suppress(httpx.TransportError):
                    return list(httpx.get(f"http://127.0.0.1:{leader_metrics}/readyz", timeout=2).json()["problems"])
                return []

            (problem,) = settled(leader_problems, bool, "the leader's replica problem", timeout=30, every=0.2)
            assert problem.startswith("state replica: "), problem
            assert f'add `key_prefix "{state}/" {{ policy = "write" }}`' in problem  # the rule the prefix needs
            consul.update_policy(zone_token, rules_now)
            settled(leader_problems, lambda found: not found, "the problem cleared", timeout=30, every=0.2)
        finally:
            for process in (leader, replica):
                if process is not None and process.poll() is None:
                    process.kill()
                    process.wait()
            consul.call("DELETE", f"/v1/kv/{state}?recurse=true")
    finally:
        consul.cleanup()


def ports() -> tuple[int, int]:
    return free_port(), free_port()
