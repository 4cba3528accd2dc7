#!/usr/bin/env python3
"""Failed requests through a failover group when a source dies under load, at default settings.

Run from the repository root with the project's venv::

    .venv/bin/python bench/failover.py              # about 20 seconds

Three zones on loopback in this process (one asyncio loop, as the end-to-end
tests run them): ``echo`` runs in east and north, both export it to west, and
west's clients call it through west's failover listener (east first). Client
threads send one request per connection, back to back, for the whole run; a
quarter of the way in, one source dies:

* **east's backend** stops (east's gateway and zone keep running), or
* **east's gateway** stops (the whole zone goes away).

Every setting is the default (5 s active health checks, outlier detection
after 5 failures, 5 s heartbeats): what is measured is what the data plane
does before any check notices. Prints a Markdown table and writes it to
``bench/results/failover.md``. Loopback only, in temporary directories.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import socket
import socketserver
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "python"))

from meshfed.catalog import EmbeddedCatalog, Endpoint, Service  # noqa: E402
from meshfed.controller import ControllerSettings  # noqa: E402
from meshfed.federation.exports import ExportRules  # noqa: E402
from meshfed.federation.settings import PeeringSettings  # noqa: E402
from meshfed.runtime import ZoneSettings, assemble_zone  # noqa: E402
from meshfed.zone import Zone  # noqa: E402

RESULTS = REPO / "bench" / "results" / "failover.md"
GROUP = "failover:echo.default:tcp"
# Defaults everywhere but the addresses: loopback, ephemeral ports.
SETTINGS = ZoneSettings(
    controller=ControllerSettings(gateway_address="127.0.0.1:0", egress_port_base=0),
    peering=PeeringSettings(listen_address="127.0.0.1:0", establish_address="127.0.0.1:0"),
)


@dataclass
class Outcome:
    dies: str
    requests: int
    failed: int
    failed_after: int  # started once the death was over (the backend closed, the gateway stopped)
    dying_ms: float  # how long the death took (stopping a zone is not instant)
    first_failure: float | None
    last_failure: float | None
    served_after: dict[str, int]


class _Echo(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server = self.server
        assert isinstance(server, _Echo)
        while data := self.request.recv(65536):
            self.request.sendall(data)
            server.served += 1  # type: ignore[attr-defined]


@contextlib.contextmanager
def echo_backend() -> Iterator[_Echo]:
    server = _Echo(("127.0.0.1", 0), _Handler)
    server.served = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def register(zone: Zone, backend: _Echo) -> None:
    with EmbeddedCatalog(zone.directory) as catalog:
        catalog.register(
            Service(
                name="echo", ports={"tcp": 7}, endpoints=[Endpoint(address="127.0.0.1", port=backend.server_address[1])]
            )
        )
    with ExportRules(zone.directory) as rules:
        rules.add("echo", "default", ["west"])


def one_request(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(b"ping")
            got = b""
            while len(got) < 4:
                chunk = sock.recv(4 - len(got))
                if not chunk:
                    return False
                got += chunk
            return got == b"ping"
    except OSError:
        return False


async def run(root: Path, dies: str, seconds: float, clients: int) -> Outcome:
    east, west, north = (Zone.init(root / name, name, f"{name}.mesh") for name in ("east", "west", "north"))
    with echo_backend() as east_backend, echo_backend() as north_backend:
        register(east, east_backend)
        register(north, north_backend)
        runtimes = [assemble_zone(zone, SETTINGS) for zone in (east, west, north)]
        e, w, n = runtimes
        for runtime in runtimes:
            await runtime.controller.start()
        try:
            await w.peering.establish(e.peering.issue_token("west").encoded, "east")
            await w.peering.establish(n.peering.issue_token("west").encoded, "north")
            deadline = time.monotonic() + 30
            while GROUP not in w.controller.gateway.addresses():
                if time.monotonic() > deadline:
                    raise RuntimeError("west's failover listener never appeared")
                await asyncio.sleep(0.02)
            address = w.controller.gateway.address(GROUP)
            results: list[tuple[float, float, bool]] = []  # (started, ended, ok), from the run's start
            lock = threading.Lock()
            started = time.monotonic()
            stop_at = started + seconds

            def client() -> None:
                while time.monotonic() < stop_at:
                    began = time.monotonic() - started
                    ok = one_request(address)
                    with lock:
                        results.append((began, time.monotonic() - started, ok))

            threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
            for thread in threads:
                thread.start()
            await asyncio.sleep(seconds / 4)
            killed = time.monotonic() - started
            east_served, north_served = east_backend.served, north_backend.served  # type: ignore[attr-defined]
            if dies == "east's backend":
                east_backend.shutdown()
                east_backend.server_close()
            else:
                await e.controller.stop()
            dead = time.monotonic() - started
            for thread in threads:
                await asyncio.to_thread(thread.join)
            failures = [ended - killed for _, ended, ok in results if not ok]
            after = sum(1 for began, _, ok in results if not ok and began >= dead)
            return Outcome(
                dies,
                len(results),
                len(failures),
                after,
                (dead - killed) * 1000,
                min(failures, default=None),
                max(failures, default=None),
                {
                    "east": east_backend.served - east_served,  # type: ignore[attr-defined]
                    "north": north_backend.served - north_served,  # type: ignore[attr-defined]
                },
            )
        finally:
            for runtime in reversed(runtimes):
                await runtime.controller.stop()


def render(outcomes: list[Outcome], args: argparse.Namespace, elapsed: float) -> str:
    load = os.getloadavg()
    lines = [
        "# meshfed failover under load",
        "",
        f"`bench/failover.py {' '.join(sys.argv[1:])}`".replace(" `", "`")
        + f" on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load average "
        f"{load[0]:.2f} at the end, {elapsed:.0f} s in all. Three zones on loopback, default settings; "
        f"{args.clients} client threads, one request per connection, back to back, for {args.seconds:g} s; "
        "one source of west's failover group (east first, then north) dies a quarter of the way in. A request "
        "in flight while the source dies may fail (its bytes are on the dying connection); one started after "
        "the death fails only if no source could take it.",
        "",
        "| what dies | requests | failed | of those, started after the death | failures, after the death began "
        "| the death took | served after the death |",
        "|---|---:|---:|---:|---|---:|---|",
    ]
    for outcome in outcomes:
        window = (
            "none"
            if outcome.first_failure is None
            else f"{outcome.first_failure * 1000:.0f} ms to {(outcome.last_failure or 0) * 1000:.0f} ms"
        )
        served = ", ".join(f"{name} {count}" for name, count in outcome.served_after.items())
        lines.append(
            f"| {outcome.dies} | {outcome.requests} | {outcome.failed} | {outcome.failed_after} | {window} "
            f"| {outcome.dying_ms:.0f} ms | {served} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each run")
    parser.add_argument("--clients", type=int, default=8, help="client threads")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.monotonic()
    outcomes = []
    for dies in ("east's backend", "east's gateway"):
        with tempfile.TemporaryDirectory(prefix="meshfed-bench-failover-") as tmp:
            outcomes.append(asyncio.run(run(Path(tmp), dies, args.seconds, args.clients)))
    table = render(outcomes, args, time.monotonic() - started)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    print(f"written to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
