"""``meshfed export``: which local services each peer may see and call.

Each command works through the zone's API when it runs (or ``--api``), else on
its files (:mod:`meshfed.cli.remote`).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer

from meshfed import audit
from meshfed.catalog import CatalogSnapshot, open_catalog
from meshfed.catalog.embedded import EmbeddedCatalog
from meshfed.cli.common import OptionalZoneDir, Output, OutputOption, emit, print_table
from meshfed.cli.remote import ApiOption, CaOption, TokenFileOption, ZoneApi, target
from meshfed.errors import MeshfedError
from meshfed.federation.exports import ALL_PEERS, ExportRules
from meshfed.federation.peering_store import PeeringStore
from meshfed.zone import Zone

export_app = typer.Typer(help="Export local services to peers (nothing is exported by default).", no_args_is_help=True)

ServiceOption = Annotated[str, typer.Option("--service", help="Service name in the zone's catalog.")]
NamespaceOption = Annotated[str, typer.Option(help="Namespace of the service.")]
# How long `export add` waits for a Consul or Kubernetes catalog to say whether the service exists.
_REMOTE_CATALOG_CHECK_SECONDS = 3.0


@export_app.command("add")
def add(
    service: ServiceOption,
    to: Annotated[list[str], typer.Option("--to", help="Peering name, or '*' for every peer. Repeatable.")],
    namespace: NamespaceOption = "default",
    proxy_protocol: Annotated[
        bool | None,
        typer.Option(
            "--proxy-protocol/--no-proxy-protocol",
            help="Send the service's backends a PROXY v2 header naming the original caller's SPIFFE ID "
            "(TLV 0xE0) before the client's bytes. Default: leave as it is (off for a new export).",
        ),
    ] = None,
    directory: OptionalZoneDir = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Export a service to peers; a running zone applies it at once.

    -o json prints the same list as POST /v1/exports: the rules added, objects with service, namespace and
    peer. Notes (a service not in the catalog yet, a peering not established yet) go to stderr either way.
    """
    where = target(directory, api, token_file, api_ca, change=True)
    if where.api is not None:
        _add_through(where.api, service, namespace, to, proxy_protocol, output)
        return
    zone = where.zone()
    with ExportRules(zone.directory) as rules:
        added = rules.add(service, namespace, to, proxy_protocol=proxy_protocol)
    audit.record(
        zone.directory,
        actor=audit.cli_actor(),
        action="export.add",
        target=f"{service}.{namespace}",
        to=sorted({rule.peer for rule in added}),
    )
    _emit_added(
        service, namespace, [{"service": r.service, "namespace": r.namespace, "peer": r.peer} for r in added], output
    )
    if _in_catalog(zone, service, namespace) is False:
        typer.echo(
            f"note: zone {zone.name}'s {zone.config.catalog} catalog has no service {service}.{namespace} yet; "
            "the export applies once it is registered ('meshfed service list' shows what is there)",
            err=True,
        )
    with PeeringStore.of(zone) as peerings:
        known = {peering.name for peering in peerings.peerings()}
    for peer in sorted({rule.peer for rule in added} - known - {ALL_PEERS}):
        typer.echo(_no_such_peering(peer, service), err=True)


def _add_through(
    api: ZoneApi, service: str, namespace: str, to: list[str], proxy_protocol: bool | None, output: Output
) -> None:
    added = api.post(
        "/v1/exports", {"service": service, "namespace": namespace, "to": to, "proxy_protocol": proxy_protocol}
    )
    _emit_added(service, namespace, added, output)
    catalog = api.get("/v1/catalog")
    if not any(s["name"] == service and s["namespace"] == namespace for s in catalog["services"]):
        typer.echo(
            f"note: the zone's {catalog['source']['mode']} catalog has no service {service}.{namespace} yet; "
            "the export applies once it is registered ('meshfed service list' shows what is there)",
            err=True,
        )
    known = {peering["name"] for peering in api.get("/v1/peerings")}
    for peer in sorted({rule["peer"] for rule in added} - known - {ALL_PEERS}):
        typer.echo(_no_such_peering(peer, service), err=True)


