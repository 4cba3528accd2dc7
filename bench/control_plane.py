#!/usr/bin/env python3
"""Federation control-plane benchmarks of issue #5: propagation, bulk sync, heartbeat-loss detection.

Run from the repository root with the project's venv::

    .venv/bin/python bench/control_plane.py             # about 2 minutes (the 10,000-service sync)
    .venv/bin/python bench/control_plane.py --quick     # about 40 seconds
    .venv/bin/python bench/control_plane.py --sizes 1000 2000   # smaller syncs

Prints a Markdown table and writes it to ``bench/results/control_plane.md``.
Loopback only, in temporary directories removed afterwards. The propagation
and heartbeat rows run every zone in this one process (one asyncio loop, as
the end-to-end tests do); the bulk sync runs each importing zone in its own
process, as production does.

"Serving" means the egress listener of the import is bound in the peer's
running gateway (``controller.gateway.addresses()``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import gc
import logging
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "python"))

from meshfed.catalog import EmbeddedCatalog, Endpoint, Service  # noqa: E402
from meshfed.catalog.model import CatalogSnapshot  # noqa: E402
from meshfed.controller import ControllerSettings  # noqa: E402
from meshfed.federation import wire  # noqa: E402
from meshfed.federation.exports import ExportIndex, ExportRule, ExportRules, exported_snapshot  # noqa: E402
from meshfed.federation.imports import ImportStore  # noqa: E402
from meshfed.federation.link import PeerLimits  # noqa: E402
from meshfed.federation.settings import PeeringSettings  # noqa: E402
from meshfed.gateway import ConnectListener  # noqa: E402
from meshfed.runtime import (  # noqa: E402
    GC_THRESHOLDS,
    ZoneRuntime,
    ZoneSettings,
    assemble_zone,
    raise_open_file_limit,
)
from meshfed.sqlite import transaction  # noqa: E402
from meshfed.zone import Zone  # noqa: E402

RESULTS = REPO / "bench" / "results" / "control_plane.md"
ENDPOINTS_PER_SERVICE = 10
INTERPRETER_GC = (700, 10, 10)  # CPython's default collector thresholds
PEERS = ("west", "north", "south")


def peer_names(count: int) -> tuple[str, ...]:
    """The importing zones of a sync: west, north, south, then peer-4, peer-5, ..."""
    return (*PEERS[:count], *(f"peer-{index}" for index in range(len(PEERS) + 1, count + 1)))


@dataclass
class Row:
    what: str
    value: str
    detail: str


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float], scale: float = 1.0, unit: str = "") -> str:
    return f"n={len(values)}, min {min(values) * scale:.0f}{unit}, max {max(values) * scale:.0f}{unit}"


def settings(
    heartbeat: float = 5.0, egress_host: str = "127.0.0.1", egress: str = "listeners", imports: int = 0
) -> ZoneSettings:
    """``egress``: ``listeners`` (one socket per import) or ``connect`` (one CONNECT listener for all);
    ``imports``: how many services a peer may export to this zone, when beyond the default limit."""
    defaults = PeerLimits()
    limits = dataclasses.replace(
        defaults,
        max_services=max(defaults.max_services, imports),
        max_listeners=max(defaults.max_listeners, imports),
    )
    return ZoneSettings(
        controller=ControllerSettings(
            gateway_address="127.0.0.1:0",
            egress_host=egress_host,
            egress_port_base=0,
            egress_connect_address=f"{egress_host}:0" if egress == "connect" else None,
            per_import_listeners=egress == "listeners",
            # No active checks: 100,000 endpoints probed would measure the checks, not the control plane.
            health_check=None,
        ),
        peering=PeeringSettings(
            listen_address="127.0.0.1:0",
            establish_address="127.0.0.1:0",
            heartbeat_interval=heartbeat,
            limits=limits,
        ),
    )


def service(index: int, endpoints: int = ENDPOINTS_PER_SERVICE) -> Service:
    return Service(
        name=f"svc-{index}",
        ports={"tcp": 8080},
        endpoints=[
            Endpoint(address=f"127.{index // 250 % 250}.{index % 250}.{host + 1}", port=8080)
            for host in range(endpoints)
        ],
    )


def register_all(zone: Zone, services: Sequence[Service]) -> float:
    """Register ``services`` in one transaction (``EmbeddedCatalog.register`` joins an outer one)."""
    started = time.perf_counter()
    with EmbeddedCatalog(zone.directory) as catalog, transaction(catalog._db):
        for item in services:
            catalog.register(item)
    return time.perf_counter() - started


def export_all(zone: Zone, names: Sequence[str], peers: Sequence[str]) -> None:
    """One export rule per service, in one transaction (``ExportRules.add`` joins an outer one)."""
    with ExportRules(zone.directory) as rules, transaction(rules._db):
        for name in names:
            rules.add(name, "default", peers)


async def wait_for(check: Callable[[], bool], what: str, timeout: float, step: float = 0.01) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(step)
    return time.monotonic() - started


async def start_peered(exporter: ZoneRuntime, dialers: Sequence[ZoneRuntime], timeout: float = 30.0) -> None:
    for runtime in (exporter, *dialers):
        await runtime.controller.start()
    for dialer in dialers:
        await dialer.peering.establish(exporter.peering.issue_token(dialer.zone.name).encoded, exporter.zone.name)
    for dialer in dialers:
        await wait_for(
            lambda d=dialer: d.peering.peer(exporter.zone.name).state == "ACTIVE",  # type: ignore[misc]
            f"{dialer.zone.name}'s peering ACTIVE",
            timeout,
        )


async def stop_all(runtimes: Sequence[ZoneRuntime]) -> None:
    for runtime in reversed(runtimes):
        await runtime.controller.stop()


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def loopback_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[0])  # received bytes (= sent, on loopback)
    return 0


def bound(runtime: ZoneRuntime, listener: str) -> bool:
    return listener in runtime.controller.gateway.addresses()


# -- export add / endpoint change -> peer ---------------------------------------------------------------------------


async def propagation(root: Path, repetitions: int) -> list[Row]:
    east_zone = Zone.init(root / "east", "east", "east.mesh")
    west_zone = Zone.init(root / "west", "west", "west.mesh")
    register_all(east_zone, [service(index, endpoints=1) for index in range(repetitions)])
    east, west = assemble_zone(east_zone, settings()), assemble_zone(west_zone, settings())
    export_times: list[float] = []
    endpoint_times: list[float] = []
    try:
        await start_peered(east, [west])
        for index in range(repetitions):
            await asyncio.sleep(random.uniform(0.3, 0.8))  # noqa: S311 -- a random phase of the catalog poll
            listener = f"egress:svc-{index}.default.east:tcp"
            started = time.monotonic()
            await asyncio.to_thread(export_all, east_zone, [f"svc-{index}"], ["west"])
            await wait_for(partial(bound, west, listener), listener, 15.0)
            export_times.append(time.monotonic() - started)
        for index in range(repetitions):
            await asyncio.sleep(random.uniform(0.3, 0.8))  # noqa: S311
            wanted = 2 + index

            def seen(wanted: int = wanted) -> bool:
                with ImportStore(west_zone.directory) as imports:
                    snapshot = imports.snapshots().get("east")
                imported = snapshot.service("default", "svc-0") if snapshot else None
                return imported is not None and imported.total_endpoints == wanted

            started = time.monotonic()
            await asyncio.to_thread(register_all, east_zone, [service(0, endpoints=wanted)])
            await wait_for(seen, "the endpoint change at west", 15.0)
            endpoint_times.append(time.monotonic() - started)
    finally:
        await stop_all([east, west])
    return [
        Row(
            "`export add` → peer gateway serving the import",
            f"{median(export_times) * 1000:.0f} ms",
            "export rule written to state.db (as the CLI does) → egress listener bound in the peer's gateway; "
            f"controller polls the catalog/rules every 0.2 s; {spread(export_times, 1000, ' ms')}",
        ),
        Row(
            "endpoint change → peer holds the new endpoint count",
            f"{median(endpoint_times) * 1000:.0f} ms",
            "service re-registered with one more endpoint → peer's stored import shows it (endpoints are "
            "not sent, only counts; the peer's egress is unchanged); "
            f"{spread(endpoint_times, 1000, ' ms')}",
        ),
    ]


# -- heartbeat loss -------------------------------------------------------------------------------------------------


async def heartbeat_loss(root: Path, heartbeat: float) -> float:
    east_zone = Zone.init(root / "east", "east", "east.mesh")
    west_zone = Zone.init(root / "west", "west", "west.mesh")
    east, west = assemble_zone(east_zone, settings(heartbeat)), assemble_zone(west_zone, settings(heartbeat))
    try:
        await start_peered(east, [west])
        await asyncio.sleep(random.uniform(heartbeat, 2 * heartbeat))  # noqa: S311 -- random heartbeat phase
        started = time.monotonic()
        await east.controller.stop()
        await wait_for(lambda: west.peering.peer("east").state == "FAILING", "west to mark east FAILING", 60.0)
        return time.monotonic() - started
    finally:
        await stop_all([east, west])


def heartbeat_rows(root: Path, plan: Sequence[tuple[float, int]]) -> list[Row]:
    rows = []
    for heartbeat, repetitions in plan:
        times = [
            asyncio.run(heartbeat_loss(root / f"hb-{heartbeat:g}-{repetition}", heartbeat))
            for repetition in range(repetitions)
        ]
        rows.append(
            Row(
                f"heartbeat loss → FAILING, heartbeat {heartbeat:g} s x 3",
                f"{median(times) * 1000:.0f} ms",
                f"acceptor's controller stopped → dialer marks it FAILING (deadline 3 heartbeats after the "
                f"last message, checked every heartbeat/4); {spread(times, 1000, ' ms')}",
            )
        )
    return rows


# -- bulk sync ------------------------------------------------------------------------------------------------------


@dataclass
class SyncResult:
    services: int
    gc_thresholds: tuple[int, int, int]
    register_seconds: float
    snapshot_seconds: dict[str, float]
    serving_seconds: dict[str, float]
    snapshot_bytes: int
    loopback_bytes: int
    exporter_rss_kib: int
    exporter_peak_kib: int
    peer_rss_kib: dict[str, int]
    max_loop_stall: dict[str, float]
    failing_seen: list[str]
    error: str | None
    egress: str
    peer_sockets: dict[str, int]
    change: ChangeCost
    peers: int = len(PEERS)


@dataclass(frozen=True)
class ChangeCost:
    """What one endpoint change after the sync costs, over :data:`CHANGES` changes one after another."""

    seconds: list[float]  # per change, until every peer gateway runs it
    per_peer: dict[str, float]  # per peer, the median
    delta_bytes: int  # the largest delta to one peer
    cpu_ms: dict[str, float]  # CPU per change of each zone's process ("east" the exporter, with this benchmark)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    def summary(self) -> str:
        if not self.seconds:
            return "not measured"
        low, high = min(self.seconds) * 1000, max(self.seconds) * 1000
        return f"{self.median * 1000:.0f} ms (median of {len(self.seconds)}, {low:.0f}-{high:.0f})"


# Endpoint changes measured after each sync, one after another (a single one is at the mercy of the machine).
CHANGES = 5


async def loop_stall_monitor(record: list[float], tick: float = 0.05) -> None:
    last = time.monotonic()
    while True:
        await asyncio.sleep(tick)
        now = time.monotonic()
        record.append(now - last - tick)
        last = now


def run_peer(
    directory: str,
    egress_host: str,
    egress: str,
    token: str,
    services: int,
    gc_thresholds: tuple[int, int, int],
    events: Connection,
) -> None:
    """A peer zone in its own process, as in production (each peer's 10,000 egress listeners are
    10,000 descriptors: one process holding every zone would hit the open-file limit first).

    Reports ``(event, wall time, detail)`` tuples: ``active``, ``snapshot`` (imports held),
    ``serving`` (every egress listener bound), ``state`` (a peering state other than ACTIVE),
    then ``done`` with its RSS and longest loop stall, after the parent says ``stop``.
    """
    logging.basicConfig(level=logging.ERROR)
    raise_open_file_limit()
    gc.set_threshold(*gc_thresholds)  # as `meshfed up` sets them (tune_garbage_collector), or the interpreter's
    asyncio.run(_peer(Path(directory), egress_host, egress, token, services, events))


def _served(runtime: ZoneRuntime, egress: str) -> int:
    """How many imports the peer's gateway serves: bound listeners, or names of its CONNECT listener."""
    if egress == "listeners":
        return sum(1 for listener in runtime.controller.gateway.addresses() if listener.startswith("egress:"))
    config = runtime.controller.applied_gateway_config
    listeners = [item for item in (config.listeners if config else []) if isinstance(item, ConnectListener)]
    return sum(len(listener.connect_routes) for listener in listeners)


