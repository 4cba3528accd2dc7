"""``meshfed service`` and ``meshfed catalog``: the zone's catalog.

``service register``/``deregister`` change the embedded catalog; a zone whose
catalog is Consul or Kubernetes refuses them (services are registered there,
with that platform's tools). ``service list`` and ``catalog list`` show what
``GET /v1/catalog`` does. Each works through the zone's API when it runs (or
``--api``); on a zone that does not run, on its files, reading the catalog
through the same source the controller uses, so a Consul or Kubernetes zone
shows what that server holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from meshfed import audit
from meshfed.catalog import CatalogSnapshot, open_catalog
from meshfed.catalog.embedded import EmbeddedCatalog
from meshfed.catalog.publisher import PublicationStatus, PublicationStore
from meshfed.catalog.registration import not_embedded, registration
from meshfed.cli.common import OptionalZoneDir, Output, OutputOption, emit, print_table
from meshfed.cli.remote import ApiOption, CaOption, TokenFileOption, target
from meshfed.errors import CatalogError
from meshfed.federation.exports import ExportRules
from meshfed.federation.failover import failover_groups, groups_of_listeners
from meshfed.federation.imports import ImportStore
from meshfed.runstate import RunState
from meshfed.zone import STATE_FILE, Zone

if TYPE_CHECKING:
    from meshfed.api.catalog import CatalogView

service_app = typer.Typer(help="Register services in the zone's embedded catalog.", no_args_is_help=True)
catalog_app = typer.Typer(help="Show the zone's catalog.", no_args_is_help=True)

_ENDPOINT_HELP = (
    "IP:PORT, optionally followed by ';key=value' settings: weight=N, healthy=false, region=R, zone=Z; "
    "any other key is a label (e.g. '10.0.0.5:8080;version=v2;weight=3'). Repeat for each endpoint."
)


@service_app.command("register")
def register(
    name: Annotated[str, typer.Option(help="Service name (a DNS label).")],
    port: Annotated[list[str], typer.Option(help="Named port NAME=NUMBER, e.g. http=8080. Repeatable.")],
    endpoint: Annotated[list[str], typer.Option(help=_ENDPOINT_HELP)],
    namespace: Annotated[str, typer.Option(help="Namespace of the service.")] = "default",
    label: Annotated[list[str] | None, typer.Option(help="Service label KEY=VALUE. Repeatable.")] = None,
    directory: OptionalZoneDir = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Add or replace a service and all its endpoints.

    -o json prints what POST /v1/services answers: the service and the catalog's version after the change.
    """
    labels = dict(map(_pair, label or []))
    if len(labels) != len(label or []):
        raise CatalogError("--label: a label key is given twice; give each key once")
    spec = registration(
        name=name,
        namespace=namespace,
        ports=[{"name": key, "port": _port_number(key, value)} for key, value in map(_pair, port)],
        labels=labels,
        endpoints=[_endpoint(text) for text in endpoint],
    )
    where = target(directory, api, token_file, api_ca, change=True)
    if where.api is not None:
        changed = where.api.post("/v1/services", spec.model_dump(mode="json"))
        _emit_change("registered", changed, output, f": {len(spec.endpoints)} endpoint(s)")
        return
    zone = where.zone()
    _require_embedded(zone, "register")
    service = spec.service(zone.name)
    with EmbeddedCatalog(zone.directory) as catalog:
        version = catalog.register(service)
    audit.record(
        zone.directory,
        actor=audit.cli_actor(),
        action="service.register",
        target=f"{service.name}.{service.namespace}",
        endpoints=len(service.endpoints),
        version=version,
    )
    answer = {"service": service.name, "namespace": service.namespace, "catalog_version": version}
    _emit_change("registered", answer, output, f": {len(service.endpoints)} endpoint(s)")


