#!/usr/bin/env python3
"""Trust benchmarks of issue #3: SVID issuance, 100-root bundle parsing, rotation propagation.

Run from the repository root with the project's venv::

    .venv/bin/python bench/trust.py            # about 1-2 minutes
    .venv/bin/python bench/trust.py --quick    # about 30 seconds

Prints a Markdown table and writes it to ``bench/results/trust.md``. Loopback
only; every zone lives in a temporary directory that is removed afterwards.

"The peer trusts the new root" is measured on the peer gateway's *running*
config: the bench wraps the controller's ``Gateway`` handle so that every
``apply()`` records the config handed to the Rust data plane, and the clock
stops when that config's ``trust_bundles[<trust domain>]`` holds the new
root's PEM (the pool the gateway verifies that domain's SVIDs against).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "python"))


import meshfed.controller as controller_module  # noqa: E402
from meshfed.controller import ControllerSettings  # noqa: E402
from meshfed.federation.settings import PeeringSettings  # noqa: E402
from meshfed.gateway import Gateway, GatewayConfig  # noqa: E402
from meshfed.runtime import ZoneRuntime, ZoneSettings, assemble_zone  # noqa: E402
from meshfed.trust.bundle import TrustBundle, parse_bundle  # noqa: E402
from meshfed.trust.ca import create_authority  # noqa: E402
from meshfed.trust.endpoint import endpoint_spiffe_id  # noqa: E402
from meshfed.trust.spiffe import TrustDomain  # noqa: E402
from meshfed.zone import Zone  # noqa: E402
from meshfed.zone.bundle_poller import BundlePoller  # noqa: E402

RESULTS = REPO / "bench" / "results" / "trust.md"
ROTATION_OVERLAP = dt.timedelta(hours=1)  # the old CA keeps signing: only the bundle changes during the measurement


class RecordingGateway(Gateway):
    """The controller's gateway handle, remembering the last config applied to the data plane."""

    def __init__(self, config: GatewayConfig | bytes) -> None:
        super().__init__(config)
        self.running: GatewayConfig | bytes = config

    def apply(self, config: GatewayConfig | bytes) -> None:
        super().apply(config)
        self.running = config


controller_module.Gateway = RecordingGateway  # type: ignore[attr-defined]


def running_config(runtime: ZoneRuntime) -> GatewayConfig:
    gateway = runtime.controller.gateway
    assert isinstance(gateway, RecordingGateway)
    config = gateway.running
    assert isinstance(config, GatewayConfig)
    return config


@dataclass
class Row:
    what: str
    value: str
    detail: str


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float], scale: float = 1.0, unit: str = "") -> str:
    return f"n={len(values)}, min {min(values) * scale:.0f}{unit}, max {max(values) * scale:.0f}{unit}"


# -- SVID issuance ----------------------------------------------------------------------------------------------


def svid_issuance(root: Path, window: float, repetitions: int) -> list[Row]:
    zone = Zone.init(root / "issuer", "issuer", "issuer.mesh")
    spiffe_id = zone.trust_domain.workload("default", "bench")
    ttl = dt.timedelta(hours=1)
    authority = zone.authority.signing_ca()

    def rate(issue: Callable[[], object]) -> float:
        count, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < window:
            issue()
            count += 1
        return count / elapsed

    through_zone = [rate(lambda: zone.authority.issue_svid(spiffe_id, ttl)) for _ in range(repetitions)]
    direct = [rate(lambda: authority.issue(spiffe_id, ttl)) for _ in range(repetitions)]
    return [
        Row(
            "SVID issuance, `Zone.authority.issue_svid`",
            f"{median(through_zone):.0f} /s",
            f"one thread; borrows state.db, signs with the CA read from disk once, records the TTL; "
            f"{repetitions} x {window:g} s windows, {spread(through_zone, unit='/s')}",
        ),
        Row(
            "SVID issuance, `CertificateAuthority.issue` (CA held in memory)",
            f"{median(direct):.0f} /s",
            f"key generation + signing only; {spread(direct, unit='/s')}",
        ),
    ]