def _emit_added(service: str, namespace: str, added: list[dict[str, str]], output: Output) -> None:
    """The rules `export add` made: the line people read, or the list POST /v1/exports returns."""
    line = f"exported {service}.{namespace} to {', '.join(r['peer'] for r in added)}"
    emit(added, output, table=lambda: typer.echo(line))


def _no_such_peering(peer: str, service: str) -> str:
    # An export names peerings; a trust domain federated by bundle only (SPIRE) is admitted by a rule.
    return (
        f"note: the zone has no peering named {peer!r} yet; the export applies once one is established. To "
        "admit workloads of a trust domain federated by bundle (SPIRE, another mesh), use "
        f"'meshfed authz add --service {service} --allow spiffe://<trust domain>/*'"
    )


def _in_catalog(zone: Zone, service: str, namespace: str) -> bool | None:
    """Whether the zone's catalog has the service now; None when the catalog cannot be read quickly."""
    if zone.config.catalog == "embedded":
        with EmbeddedCatalog(zone.directory) as catalog:
            return catalog.load().service(namespace, service) is not None

    async def read() -> CatalogSnapshot:
        source = open_catalog(zone)
        try:
            async with asyncio.timeout(_REMOTE_CATALOG_CHECK_SECONDS):
                return await source.snapshot()
        finally:
            await source.aclose()

    try:
        return asyncio.run(read()).service(namespace, service) is not None
    except (MeshfedError, TimeoutError):
        return None  # an unreachable Consul or API server must not stop an export rule


@export_app.command("remove")
def remove(
    service: ServiceOption,
    namespace: NamespaceOption = "default",
    to: Annotated[list[str] | None, typer.Option("--to", help="Only these peers (default: all rules).")] = None,
    directory: OptionalZoneDir = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Stop exporting a service (to some peers, or to all).

    -o json prints what DELETE /v1/exports/NAMESPACE/SERVICE answers: the service, the peers named (null:
    all) and how many rules went.
    """
    where = target(directory, api, token_file, api_ca, change=True)
    if where.api is not None:
        answer = where.api.delete(f"/v1/exports/{namespace}/{service}", to=to)
        _emit_removed(answer, output)
        return
    zone = where.zone()
    with ExportRules(zone.directory) as rules:
        removed = rules.remove(service, namespace, to)
    audit.record(
        zone.directory,
        actor=audit.cli_actor(),
        action="export.remove",
        target=f"{service}.{namespace}",
        to=sorted(to) if to else "*",
        removed=removed,
    )
    _emit_removed(
        {"service": service, "namespace": namespace, "to": sorted(to) if to else None, "removed": removed}, output
    )


def _emit_removed(removal: dict[str, Any], output: Output) -> None:
    """The removal as ExportRemovalView (what DELETE /v1/exports/... answers), or a line for people."""
    from meshfed.api.catalog import ExportRemovalView  # the API's models (and fastapi) only for this command

    view = ExportRemovalView.model_validate(removal)
    peers = f" to {', '.join(view.to)}" if view.to else ""
    emit(
        view,
        output,
        table=lambda: typer.echo(f"removed {view.removed} export rule(s) of {view.service}.{view.namespace}{peers}"),
    )


@export_app.command("list")
def list_exports(
    directory: OptionalZoneDir = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
) -> None:
    """List the export rules.

    -o json prints the same list as GET /v1/exports: objects with service, namespace and peer
    (a peering name, or '*' for every peer).
    """
    where = target(directory, api, token_file, api_ca, change=False)
    if where.api is not None:
        current: list[dict[str, str]] = where.api.get("/v1/exports")
    else:
        with ExportRules(where.zone().directory) as rules:
            current = [{"service": r.service, "namespace": r.namespace, "peer": r.peer} for r in rules.rules()]
    emit(
        current,
        output,
        table=lambda: print_table(
            "exports",
            ("service", "to"),
            ((f"{rule['service']}.{rule['namespace']}", rule["peer"]) for rule in current),
            width=120,
        ),
    )
