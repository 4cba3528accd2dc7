#!/usr/bin/env python3
"""What zero trust costs per new connection: plain egress vs workload mTLS with the caller hop.

Run from the repository root with the project's venv::

    .venv/bin/python bench/zero_trust.py            # about a minute
    .venv/bin/python bench/zero_trust.py --quick    # about 15 seconds

Two zones in this process (west imports from east), as the end-to-end tests
run them, on loopback. Each sample is one new connection from a client in
this process: connect (and TLS handshake, where the path has one), send 64
bytes, read them back from east's backend, close. The paths run interleaved,
round after round, in a shuffled order, so machine noise falls on all of them
alike; the table gives medians and the ratio to the plain path.

The client is Python's ``ssl`` (OpenSSL), so the TLS rows include the client's
own handshake cost, as a workload pays it. Prints a Markdown table and writes
it to ``bench/results/zero_trust.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import random
import socket
import socketserver
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "python"))

from meshfed.catalog import EmbeddedCatalog, Endpoint, Service  # noqa: E402
from meshfed.controller import ControllerSettings  # noqa: E402
from meshfed.federation.authz import AuthzRules, RuleSpec  # noqa: E402
from meshfed.federation.exports import ExportRules  # noqa: E402
from meshfed.federation.settings import PeeringSettings  # noqa: E402
from meshfed.gateway.sni import service_sni  # noqa: E402
from meshfed.runtime import ZoneSettings, assemble_zone  # noqa: E402
from meshfed.trust.spiffe import SpiffeId  # noqa: E402
from meshfed.zone import Zone  # noqa: E402

RESULTS = REPO / "bench" / "results" / "zero_trust.md"
PAYLOAD = b"x" * 64
PORT = 8080
CALLER = "spiffe://west.mesh/ns/shop/sa/cart"
SETTINGS = ZoneSettings(
    controller=ControllerSettings(gateway_address="127.0.0.1:0", egress_port_base=0, health_check=None),
    peering=PeeringSettings(listen_address="127.0.0.1:0", establish_address="127.0.0.1:0", heartbeat_interval=0.5),
)

Call = Callable[[], None]
RESUMED: dict[tuple[str, int], list[bool]] = {}  # per address: whether each resuming connection resumed


def echo_backend() -> tuple[int, Callable[[], None]]:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            while data := self.request.recv(65536):
                self.request.sendall(data)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return server.server_address[1], stop


def round_trip(sock: socket.socket) -> None:
    sock.sendall(PAYLOAD)
    received = 0
    while received < len(PAYLOAD):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the echo")
        received += len(chunk)


def plain_call(address: tuple[str, int]) -> Call:
    def call() -> None:
        with socket.create_connection(address, timeout=5) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            round_trip(sock)

    return call


def tls_call(address: tuple[str, int], context: ssl.SSLContext, sni: str | None = None) -> Call:
    def call() -> None:
        with socket.create_connection(address, timeout=5) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with context.wrap_socket(raw, server_hostname=sni) as tls:
                round_trip(tls)

    return call


def resumed_tls_call(address: tuple[str, int], context: ssl.SSLContext) -> Call:
    """Like :func:`tls_call`, offering the session of the previous connection (a workload's pool reconnecting)."""
    last: list[ssl.SSLSession] = []
    reused = RESUMED.setdefault(address, [])

    def call() -> None:
        with socket.create_connection(address, timeout=5) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with context.wrap_socket(raw, session=last[0] if last else None) as tls:
                round_trip(tls)
                if tls.session is not None:
                    last[:] = [tls.session]
                reused.append(bool(tls.session_reused))

    return call


def client_context(trusting: Zone, svid_zone: Zone, directory: Path, *, resume: bool = False) -> ssl.SSLContext:
    svid = svid_zone.authority.issue_svid(SpiffeId.parse(CALLER), dt.timedelta(hours=1))
    cert, key = directory / "cart.pem", directory / "cart.key"
    cert.write_bytes(svid.cert_chain_pem())
    key.write_bytes(svid.private_key_pem())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=trusting.trust.own_bundle().to_pem().decode())
    context.load_cert_chain(cert, key)
    if not resume:
        # A full handshake per sample, as a workload's first connection has: no session resumption.
        context.options |= ssl.OP_NO_TICKET
    return context


def setup(root: Path, backend_port: int) -> tuple[Zone, Zone]:
    east = Zone.init(root / "east", "east", "east.mesh")
    west = Zone.init(root / "west", "west", "west.mesh")
    names = ("plain", "strict", "rules100")
    with EmbeddedCatalog(east.directory) as catalog:
        for name in names:
            catalog.register(
                Service(name=name, ports={"tcp": PORT}, endpoints=[Endpoint(address="127.0.0.1", port=backend_port)])
            )
    with ExportRules(east.directory) as rules:
        for name in names:
            rules.add(name, "default", ["west"])
    with AuthzRules(east.directory) as authz:
        authz.add(RuleSpec(service="strict", action="allow", id="spiffe://west.mesh/ns/shop/*"))
        for i in range(99):  # 99 rules that do not match, then the one that does
            authz.add(RuleSpec(service="rules100", action="deny", id=f"spiffe://west.mesh/ns/team-{i}/*"))
        authz.add(RuleSpec(service="rules100", action="allow", id="spiffe://west.mesh/ns/shop/*"))
    toml = west.directory / "zone.toml"
    toml.write_text(
        toml.read_text()
        + '\n[egress]\nworkload_tls = "strict"\n[[egress.import]]\nservice = "plain"\nworkload_tls = "plain"\n'
    )
    return east, Zone.open(west.directory)