# -- bundle parse + verify ----------------------------------------------------------------------------------------


def bundle_parsing(repetitions: int) -> list[Row]:
    trust_domain = TrustDomain("big.mesh")
    roots = tuple(create_authority(trust_domain, generation).authority.root for generation in range(100))
    document = TrustBundle(trust_domain, roots, sequence=7).to_spiffe_json()
    timings: list[float] = []
    for _ in range(repetitions):
        started = time.perf_counter()
        bundle = parse_bundle(trust_domain, document)
        timings.append(time.perf_counter() - started)
        assert len(bundle.roots) == 100
    return [
        Row(
            "SPIFFE bundle parse + verify, 100 roots",
            f"{median(timings) * 1000:.1f} ms",
            f"`parse_bundle` on a {len(document) / 1024:.0f} KiB JWK set: JSON, base64, DER, "
            f"CA check and self-signature check of every root; {spread(timings, 1000, ' ms')}",
        )
    ]


# -- rotation -> peer gateway trusts the new root -----------------------------------------------------------------


def loopback_settings(bundle_endpoint: bool = False) -> ZoneSettings:
    return ZoneSettings(
        controller=ControllerSettings(gateway_address="127.0.0.1:0", egress_port_base=0),
        peering=PeeringSettings(listen_address="127.0.0.1:0", establish_address="127.0.0.1:0"),
        bundle_endpoint_port=0 if bundle_endpoint else None,
    )


async def wait_for(check: Callable[[], bool], what: str, timeout: float, step: float = 0.01) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(step)
    return time.monotonic() - started


def new_root_pem(zone: Zone) -> str:
    published = next(g for g in zone.authority.generations() if g.state == "published")
    return (zone.directory / published.directory / "root.pem").read_text()


def trusts(runtime: ZoneRuntime, trust_domain: TrustDomain, pem: str) -> bool:
    pool = running_config(runtime).trust_bundles.get(trust_domain.name, "")
    return pem.strip() in pool


async def rotate_and_wait(source: ZoneRuntime, peer: ZoneRuntime, timeout: float, settle: float) -> float:
    """Rotate ``source``'s CA; seconds until ``peer``'s running gateway config trusts the new root.

    The rotation happens at a random moment after ``settle`` seconds, so it falls at a random phase of the
    peer's poll (or of the peering service's store poll) instead of always just after one.
    """
    await asyncio.sleep(settle + random.uniform(0.0, settle))  # noqa: S311 -- a phase, not a secret
    started = time.monotonic()
    await asyncio.to_thread(source.zone.authority.rotate, ROTATION_OVERLAP)
    pem = await asyncio.to_thread(new_root_pem, source.zone)
    await wait_for(lambda: trusts(peer, source.zone.trust_domain, pem), "the peer to trust the new root", timeout)
    return time.monotonic() - started


async def rotation_via_poll(root: Path, poll_interval: float, timeout: float) -> float:
    source_zone = Zone.init(root / "src", "src", "src.mesh")
    peer_zone = Zone.init(root / "dst", "dst", "dst.mesh")
    source = assemble_zone(source_zone, loopback_settings(bundle_endpoint=True))
    peer = assemble_zone(peer_zone, loopback_settings())
    # The assembled poller follows the bundle's refresh hint (300 s); this one polls at the bench's interval.
    peer.controller.add_service(
        BundlePoller(peer_zone, peer.controller.reconfigure, interval=dt.timedelta(seconds=poll_interval))
    )
    await source.controller.start()
    try:
        assert source.bundle_endpoint is not None
        _, port = source.bundle_endpoint.address
        peer_zone.trust.federate(
            source_zone.trust_domain,
            f"https://127.0.0.1:{port}/",
            "https_spiffe",
            endpoint_spiffe_id=endpoint_spiffe_id(source_zone.trust_domain),
            bootstrap_bundle=source_zone.trust.own_bundle(),
        )
        await peer.controller.start()
        try:
            own = source_zone.trust.own_bundle().to_pem().decode()
            await wait_for(lambda: trusts(peer, source_zone.trust_domain, own), "the bootstrap bundle", timeout)
            return await rotate_and_wait(source, peer, timeout, settle=poll_interval * 1.5)
        finally:
            await peer.controller.stop()
    finally:
        await source.controller.stop()