def _served_endpoints(runtime: ZoneRuntime) -> int | None:
    """The endpoint count of the import of svc-0 as the peer's gateway serves it (the one the change touches)."""
    served = (i.service for i in runtime.controller.served_imports() if i.service.name == "svc-0")
    return next((service.total_endpoints for service in served), None)


async def _peer(directory: Path, egress_host: str, egress: str, token: str, services: int, events: Connection) -> None:
    runtime = assemble_zone(Zone.open(directory), settings(egress_host=egress_host, egress=egress, imports=services))
    stalls: list[float] = []
    monitor = asyncio.create_task(loop_stall_monitor(stalls))
    await runtime.controller.start()
    try:
        await runtime.peering.establish(token, "east")
        await wait_for(lambda: runtime.peering.peer("east").state == "ACTIVE", "peering ACTIVE", 30.0)
        events.send(("active", time.time(), None))
        reported: set[str] = set()
        # After ("change", count) from the parent: the endpoint count of svc-0 to wait for in what the gateway
        # serves (told, not read here first: a change may land before this loop's next turn).
        expected: int | None = None
        last_status = 0.0
        while True:
            if events.poll():
                message = events.recv()
                if message == "stop":
                    break
                _, expected = message
                reported.discard("change")
            if expected is not None and "change" not in reported and _served_endpoints(runtime) == expected:
                reported.add("change")
                events.send(("change", time.time(), None))
            # The peering's row at most every 50 ms: read from state.db, at the fine tick of a change
            # it would be a good part of the importer's work the change is measured by.
            if time.monotonic() - last_status < 0.05:
                await asyncio.sleep(0.01)
                continue
            last_status = time.monotonic()
            status = runtime.peering.peer("east")
            if status.state != "ACTIVE":
                events.send(("state", time.time(), f"{status.state} {status.state_reason}"))
            if "snapshot" not in reported and status.imported_services == services:
                reported.add("snapshot")
                events.send(("snapshot", time.time(), None))
            if "serving" not in reported and _served(runtime, egress) == services:
                if "snapshot" not in reported:  # serving implies the imports are stored
                    reported.add("snapshot")
                    events.send(("snapshot", time.time(), None))
                reported.add("serving")
                events.send(("serving", time.time(), None))
            # Finer while a change is awaited: a coarse tick would be most of its time.
            await asyncio.sleep(0.01 if expected is not None and "change" not in reported else 0.05)
    finally:
        monitor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await monitor
        rss = rss_kib()
        sockets = len(runtime.controller.gateway.addresses())
        await runtime.controller.stop()
        events.send(("done", time.time(), (rss, max(stalls, default=0.0), sockets)))


