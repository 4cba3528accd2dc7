"""``meshfed demo``: three zones on this machine, peered with tokens, with traffic flowing.

Each zone has its own trust domain and root. ``west`` peers with ``east`` and
``north`` using one-time tokens; the peering exchanges their SPIFFE bundles.
``east`` and ``north`` both run service ``web`` and export it to ``west``,
whose gateway then serves ``web.default.east`` and ``web.default.north`` on
local egress listeners. The path of every request::

    client ─plain─► west egress (originate) ═mTLS, SNI═► east|north ingress (terminate) ─plain─► web

Since ``web`` runs in two peers, west's gateway also serves it as one
*failover group* (``failover:web.default:http``): east first, then north. The
demo stops east's backend; east's gateway health checks notice, east tells its
peers ``web`` has no healthy endpoint, and west's group moves to north.

A fourth zone, ``rogue``, which nobody peered with, tries the same call and
must be refused at the handshake.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import logging
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from meshfed.catalog import EmbeddedCatalog, Endpoint, Service
from meshfed.controller import ControllerSettings
from meshfed.federation.exports import ExportRules
from meshfed.federation.settings import PeeringSettings
from meshfed.gateway import Cluster, GatewayConfig, Identity, OriginateListener, UpstreamTls
from meshfed.gateway import Endpoint as GatewayEndpoint
from meshfed.gateway import Gateway as DataPlane
from meshfed.gateway.sni import service_sni
from meshfed.runtime import ZoneRuntime, ZoneSettings, assemble_zone
from meshfed.trust.bundle import bundle_roots_pem, parse_bundle
from meshfed.zone import Zone

_SERVICE, _NAMESPACE, _PORT = "web", "default", 8080
_LOOPBACK = "127.0.0.1"
_EXPORTERS = ("east", "north")
_SETTINGS = ZoneSettings(
    controller=ControllerSettings(
        gateway_address=f"{_LOOPBACK}:0",
        egress_port_base=0,
        # Default health checks: the failover step needs none to be quick (a zone whose backend is
        # gone answers that it cannot open the service, and west opens the next one).
    ),
    peering=PeeringSettings(
        listen_address=f"{_LOOPBACK}:0", establish_address=f"{_LOOPBACK}:0", heartbeat_interval=0.5
    ),
)
_FAILOVER_LISTENER = f"failover:{_SERVICE}.{_NAMESPACE}:http"
_WAIT_SECONDS = 20.0


@dataclass
class DemoReport:
    """What the demo observed; ``ok`` only if every request succeeded and the rogue zone was refused."""

    sent: int = 0
    succeeded: int = 0
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    ingress_verified: dict[str, dict[str, int]] = field(default_factory=dict)
    egress_verified: dict[str, int] = field(default_factory=dict)
    propagation_ms: float = 0.0
    rogue_refused: bool = False
    # Failover step: east served the group before its backend stopped; then north took over after
    # ``failover_ms``, with ``failover_failed`` requests failing inside that detection window.
    failover_first: str | None = None
    failover_ms: float | None = None
    failover_failed: int = 0

    @property
    def ok(self) -> bool:
        served = self.sent > 0 and self.succeeded == self.sent
        return served and self.rogue_refused and self.failover_first == "east" and self.failover_ms is not None


def run_demo(requests: int = 200, concurrency: int = 8, console: Console | None = None) -> DemoReport:
    """Run the demo in a temporary directory; everything it starts is stopped before it returns."""
    console = console or Console(soft_wrap=True)
    return asyncio.run(_demo(requests, concurrency, console))


async def _demo(requests: int, concurrency: int, console: Console) -> DemoReport:
    report = DemoReport()
    with tempfile.TemporaryDirectory(prefix="meshfed-demo-") as tmp, ExitStack() as threads:
        root = Path(tmp)
        zones = {name: Zone.init(root / name, name, f"{name}.mesh") for name in ("west", *_EXPORTERS, "rogue")}
        console.print("[bold]meshfed demo[/]: three zones, three roots of trust, peered with one-time tokens")
        for zone in zones.values():
            fingerprint = zone.trust.own_bundle().fingerprints()[0]
            console.print(
                f"  zone {zone.name:<6} trust domain {zone.trust_domain.name:<11} root sha256:{fingerprint[:16]}…"
            )
        stop_backend: dict[str, Callable[[], None]] = {}
        for name in _EXPORTERS:
            backend, stop_backend[name] = threads.enter_context(_http_backend(f"hello from {name}"))
            _register_and_export(zones[name], backend, to="west")
        async with AsyncExitStack() as running:
            meshfed_log = logging.getLogger("meshfed")
            running.callback(meshfed_log.setLevel, meshfed_log.level)  # runs last: the level as it was
            runtimes: dict[str, ZoneRuntime] = {}
            for name in ("west", *_EXPORTERS):
                runtime = assemble_zone(zones[name], _SETTINGS)
                await runtime.controller.start()
                running.push_async_callback(runtime.controller.stop)
                runtimes[name] = runtime
            # Run first at the end: zones stopping one after another are expected to see their peers go,
            # and those warnings must not follow the report as if something had failed.
            running.callback(meshfed_log.setLevel, logging.ERROR)
            west = runtimes["west"]
            for name in _EXPORTERS:
                token = runtimes[name].peering.issue_token("west").encoded
                await west.peering.establish(token, name)
            await _until(lambda: all(west.peering.peer(n).state == "ACTIVE" for n in _EXPORTERS), "peerings ACTIVE")
            console.print("  west peered with east and north: bundles exchanged over the peering, states ACTIVE")

            listeners = {name: f"egress:{_SERVICE}.{_NAMESPACE}.{name}:http" for name in _EXPORTERS}
            await _until(lambda: set(listeners.values()) <= set(west.controller.gateway.addresses()), "imports")
            report.propagation_ms = await _measure_propagation(zones["north"], west)
            await _until(lambda: _FAILOVER_LISTENER in west.controller.gateway.addresses(), "the failover group")
            for name, listener in listeners.items():
                address = west.controller.gateway.address(listener)
                console.print(f"  west egress for {_SERVICE}.{_NAMESPACE}.{name} (originate) on {_fmt(address)}")
            group = west.controller.failover_groups()[0].describe()
            address = west.controller.gateway.address(_FAILOVER_LISTENER)
            console.print(f"  west egress for {_SERVICE}.{_NAMESPACE} [{group}] (originate) on {_fmt(address)}")
            for name in _EXPORTERS:
                ingress = runtimes[name].controller.gateway.address("ingress")
                console.print(f"  {name} ingress (terminate) on {_fmt(ingress)}")

            started = time.perf_counter()
            await asyncio.to_thread(_send_traffic, west, listeners, requests, concurrency, report, console)
            elapsed = time.perf_counter() - started

            report.rogue_refused = await asyncio.to_thread(_rogue_is_refused, zones["rogue"], runtimes["east"])
            for name in _EXPORTERS:
                stats = runtimes[name].controller.gateway.stats()["listeners"]["ingress"]
                report.ingress_verified[name] = stats["peer_identities"]
            for listener in listeners.values():
                for spiffe_id, count in west.controller.gateway.stats()["listeners"][listener][
                    "peer_identities"
                ].items():
                    report.egress_verified[spiffe_id] = report.egress_verified.get(spiffe_id, 0) + count
            await asyncio.to_thread(_fail_over, west, stop_backend["east"], report, console)
            _print_report(report, runtimes, elapsed, console)
    return report


def _register_and_export(zone: Zone, backend: tuple[str, int], to: str) -> None:
    with EmbeddedCatalog(zone.directory) as catalog:
        catalog.register(
            Service(
                name=_SERVICE,
                namespace=_NAMESPACE,
                ports={"http": _PORT},
                endpoints=[Endpoint(address=backend[0], port=backend[1], zone=zone.name)],
            )
        )
    with ExportRules(zone.directory) as rules:
        rules.add(_SERVICE, _NAMESPACE, [to])


async def _measure_propagation(exporter: Zone, importer: ZoneRuntime) -> float:
    """Time from an export rule written (as the CLI would) to the importer's gateway serving it."""
    with EmbeddedCatalog(exporter.directory) as catalog:
        web = catalog.load().service(_NAMESPACE, _SERVICE)
        assert web is not None
        catalog.register(web.model_copy(update={"name": "api"}))
    listener = f"egress:api.{_NAMESPACE}.{exporter.name}:http"
    started = time.monotonic()
    with ExportRules(exporter.directory) as rules:
        rules.add("api", _NAMESPACE, ["west"])
    await _until(lambda: listener in importer.controller.gateway.addresses(), "the new export at west")
    return (time.monotonic() - started) * 1000


