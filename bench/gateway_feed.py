#!/usr/bin/env python3
"""What the gateway feed costs against the zone's size: bytes stored, time to publish and to apply.

Run from the repository root with the project's venv::

    .venv/bin/python bench/gateway_feed.py           # about half a minute
    .venv/bin/python bench/gateway_feed.py --quick   # 100 and 1,000 services only

For each size it builds a gateway config like a zone's (each service a terminate route
with an authorization rule, a cluster of 10 endpoints, and an import: an originate
listener and a cluster of a peer gateway), then measures, in this process:

- the document's size, and the feed's size as stored (header and zlib level 6), and how
  many objects of each store it takes (a Secret holds 1 MiB of data, a Consul value 512 KiB
  by default; a feed takes at most ``MAX_PARTS``);
- publish: ``GatewayConfig.to_json`` plus the feed's encoding (the leader's CPU per
  publication, besides the store's write);
- apply: the feed's decoding and checks plus the Rust core's compile and start of the
  config (what a replica spends per publication it takes).

Timings are the median of 3 runs. The configs are synthetic, their names and addresses
random (seeded) so as to be as irregular as a real zone's; a real zone's may compress a
little better.
Prints a Markdown table and writes it to ``bench/results/gateway_feed.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from meshfed.gateway.config import (
    AuthzRule,
    Cluster,
    Endpoint,
    GatewayConfig,
    Identity,
    OriginateListener,
    Route,
    TerminateListener,
    UpstreamTls,
)
from meshfed.gateway.handle import Gateway
from meshfed.replica.gateway_feed import MAX_PARTS, FeedHeader, decode_feed, encode_feed
from meshfed.zone import Zone

SECRET_LARGEST = 1_000_000  # meshfed.replica.stores.SecretStore.largest
KV_LARGEST = 512 * 1024  # meshfed.replica.stores.KvStore.largest
RESULTS = Path(__file__).resolve().parent / "results" / "gateway_feed.md"


def zone_config(services: int, east: Zone, west: Zone) -> GatewayConfig:
    routes, clusters, listeners = [], [], []
    # Names and addresses as irregular as a real zone's, the same every run (not for secrets).
    rng = random.Random(services)  # noqa: S311
    words = ["api", "web", "cart", "auth", "search", "billing", "orders", "users", "media", "queue"]
    for n in range(services):
        name = f"{rng.choice(words)}-{rng.getrandbits(24):06x}-{n}"  # unique
        routes.append(
            Route(
                sni=f"{name}.default.east.mesh",
                cluster=f"local/{name}",
                rules=[AuthzRule(action="allow", id=f"spiffe://west.mesh/ns/default/sa/client-{n % 97}")],
            )
        )
        endpoints = [
            Endpoint(address=f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}:{port}")
            for port in [rng.choice((80, 8080, 8443, 9000))] * 10
        ]
        clusters.append(Cluster(name=f"local/{name}", endpoints=endpoints))
        # An import of the same size: west's service reached through west's gateway.
        tls = UpstreamTls(sni=f"{name}.default.west.mesh", peer_spiffe_id="spiffe://west.mesh/meshfed/gateway")
        clusters.append(Cluster(name=f"import/{name}", endpoints=[Endpoint(address="127.0.0.1:9")], tls=tls))
        listeners.append(OriginateListener(name=f"egress/{name}", address="127.0.0.1:0", cluster=f"import/{name}"))
    ingress = TerminateListener(name="ingress", address="127.0.0.1:0", routes=routes)
    svid = east.authority.issue_svid(east.trust_domain.gateway_id, dt.timedelta(hours=1))
    identity = Identity(cert_chain_pem=svid.cert_chain_pem().decode(), private_key_pem=svid.private_key_pem().decode())
    bundles = {str(zone.trust_domain): zone.trust.own_bundle().to_pem().decode() for zone in (east, west)}
    return GatewayConfig(
        identity=identity,
        trust_bundles=bundles,
        listeners=[ingress, *listeners[: min(services, 2000)]],
        clusters=clusters,
    )


def median_seconds(action: object, runs: int = 3) -> float:
    taken = []
    for _ in range(runs):
        started = time.perf_counter()
        action()  # type: ignore[operator]
        taken.append(time.perf_counter() - started)
    return statistics.median(taken)


def measure(services: int, east: Zone, west: Zone) -> dict[str, object]:
    config = zone_config(services, east, west)
    document = config.to_json()
    header = FeedHeader(
        zone="east",
        trust_domain="east.mesh",
        writer="east-0",
        generation=1,
        written_at=dt.datetime.now(dt.UTC).isoformat(),
        size=len(document),
        digest=hashlib.sha256(document).hexdigest(),
    )
    in_secrets = encode_feed(header, document, largest=SECRET_LARGEST)
    in_kv = encode_feed(header, document, largest=KV_LARGEST)
    publish = median_seconds(lambda: encode_feed(header, config.to_json(), largest=SECRET_LARGEST))

    def apply() -> None:
        first, *parts = in_secrets
        _, decoded = decode_feed(first, "bench", largest=SECRET_LARGEST, parts=parts)
        Gateway(decoded).close()

    return {
        "services": services,
        "document": len(document),
        "stored": sum(len(part) for part in in_secrets),
        "secrets": len(in_secrets),
        "kv": len(in_kv),
        "publish": publish,
        "apply": median_seconds(apply),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 services only")
    args = parser.parse_args()
    sizes = [100, 1_000] if args.quick else [100, 1_000, 3_000, 10_000, 30_000]
    with tempfile.TemporaryDirectory() as directory:
        east = Zone.init(Path(directory) / "east", "east", "east.mesh")
        west = Zone.init(Path(directory) / "west", "west", "west.mesh")
        rows = [measure(size, east, west) for size in sizes]
    lines = [
        "# The gateway feed: bytes stored and time to publish and to apply, against the zone's size",
        "",
        f"`bench/gateway_feed.py{' --quick' if args.quick else ''}` on "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}; median of 3 runs per timing. Each service: a terminate route with an "
        "authorization rule and a cluster of 10 endpoints, plus an import (a cluster of a peer gateway, and an "
        "originate listener for the first 2,000); names and endpoint addresses random (seeded).",
        "",
        f"| services | config document | feed as stored | Secrets it takes (1 MB each, {MAX_PARTS} at most) "
        f"| Consul KV values it takes (512 KiB each, {MAX_PARTS} at most) "
        "| publish (to_json + encode) | apply on a replica (decode + compile + start) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['services']:,} | {int(str(row['document'])) / 1024:,.0f} KiB | "
            f"{int(str(row['stored'])) / 1024:,.0f} KiB | {row['secrets']} | {row['kv']} | "
            f"{float(str(row['publish'])) * 1000:,.0f} ms | {float(str(row['apply'])) * 1000:,.0f} ms |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