async def bulk_sync(
    root: Path,
    services: int,
    timeout: float,
    gc_thresholds: tuple[int, int, int] = GC_THRESHOLDS,
    egress: str = "listeners",
    peers: int = len(PEERS),
) -> SyncResult:
    """One sync, every zone's cyclic collector at ``gc_thresholds`` (the exporter's: this process's, for the run),
    the peers' imports served per ``egress`` (see :func:`settings`)."""
    before = gc.get_threshold()
    gc.set_threshold(*gc_thresholds)
    try:
        return await _bulk_sync(root, services, timeout, gc_thresholds, egress, peer_names(peers))
    finally:
        gc.set_threshold(*before)


async def _bulk_sync(
    root: Path, services: int, timeout: float, gc_thresholds: tuple[int, int, int], egress: str, names: tuple[str, ...]
) -> SyncResult:
    exporter_zone = Zone.init(root / "east", "east", "east.mesh")
    for name in names:
        Zone.init(root / name, name, f"{name}.mesh")
    register_seconds = register_all(exporter_zone, [service(index) for index in range(services)])
    exporter = assemble_zone(exporter_zone, settings())
    snapshot_seconds: dict[str, float] = {}
    serving_seconds: dict[str, float] = {}
    failing: set[str] = set()
    stalls: list[float] = []
    error: str | None = None
    peer_rss: dict[str, int] = {}
    peer_stalls: dict[str, float] = {}
    peer_sockets: dict[str, int] = {}
    change = ChangeCost([], {}, 0, {})
    spawn = multiprocessing.get_context("spawn")
    pipes: dict[str, Connection] = {}
    processes = []
    monitor = asyncio.create_task(loop_stall_monitor(stalls))
    await exporter.controller.start()
    try:
        for index, name in enumerate(names):
            ours, theirs = spawn.Pipe()
            token = exporter.peering.issue_token(name).encoded
            # One loopback address per peer, as each would have its own host: 3 x 10,000 egress
            # listeners on one address would exhaust its ephemeral ports (about 28,000).
            egress_host = f"127.0.0.{index + 2}"
            process = spawn.Process(
                target=run_peer,
                args=(str(root / name), egress_host, egress, token, services, gc_thresholds, theirs),
                daemon=True,
            )
            process.start()
            pipes[name] = ours
            processes.append(process)
        for name, pipe in pipes.items():
            event = await asyncio.to_thread(pipe.recv)
            if event[0] != "active":
                raise RuntimeError(f"peer {name} did not come up: {event}")
        # Stalls are measured from the export on: starting the peers' processes blocks this loop.
        stalls.clear()
        lo_before = loopback_bytes()
        started = time.time()
        await asyncio.to_thread(export_all, exporter_zone, [f"svc-{index}" for index in range(services)], ["*"])
        deadline = time.monotonic() + timeout
        while len(serving_seconds) < len(names):
            for name, pipe in pipes.items():
                while pipe.poll():
                    event, at, detail = pipe.recv()
                    if event == "snapshot":
                        snapshot_seconds[name] = at - started
                    elif event == "serving":
                        serving_seconds[name] = at - started
                    elif event == "state":
                        failing.add(f"{name}: {detail}")
            if time.monotonic() > deadline:
                error = (
                    f"not finished after {timeout:g} s: {len(snapshot_seconds)}/{len(names)} peers hold the snapshot, "
                    f"{len(serving_seconds)}/{len(names)} serve it"
                )
                break
            await asyncio.sleep(0.05)
        lo_after = loopback_bytes()
        # The bench's own measurements run off the exporter's loop, or they would count in its stalls.
        snapshot_bytes = await asyncio.to_thread(
            lambda: sum(
                wire.snapshot_to_proto(exporter.controller.exported_snapshot(name)).ByteSize() for name in names
            )
        )
        if error is None:
            change = await endpoint_changes(
                exporter, exporter_zone, pipes, dict(zip(names, processes, strict=True)), timeout
            )
        exporter_rss = rss_kib()
        for name, pipe in pipes.items():
            pipe.send("stop")
            while True:
                event, _, detail = await asyncio.to_thread(pipe.recv)
                if event == "done":
                    peer_rss[name], peer_stalls[name], peer_sockets[name] = detail
                    break
    finally:
        monitor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await monitor
        for process in processes:
            await asyncio.to_thread(process.join, 30)
            if process.is_alive():
                process.kill()
        await stop_all([exporter])
    return SyncResult(
        services,
        gc_thresholds,
        register_seconds,
        snapshot_seconds,
        serving_seconds,
        snapshot_bytes,
        lo_after - lo_before,
        exporter_rss,
        rss_kib("VmHWM"),
        peer_rss,
        {"east": max(stalls, default=0.0), **peer_stalls},
        sorted(failing),
        error,
        egress,
        peer_sockets,
        change,
        len(names),
    )