def _send_traffic(
    west: ZoneRuntime,
    listeners: dict[str, str],
    requests: int,
    concurrency: int,
    report: DemoReport,
    console: Console,
) -> None:
    targets = [(name, west.controller.gateway.address(listener)) for name, listener in listeners.items()]
    columns = (TextColumn("  requests"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("requests", total=requests)

        def one(index: int) -> tuple[str, float, str | None]:
            zone, address = targets[index % len(targets)]
            latency, error = _request(address, f"/call/{index}", expect=f"hello from {zone}")
            progress.advance(task)
            return zone, latency, error

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(one, range(requests)))
    report.sent = requests
    for zone, latency, error in results:
        if error is None:
            report.succeeded += 1
            report.latencies_ms.setdefault(zone, []).append(latency)
        else:
            report.failures.append(error)


def _fail_over(west: ZoneRuntime, stop_east: Callable[[], None], report: DemoReport, console: Console) -> None:
    """Call the failover group, stop east's backend, and keep calling until north answers."""
    address = west.controller.gateway.address(_FAILOVER_LISTENER)
    for zone in _EXPORTERS:
        if _request(address, "/failover/before", expect=f"hello from {zone}")[1] is None:
            report.failover_first = zone
    stop_east()
    stopped = time.monotonic()
    with console.status("  east's web stopped; west's failover group is moving to north…"):
        while time.monotonic() - stopped < _WAIT_SECONDS:
            _, error = _request(address, f"/failover/{report.failover_failed}", expect="hello from north")
            if error is None:
                report.failover_ms = (time.monotonic() - stopped) * 1000
                return
            report.failover_failed += 1
            time.sleep(0.02)


def _rogue_is_refused(rogue: Zone, east: ZoneRuntime) -> bool:
    """A zone east never peered with dials east's ingress with its own SVID: the handshake must fail."""
    rogue.trust.import_bundle(parse_bundle(east.zone.trust_domain, east.zone.trust.own_bundle().to_spiffe_json()))
    svid = rogue.authority.issue_svid(rogue.trust_domain.gateway_id, dt.timedelta(minutes=10))
    sni = service_sni(_SERVICE, _NAMESPACE, _PORT, east.zone.trust_domain)
    config = GatewayConfig(
        identity=Identity(
            cert_chain_pem=svid.cert_chain_pem().decode(), private_key_pem=svid.private_key_pem().decode()
        ),
        trust_bundles=bundle_roots_pem([stored.bundle for stored in rogue.trust.trusted_bundles()]),
        listeners=[
            OriginateListener(
                name="egress",
                address=f"{_LOOPBACK}:0",
                cluster="east",
            )
        ],
        clusters=[
            Cluster(
                name="east",
                endpoints=[GatewayEndpoint(address=_fmt(east.controller.gateway.address("ingress")))],
                tls=UpstreamTls(sni=sni, peer_spiffe_id=str(east.zone.trust_domain.gateway_id)),
            )
        ],
    )
    with DataPlane(config) as gateway:
        _, error = _request(gateway.address("egress"), "/rogue", expect="hello")
    return error is not None


def _request(address: tuple[str, int], path: str, expect: str) -> tuple[float, str | None]:
    """One GET on a fresh connection (so each request is a full mTLS handshake between gateways)."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection(*address, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as err:
        return 0.0, f"{path}: {type(err).__name__}: {err}"
    finally:
        connection.close()
    if response.status != 200 or body != f"{expect}: {path}":
        return 0.0, f"{path}: unexpected response {response.status} {body[:80]!r}"
    return (time.perf_counter() - started) * 1000, None


@contextmanager
def _http_backend(greeting: str) -> Iterator[tuple[tuple[str, int], Callable[[], None]]]:
    """An HTTP server answering ``<greeting>: <path>``; yields its address and a function that stops it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"{greeting}: {self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Keep the demo's output to its report."""

    server = ThreadingHTTPServer((_LOOPBACK, 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name=f"meshfed-demo-{greeting}", daemon=True)
    thread.start()
    stopped = threading.Event()

    def stop() -> None:
        if not stopped.is_set():
            stopped.set()
            server.shutdown()
            server.server_close()
            thread.join()

    try:
        yield (_LOOPBACK, server.server_address[1]), stop
    finally:
        stop()


async def _until(check: object, what: str) -> None:
    assert callable(check)
    deadline = time.monotonic() + _WAIT_SECONDS
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo: timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _print_report(report: DemoReport, runtimes: dict[str, ZoneRuntime], elapsed: float, console: Console) -> None:
    table = Table(title="west → web, through the gateways", title_justify="left")
    for column, justify in (("import", "left"), ("answered", "right"), ("p50 ms", "right"), ("p99 ms", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for zone in _EXPORTERS:
        latencies = report.latencies_ms.get(zone, [])
        p50, p99 = _percentiles(latencies)
        table.add_row(f"{_SERVICE}.{_NAMESPACE}.{zone}", str(len(latencies)), p50, p99)
    console.print(table)
    peers = Table(title="west's peerings", title_justify="left")
    for column in ("peer", "state", "heartbeat age s", "acked version", "imported"):
        peers.add_column(column)
    for status in runtimes["west"].peering.peers():
        age = f"{status.heartbeat_age_seconds:.1f}" if status.heartbeat_age_seconds is not None else "-"
        peers.add_row(status.name, status.state, age, str(status.acked_version), str(status.imported_services))
    console.print(peers)
    failed = len(report.failures)
    console.print(f"requests: {report.sent} sent, {report.succeeded} succeeded, {failed} failed in {elapsed:.2f} s")
    for failure in report.failures[:5]:
        console.print(f"  failed: {failure}")
    for zone, identities in report.ingress_verified.items():
        for spiffe_id, count in identities.items():
            console.print(f"{zone} ingress verified client {spiffe_id} ({count} connections)")
    for spiffe_id, count in report.egress_verified.items():
        console.print(f"west egress verified server {spiffe_id} ({count} connections)")
    summary = Table(title="summary", title_justify="left")
    summary.add_column("what")
    summary.add_column("observed")
    summary.add_row("export → peer gateway serving it", f"{report.propagation_ms:.0f} ms")
    if report.failover_ms is None:
        failover = "[red]north never answered[/]"
    else:
        failover = (
            f"{report.failover_first} → north {report.failover_ms:.0f} ms after east's backend stopped; "
            f"{report.failover_failed} requests failed in that window"
        )
    summary.add_row(f"failover of {_SERVICE}.{_NAMESPACE}", failover)
    refused = "yes" if report.rogue_refused else "[red]NO[/]"
    summary.add_row("rogue.mesh (never peered) refused at the handshake", refused)
    console.print(summary)
    console.print(f"result: {'[green]OK[/]' if report.ok else '[red]FAILED[/]'}")


def _percentiles(latencies: list[float]) -> tuple[str, str]:
    if len(latencies) < 2:
        return "-", "-"
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return f"{cuts[49]:.2f}", f"{cuts[98]:.2f}"


def _fmt(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"
