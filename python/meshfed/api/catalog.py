"""``/v1/catalog``, ``/v1/services`` and ``/v1/exports``: the zone's services, its imports, and what it exports.

``GET /v1/catalog`` is the one read of services (local ones, imports and
failover groups); ``POST /v1/services`` and ``DELETE /v1/services/{namespace}/{name}``
change the embedded catalog with the validation ``meshfed service register``
uses (:mod:`meshfed.catalog.registration`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import pathlib
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from meshfed.addresses import HostPort
from meshfed.api.auth import audit_call, require_admin, require_reader
from meshfed.api.limits import MAX_EXPORT_PEERS
from meshfed.catalog.embedded import EmbeddedCatalog
from meshfed.catalog.model import CatalogSnapshot, Service
from meshfed.catalog.publisher import PublicationStatus
from meshfed.catalog.registration import ServiceRegistration, not_embedded
from meshfed.controller import Controller
from meshfed.errors import CatalogError, FederationError
from meshfed.federation.exports import ExportRules, UnhealthyEndpoints
from meshfed.federation.failover import FailoverGroup
from meshfed.federation.imports import ImportedService, ImportStore, egress_listener_name
from meshfed.zone import Zone

router = APIRouter(prefix="/v1", tags=["catalog"])

_NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


class ImportView(BaseModel):
    name: str
    peer: str
    zone: str
    ports: dict[str, int]
    healthy_endpoints: int
    total_endpoints: int
    gateway_addresses: list[str] = Field(description="The exporting zone's gateways, which this zone's gateway dials.")
    local_addresses: dict[str, str] = Field(
        description="Port name -> host:port where local clients connect (the import's egress listener); a port "
        "the gateway does not serve is left out."
    )


class FailoverGroupView(BaseModel):
    name: str = Field(description="<service>.<namespace>")
    sources: list[str] = Field(description="'local', then peers, in the order traffic tries them.")
    split: dict[str, int] = Field(description="Peers sharing a tier, with their weights (zone.toml [failover] split).")
    listeners: dict[str, str] = Field(description="Port name -> host:port where local clients connect to the group.")


class CatalogSourceView(BaseModel):
    mode: str = Field(description="embedded, consul or kubernetes (zone.toml catalog).")
    error: str | None = Field(description="What the last read of the catalog failed with; null while it answers.")


class PublicationView(BaseModel):
    """How publishing imports into the zone's catalog (Consul registrations, Kubernetes mirrors) went last."""

    ok: bool
    imports: int = Field(description="Imports published by the last successful publication.")
    error: str | None = Field(description="Why the last publication failed; null when it succeeded.")
    failing_since: dt.datetime | None
    last_success_at: dt.datetime | None

    @classmethod
    def of(cls, status: PublicationStatus) -> PublicationView:
        return cls(
            ok=status.ok,
            imports=status.imports,
            error=status.last_error,
            failing_since=status.failing_since,
            last_success_at=status.last_success_at,
        )


class FailingEndpointView(BaseModel):
    service: str
    namespace: str
    endpoint: str = Field(description="address:port")


class CatalogView(BaseModel):
    version: int
    source: CatalogSourceView
    publication: PublicationView
    services: list[Service] = Field(
        description="Local services; an endpoint is healthy when the catalog says so and the gateway's health "
        "checks do not find it failing (failing_health_checks), which is what peers are told."
    )
    failing_health_checks: list[FailingEndpointView] = Field(
        description="Local endpoints the gateway's health checks find failing, whatever the catalog says."
    )
    imports: list[ImportView]
    failover_groups: list[FailoverGroupView]


class ExportRuleView(BaseModel):
    service: str
    namespace: str
    peer: str


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    service: Annotated[str, Field(pattern=_NAME)]
    namespace: Annotated[str, Field(pattern=_NAME)] = "default"
    to: Annotated[
        list[Annotated[str, StringConstraints(min_length=1, max_length=63)]],
        Field(min_length=1, max_length=MAX_EXPORT_PEERS, description="Peering names, or '*' for every peer."),
    ]
    proxy_protocol: bool | None = Field(
        default=None,
        description="Send the backends a PROXY v2 header with the original caller's SPIFFE ID; null: unchanged.",
    )


def _controller(request: Request) -> Controller:
    controller: Controller = request.app.state.controller
    return controller