async def endpoint_changes(
    exporter: ZoneRuntime,
    zone: Zone,
    pipes: dict[str, Connection],
    processes: dict[str, multiprocessing.process.BaseProcess],
    timeout: float,
) -> ChangeCost:
    """:data:`CHANGES` endpoint changes of one service, one more endpoint and back, a third of a second
    apart: the time of each until every peer gateway runs it, and each process's CPU per change."""
    pids = {"east": os.getpid(), **{name: process.pid for name, process in processes.items() if process.pid}}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    seconds: list[float] = []
    per_peer: dict[str, list[float]] = {}
    delta_bytes = 0
    for index in range(CHANGES):
        endpoints = ENDPOINTS_PER_SERVICE + 1 if index % 2 == 0 else ENDPOINTS_PER_SERVICE
        applied, size = await one_endpoint_change(exporter, zone, pipes, timeout, endpoints)
        seconds.append(max(applied.values(), default=float("nan")))
        for name, value in applied.items():
            per_peer.setdefault(name, []).append(value)
        delta_bytes = max(delta_bytes, size)
        await asyncio.sleep(0.3)
    spent = {name: (cpu_seconds(pid) - before[name]) * 1000 / CHANGES for name, pid in pids.items()}
    return ChangeCost(seconds, {name: statistics.median(v) for name, v in per_peer.items()}, delta_bytes, spent)


