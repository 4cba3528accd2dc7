"""Leader election over a Consul session lock (``--leader-lock``), against the real Consul with ACLs.

Candidates run with tokens made from the policy operators are told to write
(``helm/meshfed/examples/consul-acl-policy.hcl``); the elector's own waits run on
a :class:`ManualClock`, and Consul's TTL is never waited for: an invalidated
session is made by destroying it with the management token, as Consul does
when the TTL passes. Consul lets one session hold the key, so two never lead.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from meshfed.catalog.consul_api import ConsulApi
from meshfed.catalog.settings import ConsulSettings
from meshfed.errors import MeshfedError
from meshfed.leadership import ConsulLockElector, LeadershipLostError, LockSettings
from meshfed.zone import Zone
from tests.clocks import ManualClock
from tests.conftest import free_port
from tests.servers import real_consul
from tests.test_catalog_consul import ConsulUnderTest
from tests.test_leadership import ProcessLog, status_of, up_candidate


@pytest.fixture
def consul() -> Iterator[ConsulUnderTest]:
    real = real_consul()
    under_test = ConsulUnderTest(real.address, real.management_token)
    yield under_test
    under_test.cleanup()


def key_of(consul: ConsulUnderTest) -> str:
    """The key the documented policy grants this test's zone."""
    return f"meshfed/{consul.zone}/leader"


@asynccontextmanager
async def candidates(
    consul: ConsulUnderTest, token: Path, clock: ManualClock, *names: str, **timings: Any
) -> AsyncIterator[list[ConsulLockElector]]:
    apis = [
        ConsulApi(ConsulSettings(address=consul.address, token_file=str(token)), node=consul.node, blocking_wait=1)
        for _ in names
    ]
    electors = [
        ConsulLockElector(api, LockSettings(key_of(consul), name, **timings), clock)
        for api, name in zip(apis, names, strict=True)
    ]
    try:
        yield electors
    finally:
        for elector, api in zip(electors, apis, strict=True):
            await elector.release()
            await api.aclose()


def lock_of(consul: ConsulUnderTest) -> tuple[str | None, str]:
    """The key's holding session and value, read with the management token."""
    entries = consul.call("GET", f"/v1/kv/{key_of(consul)}")
    entry = entries[0]
    return entry.get("Session"), base64.b64decode(entry.get("Value") or "").decode()


def test_one_leads_the_other_follows_and_a_release_hands_over_at_once(consul: ConsulUnderTest, tmp_path: Path) -> None:
    token = consul.meshfed_token(tmp_path)

    async def scenario() -> None:
        clock = ManualClock()
        async with candidates(consul, token, clock, "east-a", "east-b") as (east_a, east_b):
            assert await east_a.try_acquire_or_renew()
            assert not await east_b.try_acquire_or_renew()
            assert east_b.holder == "east-a"
            assert lock_of(consul) == (east_a.session, "east-a")
            assert await east_a.try_acquire_or_renew()  # renewed: still the holder
            await east_a.release()
            assert east_a.session is None
            clock.advance(2)  # one retry period; a clean release has no lock delay
            assert await east_b.try_acquire_or_renew()
            assert lock_of(consul) == (east_b.session, "east-b")

    asyncio.run(scenario())


def test_a_leader_whose_session_consul_drops_stops_at_once_and_a_follower_leads(
    consul: ConsulUnderTest, tmp_path: Path
) -> None:
    token = consul.meshfed_token(tmp_path)

    async def scenario() -> None:
        clock = ManualClock()
        async with candidates(consul, token, clock, "east-a", "east-b", lock_delay=0) as (east_a, east_b):
            await east_a.acquire()
            holding = asyncio.create_task(east_a.hold())
            await clock.wait_for_sleepers(1)
            assert not await east_b.try_acquire_or_renew()
            # What Consul does when the TTL passes: the session ends and releases the key.
            consul.call("PUT", f"/v1/session/destroy/{east_a.session}")
            clock.advance(2)  # east-a's next renewal: long before its 7 s renew deadline
            await clock.settled()
            with pytest.raises(LeadershipLostError, match=r"dropped session .* released the lock"):
                await holding
            assert not east_a.leading
            assert await east_b.try_acquire_or_renew()
            assert lock_of(consul) == (east_b.session, "east-b")
            # The old leader, trying again as a follower, gets a new session and follows.
            assert not await east_a.try_acquire_or_renew()
            assert east_a.holder == "east-b"

    asyncio.run(scenario())


