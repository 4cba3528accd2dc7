"""``meshfed trust``: SVIDs and trust bundles."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from meshfed.cli.common import ZoneDir, parse_duration
from meshfed.trust.bundle import parse_bundle
from meshfed.trust.spiffe import SpiffeId, TrustDomain
from meshfed.zone import Zone, write_private_file

trust_app = typer.Typer(help="Issue SVIDs and exchange trust bundles.", no_args_is_help=True)


class BundleFormat(StrEnum):
    spiffe = "spiffe"
    pem = "pem"


@trust_app.command("issue")
def issue(
    directory: ZoneDir,
    spiffe_id: Annotated[str, typer.Option(help="SPIFFE ID inside the zone's trust domain.")],
    out: Annotated[Path, typer.Option(help="Where to write the certificate chain (leaf, then intermediate).")],
    key_out: Annotated[Path, typer.Option(help="Where to write the private key (mode 0600).")],
    ttl: Annotated[str, typer.Option(help="Lifetime, such as 90s, 15m, 1h or 2d.")] = "24h",
) -> None:
    """Issue an X.509-SVID from the zone's CA."""
    lifetime = parse_duration(ttl)
    svid = Zone.open(directory).issue_svid(SpiffeId.parse(spiffe_id), lifetime)
    write_private_file(key_out, svid.private_key_pem())
    out.write_bytes(svid.cert_chain_pem())
    typer.echo(f"issued {svid.spiffe_id}, valid until {svid.leaf.not_valid_after_utc.isoformat()}", err=True)


@trust_app.command("export")
def export(
    directory: ZoneDir,
    bundle_format: Annotated[
        BundleFormat, typer.Option("--format", help="spiffe (bundle JSON) or pem (roots only).")
    ] = BundleFormat.spiffe,
) -> None:
    """Print the zone's own trust bundle."""
    bundle = Zone.open(directory).own_bundle()
    sys.stdout.buffer.write(bundle.to_spiffe_json() if bundle_format is BundleFormat.spiffe else bundle.to_pem())


@trust_app.command("import")
def import_(
    file: Annotated[str, typer.Argument(help="Bundle file (SPIFFE JSON or PEM roots), or '-' for stdin.")],
    directory: ZoneDir,
    trust_domain: Annotated[str, typer.Option(help="The trust domain the bundle belongs to.")],
) -> None:
    """Trust another trust domain's bundle (replaces an earlier bundle of that domain)."""
    zone = Zone.open(directory)
    domain = TrustDomain.parse(trust_domain)
    data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    bundle = parse_bundle(domain, data)
    zone.import_bundle(bundle)
    typer.echo(f"trusting {domain}: {len(bundle.roots)} root(s), sequence {bundle.sequence}")