@router.get("/catalog", dependencies=[Depends(require_reader)])
async def catalog(request: Request) -> CatalogView:
    """Local services (as the controller last saw them) and imported services."""
    # A coroutine: the controller's state belongs to the event loop; the stored imports are read beside it.
    controller = _controller(request)
    imported = await asyncio.to_thread(_stored_imports, controller.zone.directory)
    return catalog_view(
        controller.zone,
        controller.catalog_snapshot,
        imported,
        controller.failover_groups(),
        controller.publication,
        controller.egress_addresses(),
        controller.unhealthy_endpoints,
        catalog_error=controller.catalog_error,
    )


def _stored_imports(directory: pathlib.Path) -> list[ImportedService]:
    with ImportStore(directory) as imports:
        return imports.services()


def catalog_view(
    zone: Zone,
    snapshot: CatalogSnapshot,
    imported: list[ImportedService],
    groups: list[FailoverGroup],
    publication: PublicationStatus,
    bound: dict[str, tuple[str, int]],
    failing: UnhealthyEndpoints,
    *,
    catalog_error: str | None = None,
) -> CatalogView:
    """The catalog as ``GET /v1/catalog`` answers it; ``meshfed catalog list -o json`` builds the same offline."""
    addresses = {name: str(HostPort(host, port)) for name, (host, port) in bound.items()}
    return CatalogView(
        version=snapshot.version,
        source=CatalogSourceView(mode=zone.config.catalog, error=catalog_error),
        publication=PublicationView.of(publication),
        services=[checked_service(service, failing) for service in snapshot.services],
        failing_health_checks=[
            FailingEndpointView(service=service, namespace=namespace, endpoint=endpoint)
            for namespace, service, endpoint in sorted(failing)
        ],
        imports=[
            ImportView(
                name=item.name,
                peer=item.peer,
                zone=item.origin.zone,
                ports=item.service.ports,
                healthy_endpoints=item.service.healthy_endpoints,
                total_endpoints=item.service.total_endpoints,
                gateway_addresses=list(item.origin.gateway_addresses),
                local_addresses={
                    port: addresses[egress_listener_name(item, port)]
                    for port in sorted(item.service.ports)
                    if egress_listener_name(item, port) in addresses
                },
            )
            for item in imported
        ],
        failover_groups=[
            FailoverGroupView(
                name=group.name,
                sources=group.sources,
                split=group.weights,
                listeners={
                    port: addresses[group.listener_name(port)]
                    for port in group.port_names
                    if group.listener_name(port) in addresses
                },
            )
            for group in groups
        ],
    )


def checked_service(service: Service, failing: UnhealthyEndpoints) -> Service:
    """``service`` with the endpoints the gateway finds failing marked unhealthy."""
    if not any((service.namespace, service.name, e.key) in failing for e in service.endpoints):
        return service
    endpoints = [
        dataclasses.replace(e, healthy=False) if (service.namespace, service.name, e.key) in failing else e
        for e in service.endpoints
    ]
    return service.model_copy(update={"endpoints": endpoints})


class ExportRemovalView(BaseModel):
    service: str
    namespace: str
    to: list[str] | None = Field(description="The peers whose rules were removed; null: every rule of the service.")
    removed: int = Field(description="How many export rules were removed.")


class ServiceChangeView(BaseModel):
    service: str
    namespace: str
    catalog_version: int = Field(description="The embedded catalog's version after the change.")


def _embedded_only(controller: Controller, what: str) -> None:
    refusal = not_embedded(controller.zone.name, controller.zone.config.catalog, what)
    if refusal is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, refusal)


@router.post(
    "/services",
    status_code=status.HTTP_201_CREATED,
    dependencies=[Depends(require_admin)],
    responses={409: {"description": "The zone's catalog is Consul or Kubernetes, which meshfed does not own"}},
)
def register_service(body: ServiceRegistration, request: Request) -> ServiceChangeView:
    """Add or replace a service and all its endpoints in the embedded catalog (``meshfed service register``).

    A running zone applies it within a second (its gateway, and the peers it is exported to).
    """
    controller = _controller(request)
    _embedded_only(controller, "POST /v1/services")
    service = body.service(controller.zone.name)
    with EmbeddedCatalog(controller.zone.directory) as catalog:
        version = catalog.register(service)
    audit_call(
        request,
        controller.zone.directory,
        "service.register",
        f"{service.name}.{service.namespace}",
        endpoints=len(service.endpoints),
        version=version,
    )
    return ServiceChangeView(service=service.name, namespace=service.namespace, catalog_version=version)