@service_app.command("deregister")
def deregister(
    name: Annotated[str, typer.Option(help="Service name.")],
    namespace: Annotated[str, typer.Option(help="Namespace of the service.")] = "default",
    directory: OptionalZoneDir = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Remove a service from the embedded catalog.

    -o json prints what DELETE /v1/services/NAMESPACE/NAME answers: the service and the catalog's version after.
    """
    where = target(directory, api, token_file, api_ca, change=True)
    if where.api is not None:
        _emit_change("deregistered", where.api.delete(f"/v1/services/{namespace}/{name}"), output)
        return
    zone = where.zone()
    _require_embedded(zone, "deregister")
    with EmbeddedCatalog(zone.directory) as catalog:
        version = catalog.deregister(namespace, name)
    audit.record(
        zone.directory,
        actor=audit.cli_actor(),
        action="service.deregister",
        target=f"{name}.{namespace}",
        version=version,
    )
    _emit_change("deregistered", {"service": name, "namespace": namespace, "catalog_version": version}, output)


def _emit_change(verb: str, change: dict[str, Any], output: Output, detail: str = "") -> None:
    """A catalog change as ServiceChangeView (what the API answers), or a line for people."""
    from meshfed.api.catalog import ServiceChangeView  # the API's models (and fastapi) only for this command

    view = ServiceChangeView.model_validate(change)
    line = f"{verb} {view.service}.{view.namespace}{detail}, version {view.catalog_version}"
    emit(view, output, table=lambda: typer.echo(line))


@service_app.command("list")
def list_services(
    directory: OptionalZoneDir = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
) -> None:
    """List the services in the zone's catalog (embedded, Consul or Kubernetes).

    -o json prints the same object as GET /v1/catalog (see 'meshfed catalog list --help').
    """
    _print_catalog(directory, api, token_file, api_ca, output)


@catalog_app.command("list")
def list_catalog(
    directory: OptionalZoneDir = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
) -> None:
    """List the zone's services with their health and zone, and where local clients reach each import.

    -o json prints the same object as GET /v1/catalog: version, source {mode, error}, publication,
    services (endpoints the gateway's health checks find failing marked unhealthy),
    failing_health_checks, imports (with local_addresses) and failover_groups (with listeners).
    Of a zone that is not running: read from its files, without local addresses or health checks,
    and source.error is null.
    """
    _print_catalog(directory, api, token_file, api_ca, output)


def _require_embedded(zone: Zone, verb: str) -> None:
    refusal = not_embedded(zone.name, zone.config.catalog, f"`meshfed service {verb}`")
    if refusal is not None:
        raise CatalogError(refusal)


def _load(zone: Zone) -> CatalogSnapshot:
    """The zone's services now, read from the source zone.toml names."""
    if zone.config.catalog == "embedded":
        with EmbeddedCatalog(zone.directory) as embedded:
            return embedded.load()

    async def read() -> CatalogSnapshot:
        source = open_catalog(zone)
        try:
            return await source.snapshot()
        finally:
            await source.aclose()

    return asyncio.run(read())


def _print_catalog(
    directory: Path | None, api: str | None, token_file: Path | None, api_ca: Path | None, output: Output
) -> None:
    from meshfed.api.catalog import CatalogView  # the API's models (and fastapi) only for this command

    where = target(directory, api, token_file, api_ca, change=False)
    if where.api is not None:
        view, running, zone_name = CatalogView.model_validate(where.api.get("/v1/catalog")), True, None
    else:
        zone = where.zone()
        view, running, zone_name = _offline_view(zone), _running(zone), zone.name
    emit(view, output, table=lambda: _print_view(view, running))
    mode = view.source.mode
    if not running:
        typer.echo(
            f"note: zone {zone_name} is not running: health is the catalog's alone (no gateway health checks) "
            "and local addresses are unknown until 'meshfed up'",
            err=True,
        )
    if view.source.error is not None:
        typer.echo(f"warning: the {mode} catalog does not answer: {view.source.error}", err=True)
    publication = view.publication
    if not publication.ok:
        since = publication.failing_since.isoformat(timespec="seconds") if publication.failing_since else "?"
        typer.echo(
            f"warning: imports are not published in the {mode} catalog since {since}: {publication.error}",
            err=True,
        )


def _running(zone: Zone) -> bool:
    with RunState(zone.directory) as runstate:
        return runstate.running()


def _offline_view(zone: Zone) -> CatalogView:
    """What ``GET /v1/catalog`` would answer, from the zone directory."""
    from meshfed.api.catalog import catalog_view

    snapshot = _load(zone)
    with ImportStore(zone.directory) as imports:
        imported = imports.services()
        # Groups holding a listener port keep it with one source, as the running zone serves them (only
        # read here: no port is handed out, so the base does not matter).
        sticky = groups_of_listeners(imports.egress_ports(0).listeners())
    with PublicationStore(zone.directory / STATE_FILE) as publications:
        publication = publications.get() or PublicationStatus(source=zone.config.catalog)
    # What only the running zone knows: its gateway's health verdict and where its listeners are.
    with RunState(zone.directory) as runstate:
        running = runstate.running()
        bound = runstate.listeners() if running else {}
    with ExportRules(zone.directory) as rules:
        failing = rules.unhealthy_endpoints() if running else frozenset()
    groups = failover_groups(snapshot, imported, zone.config.failover, sticky)
    return catalog_view(zone, snapshot, imported, groups, publication, bound, failing)


def _print_view(view: CatalogView, running: bool) -> None:
    failing = {(item.namespace, item.service, item.endpoint) for item in view.failing_health_checks}
    rows: list[tuple[object, ...]] = []
    for service in view.services:
        rows.append(
            (
                f"{service.name}.{service.namespace}",
                _ports(service.ports),
                ", ".join(sorted({e.zone for e in service.endpoints})) or "-",
                f"{len(service.healthy_endpoints)}/{len(service.endpoints)}",
                ", ".join(
                    e.key + (" (failing health checks)" if (service.namespace, service.name, e.key) in failing else "")
                    for e in service.endpoints
                ),
                "-",
            )
        )
    for item in view.imports:
        rows.append(
            (
                item.name,
                _ports(item.ports),
                item.zone,
                f"{item.healthy_endpoints}/{item.total_endpoints}",
                f"via gateway {', '.join(item.gateway_addresses)}",
                _local_address(running, item.local_addresses, item.ports),
            )
        )
    for group in view.failover_groups:
        split = ", ".join(f"{peer} {weight}" for peer, weight in group.split.items())
        rows.append(
            (
                f"{group.name} (failover group)",
                ", ".join(sorted(group.listeners)) or "-",
                " -> ".join(group.sources) + (f" (split {split})" if split else ""),
                "",
                "",
                _local_address(running, group.listeners, group.listeners),
            )
        )
    print_table(
        f"catalog ({view.source.mode}, version {view.version})",
        ("service", "ports", "zone", "healthy", "endpoints", "local address"),
        rows,
        width=200,
    )


def _local_address(running: bool, bound: dict[str, str], ports: Iterable[str]) -> str:
    """Where local clients connect, per port: the running zone's listener addresses."""
    if not running:
        return "unknown (zone not running)"
    return ", ".join(f"{port}={bound.get(port, 'not served')}" for port in sorted(ports))


def _ports(ports: dict[str, int]) -> str:
    return ", ".join(f"{key}={value}" for key, value in ports.items())


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise CatalogError(f"{text!r} is not KEY=VALUE")
    return key, value


def _port_number(name: str, value: str) -> int:
    if not value.isdigit():
        raise CatalogError(f"port {name}={value!r}: the number must be an integer in 1-65535")
    return int(value)


def _endpoint(spec: str) -> dict[str, object]:
    """One ``--endpoint`` as the fields of an :class:`~meshfed.catalog.registration.EndpointSpec`."""
    address_port, *settings = spec.split(";")
    host, sep, port = address_port.rpartition(":")
    if not sep or not port.isdigit():
        raise CatalogError(f"endpoint {spec!r} must start with IP:PORT")
    pairs = list(map(_pair, settings))
    fields: dict[str, str] = dict(pairs)
    if len(fields) != len(pairs):
        raise CatalogError(f"endpoint {spec!r}: a setting is given twice; give each key once")
    labels = {key: value for key, value in fields.items() if key not in ("weight", "healthy", "region", "zone")}
    if fields.get("healthy", "true") not in ("true", "false"):
        raise CatalogError(f"endpoint {spec!r}: healthy must be true or false")
    weight = fields.get("weight", "1")
    if not weight.isdigit():
        raise CatalogError(f"endpoint {spec!r}: weight must be a positive integer")
    return {
        "address": host.strip("[]"),
        "port": int(port),
        "locality": {"region": fields.get("region", ""), "zone": fields.get("zone", "")},
        "weight": int(weight),
        "healthy": fields.get("healthy", "true") == "true",
        "labels": labels,
    }
