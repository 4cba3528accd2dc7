"""Leader election over a ``coordination.k8s.io/v1`` Lease, against the real kube-apiserver.

Two candidates share one Lease; time is a :class:`ManualClock` (expiry is judged
on each candidate's own clock, so the server needs no time travel): one leads,
the other follows until the leader stops renewing, and a clean stop hands the
Lease over at once. The server's ``resourceVersion`` check is what keeps two
candidates from both winning one race.
"""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshfed.catalog.kubernetes_api import KubernetesApi
from meshfed.catalog.settings import KubernetesSettings
from meshfed.errors import MeshfedError
from meshfed.leadership import LeadershipLostError, LeaseElector, LeaseSettings
from meshfed.zone import Zone
from tests.clocks import ManualClock
from tests.conftest import free_port
from tests.servers import real_kubernetes

NAMESPACE = "default"


@asynccontextmanager
async def connected() -> AsyncIterator[KubernetesApi]:
    api = KubernetesApi(KubernetesSettings(kubeconfig=real_kubernetes().admin_kubeconfig))
    await api.connect()
    try:
        yield api
    finally:
        await api.aclose()


def candidates(api: KubernetesApi, clock: ManualClock, *names: str) -> list[LeaseElector]:
    lease = f"meshfed-test-{uuid.uuid4().hex[:8]}"
    return [LeaseElector(api, LeaseSettings(NAMESPACE, lease, name), clock) for name in names]


async def spec_of(api: KubernetesApi, elector: LeaseElector) -> dict[str, Any]:
    lease = await api.request(api.read_call("leases", NAMESPACE, elector.settings.name))
    spec: dict[str, Any] = lease["spec"]
    return spec


def test_one_leads_and_the_other_takes_over_once_the_leader_stops_renewing() -> None:
    async def scenario() -> None:
        clock = ManualClock()
        async with connected() as api:
            east_a, east_b = candidates(api, clock, "east-a", "east-b")
            assert await east_a.try_acquire_or_renew()  # creates the Lease
            assert not await east_b.try_acquire_or_renew()
            assert east_b.holder == "east-a"
            clock.advance(10)
            assert await east_a.try_acquire_or_renew()  # renewed
            assert not await east_b.try_acquire_or_renew()  # east-b sees the record change now
            clock.advance(14)
            assert not await east_b.try_acquire_or_renew()  # 14 s since it last saw a change: not yet
            clock.advance(2)
            assert await east_b.try_acquire_or_renew()  # 16 s without a renewal: the Lease is east-b's
            spec = await spec_of(api, east_b)
            assert spec["holderIdentity"] == "east-b"
            assert spec["leaseTransitions"] == 1
            assert spec["leaseDurationSeconds"] == 15
            assert not await east_a.try_acquire_or_renew()  # the old leader follows now
            assert not east_a.leading

    asyncio.run(scenario())


def test_a_released_lease_is_taken_at_the_next_try() -> None:
    async def scenario() -> None:
        clock = ManualClock()
        async with connected() as api:
            east_a, east_b = candidates(api, clock, "east-a", "east-b")
            assert await east_a.try_acquire_or_renew()
            assert not await east_b.try_acquire_or_renew()
            await east_a.release()
            clock.advance(2)  # one retry period, far less than the 15 s duration
            assert await east_b.try_acquire_or_renew()
            assert (await spec_of(api, east_b))["holderIdentity"] == "east-b"

    asyncio.run(scenario())


def test_of_two_writes_from_one_read_the_server_keeps_one() -> None:
    """Both candidates find the Lease expired at the same moment: the resourceVersion lets one win."""

    async def scenario() -> None:
        clock = ManualClock()
        async with connected() as api:
            old, east_a, east_b = candidates(api, clock, "old", "east-a", "east-b")
            for elector in (east_a, east_b):
                elector.settings = LeaseSettings(NAMESPACE, old.settings.name, elector.settings.identity)
            assert await old.try_acquire_or_renew()
            assert not await east_a.try_acquire_or_renew()
            assert not await east_b.try_acquire_or_renew()
            clock.advance(16)
            won = await asyncio.gather(east_a.try_acquire_or_renew(), east_b.try_acquire_or_renew())
            assert sorted(won) == [False, True]
            winner = east_a if won[0] else east_b
            assert (await spec_of(api, winner))["holderIdentity"] == winner.settings.identity

    asyncio.run(scenario())


def test_a_leader_that_cannot_renew_stops_leading_before_the_lease_expires() -> None:
    async def scenario() -> None:
        clock = ManualClock()
        async with connected() as api:
            (east_a, east_b) = candidates(api, clock, "east-a", "east-b")
            await east_a.acquire()
            holding = asyncio.create_task(east_a.hold())
            assert not await east_b.try_acquire_or_renew()
            # east-b takes the Lease behind east-a's back (as if east-a's renewals were lost).
            east_b._observed_at -= 20
            assert await east_b.try_acquire_or_renew()
            for _ in range(5):  # five retry periods: 10 s without a renewal of its own
                clock.advance(2)
                await clock.settled()
            with pytest.raises(LeadershipLostError, match="not renewed for 10 s"):
                await holding
            assert not east_a.leading

    asyncio.run(scenario())


