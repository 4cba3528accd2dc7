"""The demo is the product's smoke test: two zones, real mTLS, real sockets."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

from meshfed.demo import run_demo


def test_demo_sends_every_request_through_both_gateways():
    lines: list[str] = []
    threads_before = threading.active_count()
    report = run_demo(requests=40, concurrency=4, echo=lines.append)
    assert report.ok, "\n".join(lines)
    assert report.sent == report.succeeded == 40
    assert report.ingress_verified == {"spiffe://west.mesh/ns/meshfed-system/sa/gateway": 40}
    assert report.egress_verified == {"spiffe://east.mesh/ns/meshfed-system/sa/gateway": 40}
    assert report.rogue_refused
    assert any(line.startswith("latency: p50") for line in lines)
    assert threading.active_count() <= threads_before


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
    for line in result.stdout.splitlines():
        if "(terminate) on " in line or "(originate) on " in line:
            host, port = line.split(" on ")[1].split()[0].rsplit(":", 1)
            with socket.socket() as probe:
                assert probe.connect_ex((host, int(port))) != 0, f"{host}:{port} still listening"
