"""The demo is the product's smoke test: three zones, tokens, the peering stream, real mTLS."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import threading

from rich.console import Console

from meshfed.demo import run_demo

WEST_GATEWAY = "spiffe://west.mesh/ns/meshfed-system/sa/gateway"


def test_demo_sends_every_request_through_both_peers_gateways():
    output = io.StringIO()
    threads_before = set(threading.enumerate())
    report = run_demo(requests=40, concurrency=4, console=Console(file=output, width=200))
    assert report.ok, output.getvalue()
    assert report.sent == report.succeeded == 40
    assert {zone: len(latencies) for zone, latencies in report.latencies_ms.items()} == {"east": 20, "north": 20}
    assert report.ingress_verified == {"east": {WEST_GATEWAY: 20}, "north": {WEST_GATEWAY: 20}}
    assert report.egress_verified == {
        "spiffe://east.mesh/ns/meshfed-system/sa/gateway": 20,
        "spiffe://north.mesh/ns/meshfed-system/sa/gateway": 20,
    }
    assert report.rogue_refused
    assert report.propagation_ms > 0
    assert report.failover_first == "east"
    assert report.failover_ms is not None
    assert "web.default.north" in output.getvalue()
    # grpc's asyncio poller is one thread per process, started on first use and kept by grpc.
    leftover = [t.name for t in threading.enumerate() if t not in threads_before and "_poll_wrapper" not in t.name]
    assert leftover == []


def test_meshfed_demo_command_exits_zero_and_leaves_no_listener_behind():
    result = subprocess.run(
        [sys.executable, "-m", "meshfed", "demo", "--requests", "30"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "requests: 30 sent, 30 succeeded, 0 failed" in result.stdout
    assert "result: OK" in result.stdout
    probed = 0
    for line in result.stdout.splitlines():
        if "(terminate) on " in line or "(originate) on " in line:
            host, port = line.split(" on ")[1].split()[0].rsplit(":", 1)
            with socket.socket() as probe:
                assert probe.connect_ex((host, int(port))) != 0, f"{host}:{port} still listening"
            probed += 1
    assert probed == 5
