"""One ``meshfed up`` per zone, ports of its own, strict address flags, and every bind failure one line.

Real ``meshfed up`` processes on loopback, real sockets held open to take
ports, and the zone lock as the kernel keeps it; the two in-process tests run
the zone's own start-up (:func:`meshfed.cli.serve.start_runtime`) where only a
race with another process could bring a taken port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from meshfed.addresses import HostPort
from meshfed.cli.serve import Listeners, start_runtime
from meshfed.controller import ControllerSettings
from meshfed.errors import MeshfedError
from meshfed.federation.settings import PeeringSettings
from meshfed.runtime import ZoneSettings, assemble_zone
from tests.conftest import free_port

_API_LINE = ": API on "  # what `meshfed up` logs once everything listens, with the API's URL
_METRICS_LINE = "health and metrics on http://"  # logged just before it when --metrics-address is given


def ephemeral_flags() -> list[str]:
    """Every listener of `meshfed up` on an ephemeral loopback port."""
    return [
        *("--api-address", "127.0.0.1:0", "--gateway-address", "127.0.0.1:0"),
        *("--peering-address", "127.0.0.1:0", "--establish-address", "127.0.0.1:0"),
        *("--egress-port-base", "0"),
    ]


def meshfed_up_once(directory: Path, flags: list[str]) -> subprocess.CompletedProcess[str]:
    """`meshfed up` expected to fail at start: warnings only, so its error is the one line on stderr."""
    return meshfed_cli("up", "--dir", directory, *flags, "--log-level", "warning")


def meshfed_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshfed", *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def init_zone(directory: Path) -> Path:
    name = directory.name
    assert (
        meshfed_cli("zone", "init", "--dir", directory, "--name", name, "--trust-domain", f"{name}.mesh").returncode
        == 0
    )
    return directory


class ZoneProcess:
    """A running `meshfed up` whose JSON log is read as it comes (a full pipe would stall the zone)."""

    def __init__(self, directory: Path, flags: list[str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meshfed", "up", "--dir", str(directory), *flags, "--log-level", "info"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.log: list[str] = []
        self.api_url = self.metrics_url = ""
        self._serving = threading.Event()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.log.append(line)
            message = str(orjson.loads(line).get("message", "")) if line.startswith("{") else ""
            if _METRICS_LINE in message:
                self.metrics_url = "http://" + message.partition(_METRICS_LINE)[2]
            if _API_LINE in message:
                self.api_url = message.partition(_API_LINE)[2]
                self._serving.set()
        self._serving.set()  # exited: wake the waiter, which sees no URL

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_serving(self, timeout: float = 60.0) -> str:
        """Wait (on the log, not a clock) until the zone says where its API is; returns that URL (with scheme)."""
        assert self._serving.wait(timeout), f"the zone did not start in {timeout} s: {self.log}"
        assert self.api_url, f"the zone exited ({self.process.wait()}): {self.log}"
        return self.api_url

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)


@contextlib.contextmanager
def meshfed_up(directory: Path, flags: list[str]) -> Iterator[ZoneProcess]:
    zone = ZoneProcess(directory, flags)
    try:
        yield zone
    finally:
        if zone.process.poll() is None:
            zone.process.kill()
        zone.process.wait(timeout=30)
        zone._reader.join(timeout=30)


# -- one process per zone ----------------------------------------------------------------------------------------


def test_a_second_meshfed_up_of_a_running_zone_is_refused_naming_the_holder(tmp_path):
    east = init_zone(tmp_path / "east")
    with meshfed_up(east, ephemeral_flags()) as first:
        first.wait_serving()
        lock = east / "zone.lock"
        assert lock.read_text().strip() == str(first.pid)

        second = meshfed_up_once(east, ephemeral_flags())
        line = one_line_error(second)
        assert line == (f"meshfed: error: zone east is already running (pid {first.pid} holds {lock}); stop it first")

        # The other commands write the zone's state while it runs: they take no lock.
        assert meshfed_cli("export", "add", "--dir", east, "--service", "web", "--to", "west").returncode == 0
        assert meshfed_cli("peer", "token", "--dir", east, "--peer", "west").returncode == 0
        assert meshfed_cli("peer", "list", "--dir", east).returncode == 0

        assert first.stop() == 0
    assert lock.read_text() == "", "a zone that stopped still names itself in zone.lock"


def test_a_crashed_zone_leaves_no_stale_lock(tmp_path):
    east = init_zone(tmp_path / "east")
    with meshfed_up(east, ephemeral_flags()) as crashed:
        crashed.wait_serving()
        crashed.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
    assert (east / "zone.lock").read_text().strip() == str(crashed.pid)
    with meshfed_up(east, ephemeral_flags()) as restarted:
        restarted.wait_serving()
        assert (east / "zone.lock").read_text().strip() == str(restarted.pid)
        # At once, as an orchestrator may: a SIGTERM as the API comes up still stops the zone cleanly.
        assert restarted.stop() == 0


def test_a_second_zone_on_the_same_peering_ports_is_refused(tmp_path):
    """Two zones sharing peering ports would have the kernel split peers' streams between them."""
    east, west = init_zone(tmp_path / "east"), init_zone(tmp_path / "west")
    peering, establish = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    shared = ["--peering-address", peering, "--establish-address", establish]
    own = ["--api-address", "127.0.0.1:0", "--gateway-address", "127.0.0.1:0", "--egress-port-base", "0"]
    with meshfed_up(east, [*own, *shared]) as running:
        running.wait_serving()
        second = meshfed_up_once(west, [*own, *shared])
        one_line_error(second, f"--peering-address {peering}: cannot listen there: address already in use")
        running.stop()