def cpu_seconds(pid: int) -> float:
    """User and system CPU of process ``pid`` so far (the 0.3 s pauses between changes add next to nothing)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_endpoint_change(
    exporter: ZoneRuntime,
    zone: Zone,
    pipes: dict[str, Connection],
    timeout: float,
    endpoints: int = ENDPOINTS_PER_SERVICE + 1,
) -> tuple[dict[str, float], int]:
    """``endpoints`` endpoints (one more) for one service of the synced catalog: seconds until each peer's
    gateway runs the config built from the update (the imports it serves hold that count), and the delta's bytes."""
    names = tuple(pipes)
    before = await asyncio.to_thread(lambda: {name: exporter.controller.exported_snapshot(name) for name in names})
    for pipe in pipes.values():
        pipe.send(("change", endpoints))
    started = time.time()
    await asyncio.to_thread(register_all, zone, [service(0, endpoints)])
    applied: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(applied) < len(pipes) and time.monotonic() < deadline:
        for name, pipe in pipes.items():
            while pipe.poll():
                event, at, _ = pipe.recv()
                if event == "change":
                    applied[name] = at - started
        await asyncio.sleep(0.01)
    after = await asyncio.to_thread(lambda: {name: exporter.controller.exported_snapshot(name) for name in names})
    delta_bytes = await asyncio.to_thread(
        lambda: max(wire.diff(before[name], after[name]).ByteSize() for name in names)
    )
    return applied, delta_bytes


