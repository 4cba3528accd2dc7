"""``meshfed service`` and ``meshfed catalog``: the zone's catalog.

``service register``/``deregister`` write the embedded catalog; a zone whose
catalog is Consul or Kubernetes refuses them (services are registered there,
with that platform's tools). ``service list`` and ``catalog list`` read the
catalog the zone is configured with, through the same source the controller
uses, so a Consul or Kubernetes zone shows what that server holds.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated

import typer

from meshfed import audit
from meshfed.addresses import HostPort
from meshfed.catalog import CatalogSnapshot, open_catalog
from meshfed.catalog.embedded import EmbeddedCatalog
from meshfed.catalog.publisher import PublicationStatus, PublicationStore
from meshfed.catalog.registration import not_embedded, registration
from meshfed.cli.common import Output, OutputOption, ZoneDir, emit, print_table
from meshfed.errors import CatalogError
from meshfed.federation.exports import ExportRules
from meshfed.federation.failover import failover_groups
from meshfed.federation.imports import ImportStore, egress_listener_name
from meshfed.runstate import RunState
from meshfed.zone import STATE_FILE, Zone

if TYPE_CHECKING:
    from meshfed.api.catalog import CatalogView
    from meshfed.federation.failover import FailoverGroup
    from meshfed.federation.imports import ImportedService

service_app = typer.Typer(help="Register services in the zone's embedded catalog.", no_args_is_help=True)
catalog_app = typer.Typer(help="Show the zone's catalog.", no_args_is_help=True)

_ENDPOINT_HELP = (
    "IP:PORT, optionally followed by ';key=value' settings: weight=N, healthy=false, region=R, zone=Z; "
    "any other key is a label (e.g. '10.0.0.5:8080;version=v2;weight=3'). Repeat for each endpoint."
)


@service_app.command("register")
def register(
    directory: ZoneDir,
    name: Annotated[str, typer.Option(help="Service name (a DNS label).")],
    port: Annotated[list[str], typer.Option(help="Named port NAME=NUMBER, e.g. http=8080. Repeatable.")],
    endpoint: Annotated[list[str], typer.Option(help=_ENDPOINT_HELP)],
    namespace: Annotated[str, typer.Option(help="Namespace of the service.")] = "default",
    label: Annotated[list[str] | None, typer.Option(help="Service label KEY=VALUE. Repeatable.")] = None,
) -> None:
    """Add or replace a service and all its endpoints."""
    zone = Zone.open(directory)
    _require_embedded(zone, "register")
    labels = dict(map(_pair, label or []))
    if len(labels) != len(label or []):
        raise CatalogError("--label: a label key is given twice; give each key once")
    service = registration(
        name=name,
        namespace=namespace,
        ports=[{"name": key, "port": _port_number(key, value)} for key, value in map(_pair, port)],
        labels=labels,
        endpoints=[_endpoint(spec) for spec in endpoint],
    ).service(zone.name)
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
    typer.echo(
        f"registered {service.name}.{service.namespace}: {len(service.endpoints)} endpoint(s), version {version}"
    )


@service_app.command("deregister")
def deregister(
    directory: ZoneDir,
    name: Annotated[str, typer.Option(help="Service name.")],
    namespace: Annotated[str, typer.Option(help="Namespace of the service.")] = "default",
) -> None:
    """Remove a service from the embedded catalog."""
    zone = Zone.open(directory)
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
    typer.echo(f"deregistered {name}.{namespace}, version {version}")


@service_app.command("list")
def list_services(directory: ZoneDir, output: OutputOption = Output.table) -> None:
    """List the services in the zone's catalog (embedded, Consul or Kubernetes).

    -o json prints the same object as GET /v1/catalog (see 'meshfed catalog list --help').
    """
    _print_catalog(Zone.open(directory), output)


@catalog_app.command("list")
def list_catalog(directory: ZoneDir, output: OutputOption = Output.table) -> None:
    """List the zone's services with their health and zone.

    -o json prints the same object as GET /v1/catalog: version, source {mode, error}, publication,
    services (endpoints the gateway's health checks find failing marked unhealthy),
    failing_health_checks, imports (with local_addresses) and failover_groups (with listeners).
    Read from the zone directory: local addresses and health checks only while the zone runs,
    and source.error is null.
    """
    _print_catalog(Zone.open(directory), output)


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


def _print_catalog(zone: Zone, output: Output) -> None:
    snapshot = _load(zone)
    with ImportStore(zone.directory) as imports:
        imported = imports.services()
    with PublicationStore(zone.directory / STATE_FILE) as publications:
        publication = publications.get()
    # What only the running zone knows: its gateway's health verdict and where its listeners are.
    with RunState(zone.directory) as runstate:
        running = runstate.running()
        bound = runstate.listeners() if running else {}
    with ExportRules(zone.directory) as rules:
        failing = rules.unhealthy_endpoints() if running else frozenset()
    groups = failover_groups(snapshot, imported, zone.config.failover)
    if output is not Output.table:
        emit(_catalog_view(zone, snapshot, imported, groups, publication, bound, failing), output, table=lambda: None)
        return
    rows: list[tuple[object, ...]] = []
    for service in snapshot.services:
        checked = [e for e in service.endpoints if (service.namespace, service.name, e.key) in failing]
        healthy = [e for e in service.healthy_endpoints if e not in checked]
        rows.append(
            (
                f"{service.name}.{service.namespace}",
                _ports(service.ports),
                zone.name,
                f"{len(healthy)}/{len(service.endpoints)}",
                ", ".join(e.key + (" (failing health checks)" if e in checked else "") for e in service.endpoints),
                "-",
            )
        )
    for item in imported:
        rows.append(
            (
                item.name,
                _ports(item.service.ports),
                item.snapshot.zone,
                f"{item.service.healthy_endpoints}/{item.service.total_endpoints}",
                f"via gateway {', '.join(item.snapshot.gateway_addresses)}",
                _local_address(running, bound, {port: egress_listener_name(item, port) for port in item.service.ports}),
            )
        )
    for group in groups:
        rows.append(
            (
                f"{group.name} (failover group)",
                ", ".join(group.port_names),
                group.describe(),
                "",
                "listener " + ", ".join(group.listener_name(port) for port in group.port_names),
                _local_address(running, bound, {port: group.listener_name(port) for port in group.port_names}),
            )
        )
    print_table(
        f"zone {zone.name} catalog ({zone.config.catalog}, version {snapshot.version})",
        ("service", "ports", "zone", "healthy", "endpoints", "local address"),
        rows,
        width=200,
    )
    if not running:
        typer.echo(
            f"note: zone {zone.name} is not running: health is the catalog's alone (no gateway health checks) "
            "and local addresses are unknown until 'meshfed up'",
            err=True,
        )
    if publication is not None and not publication.ok:
        since = publication.failing_since.isoformat(timespec="seconds") if publication.failing_since else "?"
        typer.echo(
            f"warning: imports are not published in the {zone.config.catalog} catalog since {since}: "
            f"{publication.last_error}",
            err=True,
        )


def _catalog_view(
    zone: Zone,
    snapshot: CatalogSnapshot,
    imported: list[ImportedService],
    groups: list[FailoverGroup],
    publication: PublicationStatus | None,
    bound: dict[str, tuple[str, int]],
    failing: frozenset[tuple[str, str, str]],
) -> CatalogView:
    """What ``GET /v1/catalog`` would answer, from the zone directory."""
    from meshfed.api.catalog import catalog_view  # the API's models; fastapi only for -o json|yaml

    publication = publication or PublicationStatus(source=zone.config.catalog)
    return catalog_view(zone, snapshot, imported, groups, publication, bound, failing)


def _local_address(running: bool, bound: dict[str, tuple[str, int]], listeners: dict[str, str]) -> str:
    """Where local clients connect, per port: the running zone's listener addresses."""
    if not running:
        return "unknown (zone not running)"
    return ", ".join(
        f"{port}={HostPort(*bound[name])}" if name in bound else f"{port}=not served"
        for port, name in sorted(listeners.items())
    )


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