# -- ports of its own, in process: what only a race with another process would reach ---------------------------


def _loopback(peering: str = "127.0.0.1:0", bundle_endpoint_port: int | None = None) -> ZoneSettings:
    return ZoneSettings(
        controller=ControllerSettings(gateway_address="127.0.0.1:0", egress_port_base=0, health_check=None),
        peering=PeeringSettings(listen_address=peering, establish_address="127.0.0.1:0"),
        bundle_endpoint_port=bundle_endpoint_port,
    )


def _listeners(settings: ZoneSettings, gateway: str = "127.0.0.1:0") -> Listeners:
    def parse(text: str) -> HostPort:
        host, _, port = text.rpartition(":")
        return HostPort(host, int(port))

    return Listeners(
        api=HostPort("127.0.0.1", 0),
        gateway=parse(gateway),
        gateway_flag="--gateway-address",
        peering=parse(settings.peering.listen_address),
        establish=parse(settings.peering.establish_address),
        bundle_endpoint_port=settings.bundle_endpoint_port,
    )


def test_peering_ports_are_never_shared_by_two_zones(make_zone):
    """grpc sets SO_REUSEPORT unless told not to: then a second zone's bind on the same port succeeds."""

    async def scenario() -> str:
        first = assemble_zone(make_zone("east"), _loopback())
        await first.controller.start()
        try:
            taken = first.peering.stream_addresses[0]
            settings = _loopback(peering=taken)
            second = assemble_zone(make_zone("west"), settings)
            with pytest.raises(MeshfedError) as refused:
                await start_runtime(second, _listeners(settings))
            assert not second.controller.ready
            return str(refused.value)
        finally:
            await first.controller.stop()

    message = asyncio.run(scenario())
    assert message.startswith("--peering-address 127.0.0.1:")
    assert "cannot listen there: address already in use" in message


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port something else listens on (SO_REUSEADDR only, as most servers)."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def test_a_taken_gateway_port_at_start_names_the_flag(make_zone, held_port):
    async def scenario() -> str:
        settings = ZoneSettings(
            controller=ControllerSettings(
                gateway_address=f"127.0.0.1:{held_port}", egress_port_base=0, health_check=None
            ),
            peering=PeeringSettings(listen_address="127.0.0.1:0", establish_address="127.0.0.1:0"),
        )
        runtime = assemble_zone(make_zone("east"), settings)
        with pytest.raises(MeshfedError) as refused:
            await start_runtime(runtime, _listeners(settings, gateway=f"127.0.0.1:{held_port}"))
        return str(refused.value)

    message = asyncio.run(scenario())
    assert message.startswith(f'--gateway-address: listener "ingress": cannot bind 127.0.0.1:{held_port}')


