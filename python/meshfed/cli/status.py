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

from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from meshfed.cli.common import DIR_ENVVAR, ExitCode, Output, OutputOption, emit
from meshfed.errors import MeshfedError
from meshfed.zone import READ_TOKEN_FILE

API_URL_FILE = "api-url"
"""Where ``meshfed up`` records its API's URL in the zone directory (removed when it stops)."""


ApiOption = Annotated[
    str | None,
    typer.Option(
        "--api",
        envvar="MESHFED_API",
        help="The zone's API URL; default: the address its 'meshfed up' recorded in the zone directory.",
    ),
]
TokenFileOption = Annotated[
    Path | None,
    typer.Option(
        "--token-file", envvar="MESHFED_TOKEN_FILE", help="A token of the zone; default: read-token in --dir."
    ),
]
DirOption = Annotated[
    Path | None,
    typer.Option(
        "--dir", envvar=DIR_ENVVAR, show_envvar=True, help="The zone directory (made by 'meshfed zone init')."
    ),
]
CaOption = Annotated[
    Path | None, typer.Option("--api-ca", help="CA certificate (PEM) that signed the API's TLS certificate.")
]


def _ask(
    directory: Path | None, api: str | None, token_file: Path | None, ca: Path | None, path: str, **params: Any
) -> Any:
    """GET ``path`` from the zone's API; a one-line MeshfedError when it cannot be asked."""
    if api is None:
        if directory is None:
            raise MeshfedError("give the zone with --dir DIR (or MESHFED_DIR), or its API with --api URL")
        recorded = directory / API_URL_FILE
        if not recorded.exists():
            raise MeshfedError(
                f"zone in {directory} is not running (no {API_URL_FILE}): start it with "
                f"'meshfed up --dir {directory}', or give --api URL for a zone elsewhere"
            )
        api = recorded.read_text().strip()
    if token_file is None:
        if directory is None:
            raise MeshfedError("give --token-file (a token of the zone) with --api, or --dir for its read-token")
        token_file = directory / READ_TOKEN_FILE
    try:
        token = token_file.read_text().strip()
    except OSError as err:
        raise MeshfedError(f"cannot read the token {token_file}: {err.strerror or err}") from None
    verify: Any = str(ca) if ca is not None else True
    try:
        response = httpx.get(
            f"{api.rstrip('/')}{path}",
            params={k: v for k, v in params.items() if v is not None},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
            verify=verify,
        )
    except httpx.HTTPError as err:
        raise MeshfedError(
            f"cannot reach the zone's API at {api}: {err}; is 'meshfed up' running (and is {api} its --api-address)?"
        ) from None
    if response.status_code != 200:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise MeshfedError(f"the zone's API at {api} answered {response.status_code}: {detail}")
    return response.json()


def status(
    directory: DirOption = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
) -> None:
    """The running zone at a glance: identity, peerings, imports and where to reach them, problems.

    Exits 3 when something needs attention, so scripts and probes can use it.
    -o json prints what GET /v1/status returns.
    """
    report = _ask(directory, api, token_file, api_ca, "/v1/status")
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
    directory: DirOption = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Walk a service's path on this zone and name the first broken link, with what to do about it.

    Exits 3 when a link is broken. -o json prints what GET /v1/explain/NAMESPACE/SERVICE returns.
    """
    report = _ask(
        directory,
        api,
        token_file,
        api_ca,
        f"/v1/explain/{namespace}/{service}",
        peer=peer,
        **{"as": caller},
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
