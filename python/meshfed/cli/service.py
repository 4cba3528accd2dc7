"""``meshfed service`` and ``meshfed catalog``: the zone's catalog.

``service register``/``deregister`` write the embedded catalog; a zone whose
catalog is Consul or Kubernetes refuses them (services are registered there,
with that platform's tools). ``service list`` and ``catalog list`` read the
catalog the zone is configured with, through the same source the controller
uses, so a Consul or Kubernetes zone shows what that server holds.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from meshfed import audit
from meshfed.catalog import CatalogSnapshot, open_catalog
from meshfed.catalog.embedded import EmbeddedCatalog
from meshfed.catalog.model import Endpoint, Locality, Service
from meshfed.catalog.publisher import PublicationStore
from meshfed.cli.common import ZoneDir
from meshfed.errors import CatalogError
from meshfed.federation.failover import failover_groups
from meshfed.federation.imports import ImportStore
from meshfed.zone import STATE_FILE, Zone

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
    try:
        service = Service(
            name=name,
            namespace=namespace,
            ports={key: _port_number(key, value) for key, value in map(_pair, port)},
            labels=dict(map(_pair, label or [])),
            endpoints=[_endpoint(spec, zone.name) for spec in endpoint],
        )
    except ValidationError as err:
        first = err.errors()[0]
        raise CatalogError(str(first["msg"]).removeprefix("Value error, ")) from None
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
def list_services(directory: ZoneDir) -> None:
    """List the services in the zone's catalog (embedded, Consul or Kubernetes)."""
    _print_catalog(Zone.open(directory))


@catalog_app.command("list")
def list_catalog(directory: ZoneDir) -> None:
    """List the zone's services with their health and zone."""
    _print_catalog(Zone.open(directory))


def _require_embedded(zone: Zone, verb: str) -> None:
    mode = zone.config.catalog
    if mode != "embedded":
        where = {"consul": "in Consul (consul services register, or the agent's service definitions)"}.get(
            mode, "in Kubernetes (a Service with a selector, or your own EndpointSlices)"
        )
        raise CatalogError(
            f"zone {zone.name} reads its services from its {mode} catalog, so `meshfed service {verb}` does not "
            f"apply; manage them {where}"
        )


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


def _print_catalog(zone: Zone) -> None:
    snapshot = _load(zone)
    with ImportStore(zone.directory) as imports:
        imported = imports.services()
    with PublicationStore(zone.directory / STATE_FILE) as publications:
        publication = publications.get()
    table = Table(title=f"zone {zone.name} catalog ({zone.config.catalog}, version {snapshot.version})")
    for column in ("service", "ports", "zone", "healthy", "endpoints"):
        table.add_column(column)
    for service in snapshot.services:
        table.add_row(
            f"{service.name}.{service.namespace}",
            _ports(service.ports),
            zone.name,
            f"{len(service.healthy_endpoints)}/{len(service.endpoints)}",
            ", ".join(endpoint.key for endpoint in service.endpoints),
        )
    for item in imported:
        table.add_row(
            item.name,
            _ports(item.service.ports),
            item.snapshot.zone,
            f"{item.service.healthy_endpoints}/{item.service.total_endpoints}",
            f"via gateway {', '.join(item.snapshot.gateway_addresses)}",
        )
    for group in failover_groups(snapshot, imported, zone.config.failover):
        table.add_row(
            f"{group.name} (failover group)",
            ", ".join(group.port_names),
            group.describe(),
            "",
            "listener " + ", ".join(group.listener_name(port) for port in group.port_names),
        )
    Console(width=160).print(table)
    if publication is not None and not publication.ok:
        since = publication.failing_since.isoformat(timespec="seconds") if publication.failing_since else "?"
        typer.echo(
            f"warning: imports are not published in the {zone.config.catalog} catalog since {since}: "
            f"{publication.last_error}",
            err=True,
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


def _endpoint(spec: str, zone: str) -> Endpoint:
    address_port, *settings = spec.split(";")
    host, sep, port = address_port.rpartition(":")
    if not sep or not port.isdigit():
        raise CatalogError(f"endpoint {spec!r} must start with IP:PORT")
    fields: dict[str, str] = dict(map(_pair, settings))
    labels = {key: value for key, value in fields.items() if key not in ("weight", "healthy", "region", "zone")}
    if fields.get("healthy", "true") not in ("true", "false"):
        raise CatalogError(f"endpoint {spec!r}: healthy must be true or false")
    weight = fields.get("weight", "1")
    if not weight.isdigit():
        raise CatalogError(f"endpoint {spec!r}: weight must be a positive integer")
    return Endpoint(
        address=host.strip("[]"),
        port=int(port),
        zone=zone,
        locality=Locality(region=fields.get("region", ""), zone=fields.get("zone", "")),
        weight=int(weight),
        healthy=fields.get("healthy", "true") == "true",
        labels=labels,
    )