def test_a_taken_bundle_endpoint_port_at_start_names_the_flag(make_zone, held_port):
    async def scenario() -> str:
        settings = _loopback(bundle_endpoint_port=held_port)
        runtime = assemble_zone(make_zone("east"), settings)
        with pytest.raises(MeshfedError) as refused:
            await start_runtime(runtime, _listeners(settings))
        assert not runtime.controller.ready
        return str(refused.value)

    message = asyncio.run(scenario())
    assert message.startswith(
        f"--bundle-endpoint-port 0.0.0.0:{held_port}: cannot listen there: address already in use"
    )


# -- every bind failure of `meshfed up` is one line --------------------------------------------------------------


@pytest.mark.parametrize(
    "flag", ["--api-address", "--gateway-address", "--peering-address", "--establish-address", "--bundle-endpoint-port"]
)
def test_a_taken_port_is_one_line_naming_address_and_flag(tmp_path, held_port, flag):
    east = init_zone(tmp_path / "east")
    flags = ephemeral_flags()
    if flag == "--bundle-endpoint-port":
        flags += [flag, str(held_port)]
        address = f"0.0.0.0:{held_port}"
    else:
        address = f"127.0.0.1:{held_port}"
        flags[flags.index(flag) + 1] = address
    result = meshfed_up_once(east, flags)
    one_line_error(result, f"{flag} {address}: cannot listen there: address already in use", "another zone or program")
    assert (east / "zone.lock").read_text() == "", "the refused zone still names itself in zone.lock"


def test_an_address_not_on_this_host_is_one_line(tmp_path):
    east = init_zone(tmp_path / "east")
    flags = ephemeral_flags()
    flags[flags.index("--peering-address") + 1] = "192.0.2.1:26440"  # TEST-NET-1: never a local address
    one_line_error(
        meshfed_up_once(east, flags),
        "--peering-address 192.0.2.1:26440: cannot listen there: cannot assign requested address",
        "assigned to a local interface",
    )


# -- every address flag parsed strictly --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "fragment"),
    [
        ("--peering-address", "127.0.0.1:70000", "port 70000 is out of range (0-65535)"),
        ("--establish-address", "127.0.0.1", "no port"),
        ("--api-address", "::1:8470", "put an IPv6 address in brackets"),
        ("--api-address", "[::1:8470", "write an IPv6 address as [address]:port"),
        ("--gateway-address", "127.0.0.1:65536", "port 65536 is out of range"),
        ("--gateway-address", "gateway.local:15443", "the gateway binds IP addresses, not names"),
        ("--gateway-advertise", "10.0.0.1:0", "port 0 is only for binding"),
        ("--gateway-advertise", "a..b:15443", "neither an IP address nor a DNS name"),
        ("--egress-host", "egress.local", "the gateway binds IP addresses, not names"),
        ("--egress-host", "127.0.0.1:15500", "is not a host"),
        ("--egress-advertise-host", "10.0.0.300", "looks like an IPv4 address"),
        ("--advertise-host", "east_zone", "neither an IP address nor a DNS name"),
        ("--egress-port-base", "65536", "port 65536 is out of range"),
        ("--bundle-endpoint-port", "70000", "port 70000 is out of range"),
    ],
)
def test_address_flags_are_refused_in_one_line_naming_the_flag(tmp_path, flag, value, fragment):
    east = init_zone(tmp_path / "east")
    flags = [*ephemeral_flags(), flag, value]
    line = one_line_error(meshfed_up_once(east, flags), fragment)
    assert line.startswith(f"meshfed: error: {flag} ")
    assert not (east / "zone.lock").exists(), "flags are parsed before anything is locked or bound"


def test_the_gateway_address_from_zone_toml_is_parsed_as_strictly(tmp_path):
    east = init_zone(tmp_path / "east")
    config = east / "zone.toml"
    lines = [line for line in config.read_text().splitlines() if not line.startswith("gateway_address")]
    config.write_text("\n".join(['gateway_address = "0.0.0.0:70000"', *lines]) + "\n")
    flags = ephemeral_flags()
    at = flags.index("--gateway-address")
    del flags[at : at + 2]
    one_line_error(meshfed_up_once(east, flags), f"gateway_address in {config}", "port 70000 is out of range")


def test_peer_token_addresses_are_parsed_strictly(tmp_path):
    east = init_zone(tmp_path / "east")
    one_line_error(
        meshfed_cli("peer", "token", "--dir", east, "--peer", "west", "--address", "east.example:0"),
        "--address 'east.example:0'",
        "port 0 is only for binding",
    )
