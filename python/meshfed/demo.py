"""``meshfed demo``: two zones on this machine, federated, with traffic flowing.

Zone ``west`` calls service ``web`` in zone ``east``. Each zone has its own
trust domain and root; they trust each other only through exchanged SPIFFE
bundles. The path is::

    client ─plain─► west egress (originate) ═mTLS, SNI═► east ingress (terminate) ─plain─► web

A third zone, ``rogue``, which east never imported, tries the same call and
must be refused at the handshake.
"""

from __future__ import annotations

import datetime as dt
import http.client
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from meshfed.gateway import (
    Cluster,
    Endpoint,
    Gateway,
    GatewayConfig,
    Identity,
    OriginateListener,
    Route,
    TerminateListener,
    service_sni,
)
from meshfed.trust.bundle import bundle_roots_pem, parse_bundle
from meshfed.zone import Zone

_SERVICE, _NAMESPACE, _PORT = "web", "default", 8080
_LOOPBACK = "127.0.0.1"
_GATEWAY_SVID_TTL = dt.timedelta(hours=1)


@dataclass
class DemoReport:
    """What the demo observed; ``ok`` only if every request succeeded and the rogue zone was refused."""

    sent: int = 0
    succeeded: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    ingress_verified: dict[str, int] = field(default_factory=dict)
    egress_verified: dict[str, int] = field(default_factory=dict)
    rogue_refused: bool = False

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.succeeded == self.sent and self.rogue_refused


def run_demo(requests: int = 200, concurrency: int = 8, echo: Callable[[str], object] = print) -> DemoReport:
    """Run the demo in a temporary directory; everything it starts is stopped before it returns."""
    report = DemoReport()
    with tempfile.TemporaryDirectory(prefix="meshfed-demo-") as tmp, ExitStack() as running:
        root = Path(tmp)
        west = Zone.init(root / "west", "west", "west.mesh")
        east = Zone.init(root / "east", "east", "east.mesh")
        rogue = Zone.init(root / "rogue", "rogue", "rogue.mesh")
        echo("meshfed demo: two zones, two roots of trust, one mTLS hop between gateways")
        for zone in (west, east):
            fingerprint = zone.own_bundle().fingerprints()[0]
            echo(f"  zone {zone.name:<5} trust domain {zone.trust_domain}  root sha256:{fingerprint[:16]}…")

        # Bundles travel in the SPIFFE wire format, exactly as between real clusters.
        for importer, exporter in ((west, east), (east, west), (rogue, east)):
            importer.import_bundle(parse_bundle(exporter.trust_domain, exporter.own_bundle().to_spiffe_json()))
        echo("  bundles exchanged: west trusts east.mesh, east trusts west.mesh; nobody trusts rogue.mesh")

        backend = running.enter_context(_http_backend(f"hello from {east.name}"))
        sni = service_sni(_SERVICE, _NAMESPACE, _PORT, east.trust_domain)
        ingress = running.enter_context(Gateway(_ingress_config(east, sni, backend, allowed_peers=[west])))
        ingress_address = ingress.address("ingress")
        egress = running.enter_context(Gateway(_egress_config(west, east, sni, ingress_address)))
        egress_address = egress.address(f"egress-{_SERVICE}")
        rogue_egress = running.enter_context(Gateway(_egress_config(rogue, east, sni, ingress_address)))
        echo(f"  east ingress (terminate) on {_fmt(ingress_address)} → {_SERVICE}.{_NAMESPACE} at {_fmt(backend)}")
        echo(f"  west egress (originate) on {_fmt(egress_address)} → SNI {sni}")

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(lambda i: _request(egress_address, f"/call/{i}"), range(requests)))
        elapsed = time.perf_counter() - started
        report.sent = requests
        for latency_ms, error in results:
            if error is None:
                report.succeeded += 1
                report.latencies_ms.append(latency_ms)
            else:
                report.failures.append(error)

        _, rogue_error = _request(rogue_egress.address(f"egress-{_SERVICE}"), "/rogue")
        report.rogue_refused = rogue_error is not None
        report.ingress_verified = ingress.stats()["listeners"]["ingress"]["peer_identities"]
        report.egress_verified = egress.stats()["listeners"][f"egress-{_SERVICE}"]["peer_identities"]
        _print_report(report, elapsed, echo)
    return report