def test_timings_must_leave_room_to_renew() -> None:
    with pytest.raises(ValueError, match="retry period"):
        LeaseSettings(NAMESPACE, "x", "y", duration=10, renew_deadline=10)


def _up(directory: Path, identity: str, lease: str, api_port: int, metrics_port: int) -> subprocess.Popen[bytes]:
    election = ["--leader-lease", f"{NAMESPACE}/{lease}", "--leader-lease-duration", "3s"]
    env = {"KUBECONFIG": real_kubernetes().admin_kubeconfig}
    return up_candidate(directory, identity, election, api_port, metrics_port, env)


def up_candidate(
    directory: Path, identity: str, election: list[str], api_port: int, metrics_port: int, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """`meshfed up` of the zone in ``directory`` as candidate ``identity``, with the ``election`` flags."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshfed",
            "up",
            "--dir",
            str(directory),
            "--api-address",
            f"127.0.0.1:{api_port}",
            "--metrics-address",
            f"127.0.0.1:{metrics_port}",
            "--gateway-address",
            "127.0.0.1:0",
            "--peering-address",
            "127.0.0.1:0",
            "--establish-address",
            "127.0.0.1:0",
            "--egress-port-base",
            "0",
            *election,
            "--leader-identity",
            identity,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **env),
    )


def status_of(port: int, path: str) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1).status_code
    except httpx.TransportError:
        return None


class ProcessLog:
    """A process's output as it comes, line by line: a test waits for the line that says what happened."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.decode(errors="replace"))
        self.lines.put(None)  # the process closed its output: it exited

    def wait_for(self, text: str, seconds: float = 30) -> float:
        """Seconds until a line holding ``text`` appears; fails, showing the output, if it does not in time."""
        started = time.monotonic()
        while True:
            try:
                line = self.lines.get(timeout=max(seconds - (time.monotonic() - started), 0))
            except queue.Empty:
                pytest.fail(f"no line with {text!r} within {seconds:g} s:\n" + "".join(self.seen))
            if line is None:
                pytest.fail(f"exited before a line with {text!r}:\n" + "".join(self.seen))
            self.seen.append(line)
            if text in line:
                return time.monotonic() - started


def test_two_processes_of_a_zone_one_serves_and_the_follower_takes_over_when_it_dies(tmp_path: Path) -> None:
    """`meshfed up --leader-lease`: the follower is alive and not ready, serves no API; killed, the leader
    is replaced within the lease duration and a retry (3 s and 0.4 s here)."""
    Zone.init(tmp_path / "a", "east", "east.mesh")
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # one zone, two pods' copies of its state
    lease = f"meshfed-test-{uuid.uuid4().hex[:8]}"
    (api_a, metrics_a), (api_b, metrics_b) = (free_port(), free_port()), (free_port(), free_port())
    first = _up(tmp_path / "a", "east-a", lease, api_a, metrics_a)
    second: subprocess.Popen[bytes] | None = None
    try:
        ProcessLog(first).wait_for("API on")  # logged once the API listens
        assert status_of(api_a, "/readyz") == 200
        second = _up(tmp_path / "b", "east-b", lease, api_b, metrics_b)
        follower = ProcessLog(second)
        follower.wait_for("health and metrics on")
        follower.wait_for("east-a leads; east-b follows")
        assert status_of(metrics_b, "/healthz") == 200
        assert status_of(metrics_b, "/readyz") == 503
        assert status_of(api_b, "/readyz") is None  # no API while following
        # A change made in a follower's directory would be lost when it leads: refused, in one line.
        refused = subprocess.run(
            [
                *(sys.executable, "-m", "meshfed", "service", "register", "--dir", str(tmp_path / "b")),
                *("--name", "api", "--port", "tcp=7", "--endpoint", "127.0.0.1:9"),
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert refused.returncode == 1, refused.stderr
        assert f"is a follower's copy (meshfed up pid {second.pid} waits to lead)" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        first.kill()
        first.wait()
        took = follower.wait_for("API on", seconds=20)
        assert took < 15
        assert status_of(api_b, "/readyz") == 200
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=20) == 0
        # A clean stop gives the Lease up at once.
        kubectl = real_kubernetes().kubectl
        holder = subprocess.run(
            [
                kubectl,
                "--kubeconfig",
                real_kubernetes().admin_kubeconfig,
                "get",
                "lease",
                lease,
                "-n",
                NAMESPACE,
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ],
            capture_output=True,
            check=True,
            timeout=30,
        )
        assert holder.stdout == b""
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def test_a_lease_in_a_missing_namespace_is_one_line_saying_so() -> None:
    async def scenario() -> None:
        async with connected() as api:
            elector = LeaseElector(api, LeaseSettings("no-such-namespace", "east", "east-a"), ManualClock())
            with pytest.raises(MeshfedError, match='namespaces "no-such-namespace" not found — create the namespace'):
                await elector.try_acquire_or_renew()

    asyncio.run(scenario())
