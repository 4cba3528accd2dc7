"""``meshfed trust``: SVIDs and trust bundles.

``list``, ``import``, ``federate``, ``remove`` and ``rotate`` work through the
zone's API when it runs (or ``--api``), else on its files
(:mod:`meshfed.cli.remote`). ``issue`` and ``export`` read the zone's CA and
bundle from its directory, and a rotation that needs a root key file runs on
the zone's host: root keys never travel to the API.
"""

from __future__ import annotations

import datetime as dt
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from meshfed import audit
from meshfed.cli.common import OptionalZoneDir, Output, OutputOption, ZoneDir, emit, parse_duration
from meshfed.cli.remote import ApiOption, CaOption, Target, TokenFileOption, ZoneApi, target
from meshfed.errors import RotationError
from meshfed.federation.trust_removal import remove_trust
from meshfed.trust.bundle import parse_bundle
from meshfed.trust.spiffe import SpiffeId, TrustDomain
from meshfed.zone import Zone, load_root_key, write_private_file
from meshfed.zone.trust_listing import (
    federation_added,
    imported_bundle,
    removed_trust,
    rotation_ended,
    rotation_started,
    trust_listing,
)

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
    output: OutputOption = Output.table,
) -> None:
    """Issue an X.509-SVID from the zone's CA.

    -o json prints the SVID's SPIFFE ID, its validity and the files written (never the key itself).
    """
    lifetime = parse_duration(ttl)
    svid = _open(directory).authority.issue_svid(SpiffeId.parse(spiffe_id), lifetime)
    write_private_file(key_out, svid.private_key_pem())
    out.write_bytes(svid.cert_chain_pem())
    issued = {
        "spiffe_id": str(svid.spiffe_id),
        "not_before": svid.leaf.not_valid_before_utc.isoformat(),
        "not_after": svid.leaf.not_valid_after_utc.isoformat(),
        "certificate_file": str(out),
        "key_file": str(key_out),
    }
    line = f"issued {svid.spiffe_id}, valid until {svid.leaf.not_valid_after_utc.isoformat()}"
    emit(issued, output, table=lambda: typer.echo(line, err=True))


@trust_app.command("export")
def export(
    directory: ZoneDir,
    bundle_format: Annotated[
        BundleFormat, typer.Option("--format", help="spiffe (bundle JSON) or pem (roots only).")
    ] = BundleFormat.spiffe,
) -> None:
    """Print the zone's own trust bundle."""
    bundle = _open(directory).trust.own_bundle()
    sys.stdout.buffer.write(bundle.to_spiffe_json() if bundle_format is BundleFormat.spiffe else bundle.to_pem())