async def rotation_via_stream(root: Path, timeout: float) -> float:
    source_zone = Zone.init(root / "src", "src", "src.mesh")
    peer_zone = Zone.init(root / "dst", "dst", "dst.mesh")
    source = assemble_zone(source_zone, loopback_settings())
    peer = assemble_zone(peer_zone, loopback_settings())
    await source.controller.start()
    await peer.controller.start()
    try:
        await peer.peering.establish(source.peering.issue_token("dst").encoded, "src")
        await wait_for(lambda: peer.peering.peer("src").state == "ACTIVE", "the peering to be ACTIVE", timeout)
        own = source_zone.trust.own_bundle().to_pem().decode()
        await wait_for(lambda: trusts(peer, source_zone.trust_domain, own), "the peering's bundle", timeout)
        return await rotate_and_wait(source, peer, timeout, settle=1.5)
    finally:
        await peer.controller.stop()
        await source.controller.stop()


def rotation_rows(root: Path, repetitions: int, poll_interval: float) -> list[Row]:
    timeout = 30.0
    by_poll: list[float] = []
    by_stream: list[float] = []
    for repetition in range(repetitions):
        by_poll.append(asyncio.run(rotation_via_poll(root / f"poll-{repetition}", poll_interval, timeout)))
        by_stream.append(asyncio.run(rotation_via_stream(root / f"stream-{repetition}", timeout)))
    return [
        Row(
            f"`rotate` → peer gateway trusts new root, bundle endpoint poll every {poll_interval:g} s",
            f"{median(by_poll) * 1000:.0f} ms",
            "https_spiffe endpoint, `BundlePoller(interval=...)`, no peering; expect about half the interval "
            f"plus fetch + apply; {spread(by_poll, 1000, ' ms')}",
        ),
        Row(
            "`rotate` → peer gateway trusts new root, peering stream",
            f"{median(by_stream) * 1000:.0f} ms",
            "the peering service notices its own bundle's new sequence at its store poll (every 1 s) and "
            f"sends it on the stream; {spread(by_stream, 1000, ' ms')}",
        ),
    ]


# -- report -------------------------------------------------------------------------------------------------------


def render(rows: list[Row], args: argparse.Namespace, elapsed: float) -> str:
    load = os.getloadavg()
    lines = [
        "# meshfed trust benchmarks (issue #3)",
        "",
        f"`bench/trust.py{' --quick' if args.quick else ''}` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} CPUs, load average {load[0]:.2f} at the end, {elapsed:.0f} s in all. "
        "Each value is the median of the repetitions shown; absolute times on a small shared machine, "
        "compare them only within one run.",
        "",
        "| measurement | median | how |",
        "|---|---|---|",
        *(f"| {row.what} | {row.value} | {row.detail} |" for row in rows),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer and shorter repetitions (about 30 s)")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="bundle poll interval, seconds")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the Markdown table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    repetitions = 3 if args.quick else 5
    started = time.monotonic()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="meshfed-bench-trust-") as tmp:
        root = Path(tmp)
        rows += svid_issuance(root, window=1.0 if args.quick else 3.0, repetitions=3)
        rows += bundle_parsing(repetitions=5 if args.quick else 20)
        rows += rotation_rows(root, repetitions, args.poll_interval)
    table = render(rows, args, time.monotonic() - started)
    print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(table)
    print(f"written to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
