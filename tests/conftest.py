"""Shared fixtures: zones in temporary directories, real loopback servers, SVID files."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import pytest
from cryptography import x509

from meshfed.catalog import CatalogSnapshot
from meshfed.gateway import Identity
from meshfed.trust.bundle import parse_bundle
from meshfed.trust.ca import Svid
from meshfed.trust.spiffe import SpiffeId
from meshfed.zone import Zone

ZoneFactory = Callable[[str], Zone]
_T = TypeVar("_T")


@pytest.fixture
def make_zone(tmp_path: Path) -> ZoneFactory:
    """Create a zone named NAME with trust domain NAME.mesh under the test's tmp dir."""

    def make(name: str) -> Zone:
        return Zone.init(tmp_path / name, name, f"{name}.mesh")

    return make


def trust_each_other(*zones: Zone) -> None:
    """Exchange bundles in the SPIFFE wire format between every pair of zones."""
    for importer in zones:
        for exporter in zones:
            if importer is not exporter:
                wire = exporter.trust.own_bundle().to_spiffe_json()
                importer.trust.import_bundle(parse_bundle(exporter.trust_domain, wire))


def gateway_identity(zone: Zone) -> Identity:
    svid = zone.authority.issue_svid(zone.trust_domain.gateway_id, dt.timedelta(hours=1))
    return Identity(cert_chain_pem=svid.cert_chain_pem().decode(), private_key_pem=svid.private_key_pem().decode())


@dataclass
class SvidFiles:
    svid: Svid
    cert: Path
    key: Path


def write_svid(zone: Zone, spiffe_id: str, directory: Path) -> SvidFiles:
    svid = zone.authority.issue_svid(SpiffeId.parse(spiffe_id), dt.timedelta(hours=1))
    cert, key = directory / f"{zone.name}-svid.pem", directory / f"{zone.name}-svid.key"
    cert.write_bytes(svid.cert_chain_pem())
    key.write_bytes(svid.private_key_pem())
    return SvidFiles(svid, cert, key)


def key_usage(*, ca: bool) -> x509.KeyUsage:
    """The key usage of a test certificate: a CA signs certificates and CRLs, a leaf signs handshakes."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def client_hello_bytes(server_name: str) -> bytes:
    """A real ClientHello (from Python's ssl) naming ``server_name``, as a passthrough listener sees it."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def free_port() -> int:
    """A loopback port nothing listens on now (for addresses a test must know before binding)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def dead_endpoint() -> str:
    """``127.0.0.1:port`` with nothing listening: connects are refused."""
    return f"127.0.0.1:{free_port()}"


@dataclass
class EchoServer:
    """A TCP server that echoes every byte back and counts the connections it accepted."""

    address: tuple[str, int]
    connections: list[tuple[str, int]] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)
    stop: Callable[[], None] = lambda: None
    """Close the listening socket (new connects are refused); open connections keep echoing."""

    @property
    def endpoint(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"


@contextlib.contextmanager
def running_echo_server() -> Iterator[EchoServer]:
    state = EchoServer(("127.0.0.1", 0))

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            state.connections.append(self.client_address)
            while data := self.request.recv(65536):
                state.received.extend(data)
                self.request.sendall(data)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    server = Server(("127.0.0.1", 0), Handler)
    state.address = ("127.0.0.1", server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stopped = threading.Event()

    def stop() -> None:
        if not stopped.is_set():
            stopped.set()
            server.shutdown()
            server.server_close()
            thread.join()

    state.stop = stop
    try:
        yield state
    finally:
        stop()


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    with running_echo_server() as server:
        yield server


async def eventually(check: Callable[[], bool], what: str = "condition", timeout: float = 10.0) -> float:
    """Wait until ``check()`` holds; returns how long that took. Fails the test after ``timeout`` seconds."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def settled(
    read: Callable[[], _T], check: Callable[[_T], bool], what: str, timeout: float = 10.0, every: float = 0.005
) -> _T:
    """``read()`` once ``check`` holds of it: for counters another thread updates after the client has seen the effect,
    or for what another process does (``every`` longer, when a read asks a server).

    The gateway counts a refusal or a close on its own thread, which may run just
    after the client saw the connection end; reading once would race it.
    """
    deadline = time.monotonic() + timeout
    value = read()
    while not check(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value: {value!r}")
        threading.Event().wait(every)
        value = read()
    return value


class WatchedCatalog(Protocol):
    """What :func:`until` needs of a remote catalog source (Consul, Kubernetes)."""

    @property
    def last_error(self) -> str | None: ...

    async def snapshot(self) -> CatalogSnapshot: ...

    async def watch(self, since: int, timeout: float) -> CatalogSnapshot: ...


async def until(
    catalog: WatchedCatalog, check: Callable[[CatalogSnapshot], bool], timeout: float = 5.0
) -> CatalogSnapshot:
    """Watch ``catalog`` until a snapshot passes ``check``; fails with the last snapshot and error."""
    deadline = time.monotonic() + timeout
    snapshot = await catalog.snapshot()
    while not check(snapshot):
        assert time.monotonic() < deadline, f"timed out; last snapshot {snapshot}, last error {catalog.last_error}"
        snapshot = await catalog.watch(snapshot.version, 0.2)
    return snapshot


def round_trip(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` and read back exactly as many bytes."""
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


_real_asyncio_run = asyncio.run


def _describe_task(task: asyncio.Task[object]) -> str:
    coro = task.get_coro()
    where = getattr(coro, "__qualname__", repr(coro))
    return f"{task.get_name()} ({where})"


@pytest.fixture(autouse=True)
def no_leaked_tasks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Fail a test whose ``asyncio.run`` returns while tasks it started still run.

    ``asyncio.run`` cancels such tasks silently when the loop closes, so a
    component that forgets to stop (or cancel) its work would pass unnoticed.
    """
    leaked: list[str] = []

    def run_checked(main: Coroutine[object, object, _T], **kwargs: object) -> _T:
        async def checked() -> _T:
            result = await main
            # Work that finishes on its own within a few loop turns (a cancelled task unwinding) is not a leak.
            for _ in range(10):
                pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
                if not pending:
                    break
                await asyncio.sleep(0)
            leaked.extend(_describe_task(task) for task in pending)
            return result

        return _real_asyncio_run(checked(), **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio, "run", run_checked)
    yield leaked
    assert not leaked, f"tasks still running when asyncio.run returned (stop what starts them): {leaked}"