def exported_snapshot_cost(services: int) -> float:
    """Seconds of one ``exported_snapshot`` call with one export rule per service (no I/O)."""
    catalog = CatalogSnapshot(version=1, services=[service(index) for index in range(services)])
    rules = [ExportRule("default", f"svc-{index}", "*") for index in range(services)]
    started = time.perf_counter()
    exported_snapshot(
        zone="east",
        trust_domain="east.mesh",
        gateway_addresses=["127.0.0.1:1"],
        peer="west",
        catalog=catalog,
        index=ExportIndex(rules),
        rules_version=1,
    )
    return time.perf_counter() - started


def sync_rows(results: Sequence[SyncResult], costs: dict[int, float]) -> list[Row]:
    rows = []
    for result in results:
        collector = "GC as `meshfed up` tunes it" if result.gc_thresholds == GC_THRESHOLDS else "interpreter's GC"
        egress = "one CONNECT listener" if result.egress == "connect" else "a listener per import"
        size = (
            f"{result.services:,} services x {ENDPOINTS_PER_SERVICE} endpoints → {result.peers} peers, "
            f"{collector}, {egress}"
        )
        snapshot = max(result.snapshot_seconds.values(), default=float("nan"))
        serving = max(result.serving_seconds.values(), default=float("nan"))
        outcome = f"**FAILED**: {result.error}; " if result.error else ""
        rows += [
            Row(
                f"sync {size}: all {result.peers} peers hold the snapshot",
                f"{snapshot:.1f} s" if result.snapshot_seconds else "—",
                f"{outcome}from the export rules' commit (one rule per service, to `*`, one transaction) to "
                f"`imported_services` = {result.services:,} on every peer; per peer "
                + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in sorted(result.snapshot_seconds.items()))
                + f"; catalog registration (not counted): {result.register_seconds:.1f} s",
            ),
            Row(
                f"sync {size}: all {result.peers} peer gateways serve every import",
                f"{serving:.1f} s" if result.serving_seconds else "—",
                (
                    f"{result.services:,} egress listeners bound on each peer gateway"
                    if result.egress == "listeners"
                    else f"{result.services:,} names in each peer's CONNECT listener (its running config)"
                ),
            ),
            Row(
                f"sync {size}: listening sockets on a peer gateway",
                str(max(result.peer_sockets.values(), default=0)),
                "listeners of the largest importer's gateway after the sync (ingress included); per peer "
                + ", ".join(f"{name} {count:,}" for name, count in sorted(result.peer_sockets.items())),
            ),
            Row(
                f"sync {size}: one endpoint change → every peer gateway runs it",
                f"{result.change.median * 1000:.0f} ms",
                f"{CHANGES} changes, one more endpoint registered for one service after the sync and back (by "
                "another connection, as the CLI would) → the imports the peer's gateway serves hold the new "
                f"endpoint count; {result.change.summary()}; a delta of at most {result.change.delta_bytes} bytes "
                "to each peer; median per peer "
                + ", ".join(f"{name} {s * 1000:.0f} ms" for name, s in sorted(result.change.per_peer.items()))
                + "; CPU per change "
                + ", ".join(f"{name} {ms:.0f} ms" for name, ms in sorted(result.change.cpu_ms.items())),
            ),
            Row(
                f"sync {size}: bytes",
                f"{result.snapshot_bytes / 1024:.0f} KiB",
                f"serialized protobuf `Snapshot` sizes, summed over the {result.peers} peers (gRPC/HTTP2/TLS "
                "framing not "
                f"included); loopback interface counter over the window, machine-wide and including "
                f"heartbeats, acks and other processes: {result.loopback_bytes / 1024:.0f} KiB",
            ),
            Row(
                f"sync {size}: exporter controller RSS",
                f"{result.exporter_rss_kib / 1024:.0f} MiB",
                "VmRSS of the exporting zone's process (controller, gateway, API-less) after the sync "
                f"(and the one endpoint change, when run); peak VmHWM "
                f"{result.exporter_peak_kib / 1024:.0f} MiB (the bench's own catalog writes included)",
            ),
            Row(
                f"sync {size}: peer controller RSS",
                f"{max(result.peer_rss_kib.values(), default=0) / 1024:.0f} MiB",
                f"largest VmRSS of the {result.peers} importing zones, each in its own process, at the end "
                "(after the endpoint change, when run); per peer "
                + ", ".join(f"{name} {kib / 1024:.0f} MiB" for name, kib in sorted(result.peer_rss_kib.items())),
            ),
            Row(
                f"sync {size}: longest event-loop stall",
                f"{max(result.max_loop_stall.values(), default=0.0) * 1000:.0f} ms",
                "longest lateness of a 50 ms ticker on each zone's asyncio loop, from the export on ("
                + ", ".join(f"{name} {stall * 1000:.0f} ms" for name, stall in sorted(result.max_loop_stall.items()))
                + "); peers mark a peer FAILING after 3 missed 5 s heartbeats = 15 s; states other than ACTIVE "
                "seen: " + ("; ".join(result.failing_seen) if result.failing_seen else "none"),
            ),
        ]
    for services, seconds in sorted(costs.items()):
        rows.append(
            Row(
                f"one `exported_snapshot()` call, {services:,} services, one rule each",
                f"{seconds:.2f} s",
                "pure CPU; rules are indexed by service (`ExportIndex`), so one lookup per service; the "
                "controller also caches each peer's snapshot per applied config generation",
            )
        )
    return rows


