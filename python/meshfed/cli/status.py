"""``meshfed status`` and ``meshfed explain``: ask the running zone, through its API, what it sees.

A zone's files say what was configured; only the running process knows
whether a peering is connected, which address an import is bound at, or what
its health checks found. So these commands talk to the zone's API: the address
``meshfed up`` recorded in the zone directory (``api-url``), or ``--api URL``
for a zone elsewhere, with the zone's read token.

Exit codes (``ExitCode`` in ``meshfed.cli.common``): 0 all is well; 3
something needs attention (a problem in ``status``, a broken link in
``explain``); 1 the zone could not be asked (one line says why); 2 a usage error.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from meshfed.cli.common import ExitCode, OptionalZoneDir, Output, OutputOption, emit
from meshfed.cli.remote import ApiOption, CaOption, TokenFileOption, require_api


def status(
    directory: OptionalZoneDir = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
) -> None:
    """The running zone at a glance: identity, peerings, imports and where to reach them, problems.

    Exits 3 when something needs attention, so scripts and probes can use it.
    -o json prints what GET /v1/status returns.
    """
    report = require_api(directory, api, token_file, api_ca).get("/v1/status")
    emit(report, output, table=lambda: _print_status(report))
    if not report["healthy"]:
        raise typer.Exit(ExitCode.NEEDS_ATTENTION)


def explain(
    service: Annotated[str, typer.Argument(help="The service's name.")],
    namespace: Annotated[str, typer.Option(help="Its namespace.")] = "default",
    peer: Annotated[str | None, typer.Option(help="Only towards (exporter) or from (importer) this peer.")] = None,
    caller: Annotated[
        str | None, typer.Option("--as", help="Also explain whether this SPIFFE ID may call it (exporter side).")
    ] = None,
    directory: OptionalZoneDir = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Walk a service's path on this zone and name the first broken link, with what to do about it.

    Exits 3 when a link is broken. -o json prints what GET /v1/explain/NAMESPACE/SERVICE returns.
    """
    report = require_api(directory, api, token_file, api_ca).get(
        f"/v1/explain/{namespace}/{service}", peer=peer, **{"as": caller}
    )
    emit(report, output, table=lambda: _print_explanation(report))
    if report["broken"] is not None:
        raise typer.Exit(ExitCode.NEEDS_ATTENTION)


def _print_status(report: dict[str, Any]) -> None:
    problems = report["problems"]
    verdict = "healthy" if report["healthy"] else f"{len(problems)} problem(s)"
    typer.echo(f"zone {report['zone']} ({report['trust_domain']}): {verdict}")
    typer.echo(f"  gateway SVID expires {report['gateway_svid_expires_at']}")
    typer.echo(
        f"  catalog: {report['catalog_mode']}"
        + (f", error: {report['catalog_error']}" if report["catalog_error"] else "")
    )
    for generation in report["ca_generations"]:
        typer.echo(f"  CA generation {generation['generation']}: {generation['state']}")
    typer.echo("peerings:" if report["peerings"] else "peerings: none")
    for p in report["peerings"]:
        age = p["heartbeat_age_seconds"]
        heartbeat = f"heartbeat {age:.1f}s ago" if age is not None else "no heartbeat yet"
        line = (
            f"  {p['name']}\t{p['state']}\t{'connected' if p['connected'] else 'not connected'}\t{heartbeat}\t"
            f"lag {p['propagation_lag_seconds']:.1f}s\texported {p['exported_services']}\t"
            f"imported {p['imported_services']}"
        )
        typer.echo(line + (f"\t{p['problem']}" if p["problem"] else ""))
    typer.echo("imports (where local clients connect):" if report["imports"] else "imports: none")
    for item in report["imports"]:
        addresses = " ".join(f"{port}={address}" for port, address in item["local_addresses"].items()) or "not bound"
        typer.echo(
            f"  {item['name']}\t{addresses}\t{item['healthy_endpoints']}/{item['total_endpoints']} healthy at "
            f"{item['peer']}\tworkload TLS {item['workload_tls']}"
        )
    for group in report["failover_groups"]:
        addresses = " ".join(f"{port}={address}" for port, address in group["local_addresses"].items()) or "not bound"
        typer.echo(f"  failover {group['name']}\t{addresses}\t{' -> '.join(group['sources'])}")
    if problems:
        typer.echo("problems:")
        for problem in problems:
            typer.echo(f"  - {problem}")


def _print_explanation(report: dict[str, Any]) -> None:
    typer.echo(f"{report['service']}.{report['namespace']} on zone {report['zone']} ({report['role']})")
    for step in report["steps"]:
        typer.echo(f"  {'ok    ' if step['ok'] else 'BROKEN'} {step['step']}: {step['detail']}")
        if step["fix"]:
            typer.echo(f"         fix: {step['fix']}")
    broken = report["broken"]
    typer.echo(f"first broken link: {broken['step']}" if broken else "every link is ok")