class Partition:
    """A TCP path to Consul that the test can cut, as a network partition does: refused from then on."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 8500)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._open |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._open:
            writer.close()
        await self._server.wait_closed()


def test_a_leader_cut_off_from_consul_stops_at_its_renew_deadline(consul: ConsulUnderTest, tmp_path: Path) -> None:
    token = consul.meshfed_token(tmp_path)

    async def scenario() -> None:
        clock = ManualClock()
        partition = Partition(consul.address)
        settings = ConsulSettings(address=await partition.start(), token_file=str(token))
        api = ConsulApi(settings, node=consul.node, blocking_wait=1)
        east_a = ConsulLockElector(api, LockSettings(key_of(consul), "east-a"), clock)
        try:
            await east_a.acquire()
            holding = asyncio.create_task(east_a.hold())
            await clock.wait_for_sleepers(1)  # waiting for its first renewal
            await partition.cut()  # renewals fail from now on; the leader waits them out, then stops
            for _ in range(3):
                clock.advance(2)
                await clock.settled()
                assert not holding.done()  # 6 s: within the 7 s deadline, still leading
            clock.advance(2)
            await clock.settled()
            with pytest.raises(LeadershipLostError, match="not renewed for 7 s"):
                await holding
            assert not east_a.leading
        finally:
            await api.aclose()
            # The session it could not end: the management token ends it, freeing the key.
            if east_a.session is not None:
                consul.call("PUT", f"/v1/session/destroy/{east_a.session}")

    asyncio.run(scenario())


def test_a_holder_written_by_someone_else_reaches_the_log_bounded_and_quoted(
    consul: ConsulUnderTest, tmp_path: Path
) -> None:
    token = consul.meshfed_token(tmp_path)
    session = consul.call("PUT", "/v1/session/create", {"TTL": "10s", "NodeChecks": []})["ID"]
    hostile = "east-\x1b[2J\n" + "x" * 1000
    # Written as it is, not as JSON: the raw body is the key's value.
    taken = consul._http.put(f"/v1/kv/{key_of(consul)}", params={"acquire": session}, content=hostile.encode())
    assert taken.json() is True, taken.text

    async def scenario() -> None:
        async with candidates(consul, token, ManualClock(), "east-a") as (east_a,):
            assert not await east_a.try_acquire_or_renew()
            assert east_a.holder.startswith("'east-\\x1b[2J\\n"), east_a.holder
            assert len(east_a.holder) < 300
            assert east_a.holder.isprintable()

    try:
        asyncio.run(scenario())
    finally:
        consul.call("PUT", f"/v1/session/destroy/{session}")


def test_a_token_without_the_lock_rule_is_one_line_naming_the_rule(consul: ConsulUnderTest, tmp_path: Path) -> None:
    token = consul.token_file(tmp_path, 'session_prefix "" { policy = "write" }\n')

    async def scenario() -> None:
        async with candidates(consul, token, ManualClock(), "east-a") as (east_a,):
            with pytest.raises(MeshfedError) as refused:
                await east_a.try_acquire_or_renew()
            message = str(refused.value)
            assert "key:write" in message, message
            assert key_of(consul) in message, message
            assert "\n" not in message

    asyncio.run(scenario())


def test_timings_must_leave_room_to_renew_within_consuls_ttl_range() -> None:
    with pytest.raises(ValueError, match="TTL is 10 s to"):
        LockSettings("meshfed/east/leader", "east-a", ttl=5, renew_deadline=3, retry_period=1)
    with pytest.raises(ValueError, match="retry period"):
        LockSettings("meshfed/east/leader", "east-a", renew_deadline=10)


def test_two_processes_of_a_zone_one_serves_and_a_clean_stop_hands_the_lock_over(
    consul: ConsulUnderTest, tmp_path: Path
) -> None:
    """`meshfed up --leader-lock --state-kv`: the follower is alive and not ready; a SIGTERM'd leader publishes
    its last changes and releases the lock, and the follower, on a directory of its own, serves at its next
    try as the same zone, restored from Consul KV."""
    token = consul.meshfed_token(tmp_path)
    for directory in (tmp_path / "a", tmp_path / "b"):  # two pods' volumes: b's `zone init` made another CA
        Zone.init(directory, consul.zone, "east.mesh")
        with (directory / "zone.toml").open("a") as config:
            config.write(f'\n[consul]\naddress = "{consul.address}"\ntoken_file = "{token}"\n')
    state = f"meshfed/{consul.zone}/state"  # the documented policy grants the zone this prefix
    election = ["--leader-lock", key_of(consul), "--state-kv", state]
    (api_a, metrics_a), (api_b, metrics_b) = (free_port(), free_port()), (free_port(), free_port())
    first = up_candidate(tmp_path / "a", "east-a", election, api_a, metrics_a, {})
    second: subprocess.Popen[bytes] | None = None
    try:
        ProcessLog(first).wait_for("API on")
        assert status_of(api_a, "/readyz") == 200
        second = up_candidate(tmp_path / "b", "east-b", election, api_b, metrics_b, {})
        follower = ProcessLog(second)
        follower.wait_for("east-a leads; east-b follows")
        assert status_of(metrics_b, "/readyz") == 503
        assert status_of(api_b, "/readyz") is None  # no API while following
        # A change the leader makes just before it stops: its last publication holds it.
        registered = subprocess.run(
            [
                *(sys.executable, "-m", "meshfed", "service", "register", "--dir", str(tmp_path / "a")),
                *("--name", "api", "--port", "tcp=7", "--endpoint", "127.0.0.1:9"),
            ],
            capture_output=True,
            check=False,
            timeout=60,
        )
        assert registered.returncode == 0, registered.stderr
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == 0
        follower.wait_for("restored generation", seconds=20)
        took = follower.wait_for("API on", seconds=20)
        assert took < 10  # a retry period or so, not a TTL
        assert status_of(api_b, "/readyz") == 200
        assert lock_of(consul)[1] == "east-b"
        assert (tmp_path / "b/ca/root.pem").read_bytes() == (tmp_path / "a/ca/root.pem").read_bytes()
        reader = {"Authorization": f"Bearer {Zone.open(tmp_path / 'b').read_token()}"}
        services = httpx.get(f"http://127.0.0.1:{api_b}/v1/catalog", headers=reader, timeout=5).json()["services"]
        assert [service["name"] for service in services] == ["api"]
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=20) == 0
        assert lock_of(consul)[0] is None  # released: nobody holds it
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        consul.call("DELETE", f"/v1/kv/{state}?recurse=true")