# -- cost against size ----------------------------------------------------------------------------------------------

SCALE_SERVICES = (1_000, 10_000, 50_000)
SCALE_PEERS = (1, 3, 10)


def _scale_cell(root: str, services: int, peers: int, timeout: float, results: Connection) -> None:
    """One cell of the scale table in a fresh process of its own (the exporter), so that no cell's
    memory or collector state carries into the next."""
    logging.basicConfig(level=logging.ERROR)
    raise_open_file_limit()
    result = asyncio.run(bulk_sync(Path(root), services, timeout, GC_THRESHOLDS, "connect", peers))
    results.send(result)


def scale_results(root: Path, sizes: Sequence[int], peer_counts: Sequence[int], timeout: float) -> list[SyncResult]:
    """The sync at every size x peer count, each in a fresh process, one after another."""
    spawn = multiprocessing.get_context("spawn")
    results = []
    for services in sizes:
        for peers in peer_counts:
            ours, theirs = spawn.Pipe()
            # Not a daemon: the cell starts the importing zones as processes of its own.
            cell = spawn.Process(
                target=_scale_cell, args=(str(root / f"scale-{services}-{peers}"), services, peers, timeout, theirs)
            )
            cell.start()
            results.append(ours.recv())
            cell.join(60)
            print(f"scale: {services:,} services → {peers} peers done", file=sys.stderr)
    return results