def _ingress_config(zone: Zone, sni: str, backend: tuple[str, int], allowed_peers: list[Zone]) -> GatewayConfig:
    return GatewayConfig(
        identity=_gateway_identity(zone),
        trust_bundles=bundle_roots_pem([stored.bundle for stored in zone.trusted_bundles()]),
        listeners=[
            TerminateListener(
                name="ingress",
                address=f"{_LOOPBACK}:0",
                routes=[
                    Route(
                        sni=sni, cluster=_SERVICE, allow=[f"spiffe://{peer.trust_domain}/*" for peer in allowed_peers]
                    )
                ],
            )
        ],
        clusters=[Cluster(name=_SERVICE, endpoints=[Endpoint(address=_fmt(backend))])],
    )


def _egress_config(zone: Zone, peer: Zone, sni: str, peer_gateway: tuple[str, int]) -> GatewayConfig:
    return GatewayConfig(
        identity=_gateway_identity(zone),
        trust_bundles=bundle_roots_pem([stored.bundle for stored in zone.trusted_bundles()]),
        listeners=[
            OriginateListener(
                name=f"egress-{_SERVICE}",
                address=f"{_LOOPBACK}:0",
                cluster=f"gateway-{peer.name}",
                sni=sni,
                peer_spiffe_id=str(peer.trust_domain.gateway_id),
            )
        ],
        clusters=[Cluster(name=f"gateway-{peer.name}", endpoints=[Endpoint(address=_fmt(peer_gateway))])],
    )


def _gateway_identity(zone: Zone) -> Identity:
    svid = zone.issue_svid(zone.trust_domain.gateway_id, _GATEWAY_SVID_TTL)
    return Identity(cert_chain_pem=svid.cert_chain_pem().decode(), private_key_pem=svid.private_key_pem().decode())


def _request(address: tuple[str, int], path: str) -> tuple[float, str | None]:
    """One GET on a fresh connection (so each request is a full mTLS handshake between gateways)."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection(*address, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as err:
        return 0.0, f"{path}: {type(err).__name__}: {err}"
    finally:
        connection.close()
    if response.status != 200 or not body.endswith(path.encode()):
        return 0.0, f"{path}: unexpected response {response.status} {body[:80]!r}"
    return (time.perf_counter() - started) * 1000, None


@contextmanager
def _http_backend(greeting: str) -> Iterator[tuple[str, int]]:
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
    thread = threading.Thread(target=server.serve_forever, name="meshfed-demo-backend", daemon=True)
    thread.start()
    try:
        yield _LOOPBACK, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _print_report(report: DemoReport, elapsed: float, echo: Callable[[str], object]) -> None:
    echo(
        f"requests: {report.sent} sent, {report.succeeded} succeeded, {len(report.failures)} failed in {elapsed:.2f} s"
    )
    if len(report.latencies_ms) >= 2:
        cuts = statistics.quantiles(report.latencies_ms, n=100, method="inclusive")
        echo(f"latency: p50 {cuts[49]:.2f} ms, p99 {cuts[98]:.2f} ms (new connection + gateway mTLS handshake each)")
    for failure in report.failures[:5]:
        echo(f"  failed: {failure}")
    for spiffe_id, count in report.ingress_verified.items():
        echo(f"east ingress verified client {spiffe_id} ({count} connections)")
    for spiffe_id, count in report.egress_verified.items():
        echo(f"west egress verified server {spiffe_id} ({count} connections)")
    echo(f"rogue.mesh (not trusted by east) refused at the handshake: {'yes' if report.rogue_refused else 'NO'}")
    echo(f"result: {'OK' if report.ok else 'FAILED'}")


def _fmt(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"