@trust_app.command("import")
def import_(
    file: Annotated[str, typer.Argument(help="Bundle file (SPIFFE JSON or PEM roots), or '-' for stdin.")],
    trust_domain: Annotated[str, typer.Option(help="The trust domain the bundle belongs to.")],
    directory: OptionalZoneDir = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Trust another trust domain's bundle (replaces an earlier bundle of that domain).

    -o json prints what PUT /v1/trust/bundles/{trust_domain} returns: trust_domain, sequence, roots.
    """
    domain = TrustDomain.parse(trust_domain)
    data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    bundle = parse_bundle(domain, data)  # refused here, in one line, before anything is sent
    where = target(directory, api, token_file, api_ca, change=True)
    if where.api is not None:
        imported = where.api.put(f"/v1/trust/bundles/{domain.name}", data, "application/json")
    else:
        zone = _open(where)
        zone.trust.import_bundle(bundle)
        audit.record(
            zone.directory, actor=audit.cli_actor(), action="trust.import", target=domain.name, sequence=bundle.sequence
        )
        imported = imported_bundle(bundle)
    line = f"trusting {domain}: {len(imported['roots'])} root(s), sequence {imported['sequence']}"
    emit(imported, output, table=lambda: typer.echo(line))


class Profile(StrEnum):
    https_web = "https_web"
    https_spiffe = "https_spiffe"


@trust_app.command("list")
def list_(
    directory: OptionalZoneDir = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
    as_json: Annotated[bool, typer.Option("--json", help="The same as -o json.")] = False,
) -> None:
    """Every trusted trust domain: sequence, roots (fingerprint, expiry), last refresh, source.

    -o json prints what GET /v1/trust/bundles returns: trust_domains (each with its roots) and rotation.
    """
    where = target(directory, api, token_file, api_ca, change=False)
    listing: dict[str, Any] = (
        where.api.get("/v1/trust/bundles")
        if where.api is not None
        else trust_listing(_open(where), dt.datetime.now(dt.UTC))
    )
    emit(listing, Output.json if as_json else output, table=lambda: _print_listing(listing))


def _print_listing(listing: dict[str, Any]) -> None:
    for domain in listing["trust_domains"]:
        refreshed = domain["last_refresh"] or "never"
        typer.echo(
            f"{domain['trust_domain']}  source {domain['source']}  sequence {domain['sequence']}  "
            f"refresh hint {domain['refresh_hint_seconds']}s  last refresh {refreshed}"
        )
        for root in domain["roots"]:
            flag = "  EXPIRED (verifies nothing)" if root["expired"] else ""
            typer.echo(f"  root sha256:{root['fingerprint']}  expires {root['not_after']}{flag}")
        if domain.get("endpoint"):
            typer.echo(f"  endpoint {domain['endpoint']} ({domain['profile']})")
        if domain.get("last_error"):
            typer.echo(f"  last poll failed: {domain['last_error']}")
    for generation in listing["rotation"]:
        typer.echo(f"CA generation {generation['generation']}: {generation['phase']}")


@trust_app.command("rotate")
def rotate(
    overlap: Annotated[
        str | None,
        typer.Option(
            help="How long the old CA keeps signing while peers fetch the new root (default 3x refresh hint; "
            "none with --root-key, as the root stays)."
        ),
    ] = None,
    finish: Annotated[
        bool,
        typer.Option(
            "--finish",
            help="End the rotation in progress now: the new CA signs at once and the old root leaves the bundle "
            "(after a key compromise; consumers that lack the new root cannot verify this zone until they fetch it).",
        ),
    ] = False,
    abort: Annotated[
        bool, typer.Option("--abort", help="Drop the new CA of the rotation in progress before it signs.")
    ] = False,
    root_key: Annotated[
        Path | None,
        typer.Option(
            help="The root's private key, for a zone that keeps it offline: makes a new intermediate under the "
            "same root (the bundle does not change)."
        ),
    ] = None,
    offline_root_key: Annotated[
        Path | None,
        typer.Option(help="Rotate to a new root whose private key is written to this new file, not the zone."),
    ] = None,
    directory: OptionalZoneDir = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Start a CA rotation: publish a new root now, switch signing after the overlap, retire the old root later.

    -o json prints what POST /v1/trust/rotate answers: the new generation, its root and when it signs; or,
    with --finish or --abort, the bundle's sequence and each phase change.
    """
    if finish and abort:
        raise RotationError("--finish/--abort: give one (finish the rotation in progress now, or drop its new CA)")
    if (finish or abort) and (overlap is not None or root_key is not None or offline_root_key is not None):
        raise RotationError("--finish and --abort end the rotation in progress; they take no --overlap or root key")
    lapse = parse_duration(overlap, "--overlap") if overlap is not None else None
    # A root key file stays on this host: such a rotation works on the zone's files, even while it runs.
    where = target(directory, api, token_file, api_ca, change=True)
    if where.api is not None and root_key is None and offline_root_key is None:
        _rotate_through(where.api, lapse, output, finish=finish, abort=abort)
        return
    if where.directory is None:
        raise RotationError(
            "--root-key and --offline-root-key rotate on the zone's host, never through its API: give --dir"
        )
    zone = _open(where)
    if finish or abort:
        steps = zone.authority.finish() if finish else zone.authority.abort()
        sequence = zone.trust.own_bundle().sequence
        audit.record(
            zone.directory,
            actor=audit.cli_actor(),
            action="trust.rotate.finish" if finish else "trust.rotate.abort",
            target=str(zone.trust_domain),
            bundle_sequence=sequence,
        )
        _emit_ended(rotation_ended(sequence, steps), output)
        return
    generation = zone.authority.rotate(
        lapse,
        root_key=load_root_key(root_key) if root_key is not None else None,
        offline_root_key=offline_root_key,
    )
    audit.record(
        zone.directory,
        actor=audit.cli_actor(),
        action="trust.rotate",
        target=str(zone.trust_domain),
        generation=generation.generation,
    )
    bundle = zone.trust.own_bundle()
    what = "new intermediate under the current root" if root_key is not None else "new root"
    line = (
        f"{what} (root sha256:{generation.root_fingerprint}) published (bundle sequence {bundle.sequence}); "
        f"it signs from {generation.activate_at:%Y-%m-%d %H:%M:%S}Z"
    )
    emit(rotation_started(generation), output, table=lambda: typer.echo(line))
    if offline_root_key is not None:
        typer.echo(f"the new root's key is in {offline_root_key}: keep it offline", err=True)


def _rotate_through(api: ZoneApi, overlap: dt.timedelta | None, output: Output, *, finish: bool, abort: bool) -> None:
    if finish or abort:
        _emit_ended(api.post("/v1/trust/rotate", {"finish": finish, "abort": abort}), output)
        return
    seconds = int(overlap.total_seconds()) if overlap is not None else None
    started = api.post("/v1/trust/rotate", {"overlap_seconds": seconds})
    line = (
        f"new root (root sha256:{started['root_fingerprint']}) published; CA generation {started['generation']} "
        f"signs from {started['activate_at']}"
    )
    emit(started, output, table=lambda: typer.echo(line))


def _emit_ended(ended: dict[str, Any], output: Output) -> None:
    """A rotation finished or aborted (:func:`rotation_ended`), or a line per phase change for people."""

    def lines() -> None:
        for step in ended["steps"]:
            typer.echo(f"CA generation {step['generation']} {step['phase']}: {step['message']}")

    emit(ended, output, table=lines)


@trust_app.command("federate")
def federate(
    trust_domain: Annotated[str, typer.Option(help="The trust domain whose bundle the endpoint serves.")],
    endpoint: Annotated[str, typer.Option(help="The bundle endpoint URL (https://...).")],
    profile: Annotated[Profile, typer.Option(help="How the endpoint is authenticated.")],
    endpoint_spiffe_id: Annotated[
        str | None, typer.Option(help="https_spiffe: the SPIFFE ID the endpoint must present.")
    ] = None,
    bootstrap_bundle: Annotated[
        Path | None, typer.Option(help="https_spiffe: the trust domain's current bundle, obtained out of band.")
    ] = None,
    web_ca: Annotated[
        Path | None, typer.Option(help="https_web: PEM CA certificates to trust instead of the system's.")
    ] = None,
    directory: OptionalZoneDir = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Trust another trust domain through its bundle endpoint, polled at the bundle's refresh hint.

    -o json prints what POST /v1/trust/federations answers: the trust domain, endpoint and profile.
    """
    domain = TrustDomain.parse(trust_domain)
    bootstrap_data = bootstrap_bundle.read_bytes() if bootstrap_bundle is not None else None
    bootstrap = parse_bundle(domain, bootstrap_data) if bootstrap_data is not None else None
    where = target(directory, api, token_file, api_ca, change=True)
    if where.api is not None:
        answer = where.api.post(
            "/v1/trust/federations",
            {
                "trust_domain": domain.name,
                "endpoint_url": endpoint,
                "profile": profile.value,
                "endpoint_spiffe_id": endpoint_spiffe_id,
                "bootstrap_bundle": bootstrap_data.decode() if bootstrap_data is not None else None,
                "web_ca_pem": web_ca.read_text() if web_ca is not None else None,
            },
        )
        line = f"federating with {domain} via {endpoint} ({profile.value}); the running zone fetches it now"
        emit(answer, output, table=lambda: typer.echo(line))
        return
    zone = _open(where)
    zone.trust.federate(
        domain,
        endpoint,
        profile.value,
        endpoint_spiffe_id=SpiffeId.parse(endpoint_spiffe_id) if endpoint_spiffe_id else None,
        bootstrap_bundle=bootstrap,
        web_ca_pem=web_ca.read_text() if web_ca is not None else None,
    )
    audit.record(
        zone.directory, actor=audit.cli_actor(), action="trust.federate", target=domain.name, endpoint_url=endpoint
    )
    line = (
        f"federating with {domain} via {endpoint} ({profile.value}); a running zone fetches it within a second, "
        "then at the refresh hint"
    )
    emit(federation_added(domain.name, endpoint, profile.value), output, table=lambda: typer.echo(line))


@trust_app.command("remove")
def remove(
    trust_domain: Annotated[str, typer.Option(help="The trust domain to stop trusting.")],
    directory: OptionalZoneDir = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Stop trusting an imported or federated trust domain: its bundle and its federation go.

    A running zone's gateway stops trusting it at once. A peer's trust domain
    goes with its peering (meshfed peer delete). -o json prints what
    DELETE /v1/trust/bundles/{trust_domain} returns: trust_domain,
    bundle_removed, federation_removed.
    """
    domain = TrustDomain.parse(trust_domain)
    where = target(directory, api, token_file, api_ca, change=True)
    if where.api is not None:
        gone = where.api.delete(f"/v1/trust/bundles/{domain.name}")
    else:
        zone = _open(where)
        removed = remove_trust(zone, domain)
        audit.record(
            zone.directory,
            actor=audit.cli_actor(),
            action="trust.remove",
            target=domain.name,
            bundle=removed.bundle,
            federation=removed.federation,
        )
        gone = removed_trust(removed)
    parts = [
        part for part, key in (("its bundle", "bundle_removed"), ("its federation", "federation_removed")) if gone[key]
    ]
    line = f"no longer trusting {domain}: removed {' and '.join(parts)}"
    emit(gone, output, table=lambda: typer.echo(line))


def _open(where: Path | Target) -> Zone:
    # Every command moves a due rotation phase on, so a zone that is not running still rotates.
    zone = where.zone() if isinstance(where, Target) else Zone.open(where)
    for step in zone.authority.advance():
        typer.echo(f"CA generation {step.generation} {step.state}: {step.message}", err=True)
    return zone