def scale_table(results: Sequence[SyncResult]) -> list[str]:
    """One line per size and peer count: what the issue's targets are stated in."""
    lines = [
        "| services | peers | all peer gateways serve every import | bytes per peer | exporter RSS | "
        "largest importer RSS | longest loop stall | listening sockets per importer | one endpoint change: "
        "bytes per peer, time until every peer gateway runs it | CPU per change: exporter, largest importer |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for result in results:
        serving = max(result.serving_seconds.values(), default=float("nan"))
        importers = [ms for name, ms in result.change.cpu_ms.items() if name != "east"]
        outcome = f" **FAILED**: {result.error}" if result.error else ""
        lines.append(
            f"| {result.services:,} | {result.peers} | {serving:.1f} s{outcome} | "
            f"{result.snapshot_bytes / max(result.peers, 1) / 1024:.0f} KiB | "
            f"{result.exporter_rss_kib / 1024:.0f} MiB | "
            f"{max(result.peer_rss_kib.values(), default=0) / 1024:.0f} MiB | "
            f"{max(result.max_loop_stall.values(), default=0.0) * 1000:.0f} ms | "
            f"{max(result.peer_sockets.values(), default=0)} | {result.change.delta_bytes} B, "
            f"{result.change.summary()} | {result.change.cpu_ms.get('east', float('nan')):.0f} ms, "
            f"{max(importers, default=float('nan')):.0f} ms |"
        )
    return lines


# -- report ---------------------------------------------------------------------------------------------------------


def render(rows: list[Row], args: argparse.Namespace, elapsed: float) -> str:
    load = os.getloadavg()
    lines = [
        "# meshfed federation control-plane benchmarks (issue #5)",
        "",
        f"`bench/control_plane.py {' '.join(sys.argv[1:])}`".replace(" `", "`")
        + f" on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} CPUs, load average {load[0]:.2f} at the end, {elapsed:.0f} s in all. "
        "Timed values are medians of the repetitions shown (the sync rows are one run each); absolute "
        "times on a small shared machine, compare them only within one run.",
        "",
        "| measurement | value | how |",
        "|---|---|---|",
        *(f"| {row.what} | {row.value} | {row.detail} |" for row in rows),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and a smaller sync (about 40 s)")
    parser.add_argument("--sync-only", action="store_true", help="only the bulk sync rows")
    parser.add_argument("--sizes", type=int, nargs="+", help="services in the bulk sync runs (default 10000)")
    parser.add_argument(
        "--gc",
        choices=["tuned", "interpreter"],
        default="tuned",
        help="the zones' collector thresholds: as `meshfed up` tunes them (default), or the interpreter's; "
        "bench/control_plane_gc runs both, one process each, and writes them side by side",
    )
    parser.add_argument(
        "--egress",
        choices=["listeners", "connect"],
        default="listeners",
        help="how the peers serve their imports: a listener each (default), or one CONNECT listener "
        "(--no-per-import-listeners); bench/control_plane_egress runs both, one process each",
    )
    parser.add_argument("--sync-timeout", type=float, default=90.0, help="seconds a sync run may take")
    parser.add_argument(
        "--cost-sizes", type=int, nargs="*", help="sizes of the exported_snapshot() cost rows (default 1000 10000)"
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help="only the table of cost against size: services x peers (default 1,000/10,000/50,000 x 1/3/10), "
        "one CONNECT listener per importer, each cell in a fresh process; "
        "written to bench/results/control_plane_scale.md",
    )
    parser.add_argument("--peers", type=int, nargs="+", help="peer counts of the --scale table (default 1 3 10)")
    parser.add_argument("--output", type=Path, default=None, help="where to write the Markdown table")
    args = parser.parse_args()
    if args.scale:
        main_scale(args)
        return
    args.output = args.output or RESULTS
    logging.basicConfig(level=logging.ERROR)
    sizes = args.sizes or ([500] if args.quick else [10000])
    cost_sizes = args.cost_sizes if args.cost_sizes is not None else ([1000, 2000] if args.quick else [1000, 10000])
    started = time.monotonic()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="meshfed-bench-cp-") as tmp:
        root = Path(tmp)
        if not args.sync_only:
            rows += asyncio.run(propagation(root / "propagation", 3 if args.quick else 5))
            rows += heartbeat_rows(root, [(0.2, 3), (5.0, 1)] if args.quick else [(0.2, 5), (5.0, 2)])
        collector = INTERPRETER_GC if args.gc == "interpreter" else GC_THRESHOLDS
        results = [
            asyncio.run(bulk_sync(root / f"sync-{size}", size, args.sync_timeout, collector, args.egress))
            for size in sizes
        ]
        costs = {size: exported_snapshot_cost(size) for size in cost_sizes}
        rows += sync_rows(results, costs)
    table = render(rows, args, time.monotonic() - started)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    print(f"written to {args.output}", file=sys.stderr)


def main_scale(args: argparse.Namespace) -> None:
    sizes = args.sizes or list(SCALE_SERVICES)
    peer_counts = args.peers or list(SCALE_PEERS)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="meshfed-bench-scale-") as tmp:
        results = scale_results(Path(tmp), sizes, peer_counts, args.sync_timeout)
    load = os.getloadavg()
    table = "\n".join(
        [
            "# meshfed federation control plane: cost against size",
            "",
            f"`bench/control_plane.py {' '.join(sys.argv[1:])}` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, "
            f"{os.cpu_count()} CPUs, load average {load[0]:.2f} at the end, {time.monotonic() - started:.0f} s in all; "
            "one run per cell, each cell in a fresh process, every zone in a process of its own on one machine "
            f"(the importers share its {os.cpu_count()} CPUs). Each service has {ENDPOINTS_PER_SERVICE} endpoints "
            "and is exported to every peer (one rule each, to `*`); importers serve every import on one CONNECT "
            'listener. The clock starts at the export rules\' commit; "serve" means the name is in each peer '
            "gateway's running config. Bytes per peer: the serialized `Snapshot`. RSS: VmRSS after the sync and "
            "the endpoint changes. Stall: the longest lateness of a 50 ms ticker on any zone's loop. The change: "
            "one more endpoint registered for one service (by another connection to the catalog, as the CLI "
            f"would), until the imports every peer's gateway serves hold the new endpoint count; {CHANGES} of "
            "them, one more endpoint and back, a third of a second apart: the median and the range. CPU per "
            "change: each zone process's user and system time over those changes, divided by their number (the "
            "exporter's includes this benchmark's own registrations and snapshot reads).",
            "",
            *scale_table(results),
            "",
        ]
    )
    print(table)
    output = args.output or RESULTS.with_name("control_plane_scale.md")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(table)
    print(f"written to {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