async def measure(rounds: int, per_round: int) -> tuple[dict[str, list[float]], dict[str, str]]:
    backend_port, stop_backend = echo_backend()
    with tempfile.TemporaryDirectory() as tmp:
        east, west = setup(Path(tmp), backend_port)
        e, w = assemble_zone(east, SETTINGS), assemble_zone(west, SETTINGS)
        for runtime in (e, w):
            await runtime.controller.start()
        try:
            await w.peering.establish(e.peering.issue_token("west").encoded, "east")
            wanted = {f"egress:{name}.default.east:tcp" for name in ("plain", "strict", "rules100")}
            deadline = time.monotonic() + 30
            while not wanted <= w.controller.gateway.addresses().keys():
                assert time.monotonic() < deadline, "west never served the imports"
                await asyncio.sleep(0.05)
            addresses = w.controller.gateway.addresses()
            workload = client_context(west, west, Path(tmp))
            direct = client_context(east, west, Path(tmp))
            resuming = client_context(west, west, Path(tmp), resume=True)
            plain = addresses["egress:plain.default.east:tcp"]
            strict = addresses["egress:strict.default.east:tcp"]
            paths: dict[str, Call] = {
                "plain egress → ingress (caller: west's gateway)": plain_call(plain),
                "strict egress: workload mTLS + caller hop, 1 rule": tls_call(strict, workload),
                "strict egress, workload TLS session resumed": resumed_tls_call(strict, resuming),
                "strict egress: workload mTLS + caller hop, 100 rules (match last)": tls_call(
                    addresses["egress:rules100.default.east:tcp"], workload
                ),
                "workload SVID straight to east's ingress (no egress), 1 rule": tls_call(
                    e.controller.gateway.address("ingress"),
                    direct,
                    sni=service_sni("strict", "default", PORT, east.trust_domain),
                ),
            }
            how = dict(
                zip(
                    paths,
                    (
                        "TCP connect to the egress; west's gateway dials east over mTLS (resuming its own session)",
                        "full TLS 1.3 handshake with a west SVID at the egress; west's gateway sends the verified ID "
                        "in a PROXY v2 header inside the tunnel (ALPN meshfed-caller/1); east authorizes it",
                        "as above, the workload offering its previous TLS session (the caller is re-authorized)",
                        "as the second row, the ID checked against 99 deny rules before the allow",
                        "the workload's own mTLS to east's ingress, authorized in east's handshake",
                    ),
                    strict=True,
                )
            )
            samples: dict[str, list[float]] = {name: [] for name in paths}
            for call in paths.values():  # warm up: first connections pay for caches and imports
                for _ in range(20):
                    await asyncio.to_thread(call)
            for _ in range(rounds):
                order = list(paths.items())
                random.shuffle(order)
                for name, call in order:
                    samples[name].extend(await asyncio.to_thread(_timed, call, per_round))
            outcomes = RESUMED.get(strict, [])
            resumed_row = list(paths)[2]
            how[resumed_row] += f"; {sum(outcomes)} of {len(outcomes)} connections resumed"
            return samples, how
        finally:
            for runtime in (w, e):
                await runtime.controller.stop()
            stop_backend()


def _timed(call: Call, count: int) -> list[float]:
    out = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        out.append(time.perf_counter() - started)
    return out


def table(samples: dict[str, list[float]], how: dict[str, str], argv: list[str], elapsed: float) -> str:
    base = statistics.median(next(iter(samples.values())))
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# meshfed zero trust: cost per new connection",
        "",
        f"`bench/zero_trust.py {' '.join(argv)}` on {when}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f} at the end, {elapsed:.0f} s in all. Each sample is one new connection: "
        "connect (and a full TLS handshake where the path has one, no resumption), 64 bytes to east's backend "
        "and back, close. Paths interleaved round by round in shuffled order; compare the ratios, not the "
        "absolute times (a small shared machine, and the client is Python's ssl in the same process).",
        "",
        "| path | median | p90 | ratio to plain | what happens |",
        "|---|---|---|---|---|",
    ]
    for name, values in samples.items():
        values = sorted(values)
        median = statistics.median(values)
        p90 = values[int(len(values) * 0.9)]
        timing = f"{median * 1000:.2f} ms | {p90 * 1000:.2f} ms | {median / base:.2f}x"
        lines.append(f"| {name} | {timing} | {how[name]} (n={len(values)}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 50")
    args = parser.parse_args()
    rounds, per_round = (3, 50) if args.quick else (args.rounds, args.per_round)
    started = time.monotonic()
    samples, how = asyncio.run(measure(rounds, per_round))
    text = table(samples, how, sys.argv[1:], time.monotonic() - started)
    print(text)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