@router.delete(
    "/services/{namespace}/{name}",
    dependencies=[Depends(require_admin)],
    responses={
        404: {"description": "No such service in the embedded catalog"},
        409: {"description": "The zone's catalog is Consul or Kubernetes, which meshfed does not own"},
    },
)
def deregister_service(namespace: str, name: str, request: Request) -> ServiceChangeView:
    """Remove a service from the embedded catalog (``meshfed service deregister``)."""
    controller = _controller(request)
    _embedded_only(controller, "DELETE /v1/services")
    try:
        with EmbeddedCatalog(controller.zone.directory) as catalog:
            version = catalog.deregister(namespace, name)
    except CatalogError as err:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(err)) from None
    audit_call(request, controller.zone.directory, "service.deregister", f"{name}.{namespace}", version=version)
    return ServiceChangeView(service=name, namespace=namespace, catalog_version=version)


class CatalogHoldView(BaseModel):
    """Whether exports were held because the catalog came up empty, and whether this call released them."""

    released: bool


@router.post("/catalog/confirm-empty", dependencies=[Depends(require_admin)])
async def confirm_empty_catalog(request: Request) -> CatalogHoldView:
    """Confirm that the zone's empty catalog is meant: its peers then hear that its exports are gone.

    A zone that starts with an empty catalog although it exported services
    before (a lost ``catalog.db``, a catalog source pointed at the wrong place)
    keeps telling peers what they last heard until this call, or until the
    catalog has services again. ``released`` is false when nothing was held.
    """
    controller = _controller(request)
    released = controller.confirm_empty_catalog()
    audit_call(
        request, controller.zone.directory, "catalog.confirm_empty", f"zone {controller.zone.name}", released=released
    )
    return CatalogHoldView(released=released)


@router.get("/exports", dependencies=[Depends(require_reader)])
def list_exports(request: Request) -> list[ExportRuleView]:
    with ExportRules(_controller(request).zone.directory) as rules:
        return [ExportRuleView(service=r.service, namespace=r.namespace, peer=r.peer) for r in rules.rules()]


@router.post("/exports", status_code=status.HTTP_201_CREATED, dependencies=[Depends(require_admin)])
async def add_export(body: ExportRequest, request: Request) -> list[ExportRuleView]:
    """Export a service to peers; the ingress admits them and the peers hear of it within a second."""
    controller = _controller(request)
    try:
        with ExportRules(controller.zone.directory) as rules:
            added = rules.add(body.service, body.namespace, body.to, proxy_protocol=body.proxy_protocol)
    except FederationError as err:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(err)) from None
    audit_call(
        request,
        controller.zone.directory,
        "export.add",
        f"{body.service}.{body.namespace}",
        to=sorted({rule.peer for rule in added}),
    )
    if controller.ready:
        await controller.exports_changed()
    return [ExportRuleView(service=r.service, namespace=r.namespace, peer=r.peer) for r in added]


@router.delete("/exports/{namespace}/{service}", dependencies=[Depends(require_admin)])
async def remove_export(
    namespace: str,
    service: str,
    request: Request,
    to: Annotated[
        list[Annotated[str, StringConstraints(min_length=1, max_length=63)]] | None,
        Query(max_length=MAX_EXPORT_PEERS, description="Only the rules naming these peers; default: every rule."),
    ] = None,
) -> ExportRemovalView:
    """Stop exporting a service to every peer, or to the peers ``to`` names."""
    controller = _controller(request)
    try:
        with ExportRules(controller.zone.directory) as rules:
            removed = rules.remove(service, namespace, to)
    except FederationError as err:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(err)) from None
    audit_call(
        request,
        controller.zone.directory,
        "export.remove",
        f"{service}.{namespace}",
        to=sorted(to) if to else "*",
        removed=removed,
    )
    if controller.ready:
        await controller.exports_changed()
    return ExportRemovalView(service=service, namespace=namespace, to=sorted(to) if to else None, removed=removed)
