"""``/v1/catalog`` and ``/v1/exports``: the zone's services, its imports, and what it exports."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from meshfed.api.auth import audit_call, require_admin, require_reader
from meshfed.api.limits import MAX_EXPORT_PEERS
from meshfed.catalog.model import Service
from meshfed.catalog.publisher import PublicationStatus
from meshfed.controller import Controller
from meshfed.errors import FederationError
from meshfed.federation.exports import ExportRules
from meshfed.federation.imports import ImportStore

router = APIRouter(prefix="/v1", tags=["catalog"])

_NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


class ImportView(BaseModel):
    name: str
    peer: str
    zone: str
    ports: dict[str, int]
    healthy_endpoints: int
    total_endpoints: int
    gateway_addresses: list[str]


class FailoverGroupView(BaseModel):
    name: str = Field(description="<service>.<namespace>")
    sources: list[str] = Field(description="'local', then peers, in the order traffic tries them.")
    split: dict[str, int] = Field(description="Peers sharing a tier, with their weights (zone.toml [failover] split).")
    listeners: dict[str, str] = Field(description="Port name -> host:port where local clients reach the group.")


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


class CatalogView(BaseModel):
    version: int
    source: CatalogSourceView
    publication: PublicationView
    services: list[Service]
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
def catalog(request: Request) -> CatalogView:
    """Local services (as the controller last saw them) and imported services."""
    controller = _controller(request)
    with ImportStore(controller.zone.directory) as imports:
        imported = imports.services()
    snapshot = controller.catalog_snapshot
    bound = {name: f"{host}:{port}" for name, (host, port) in controller.egress_addresses().items()}
    return CatalogView(
        version=snapshot.version,
        source=CatalogSourceView(mode=controller.zone.config.catalog, error=controller.catalog_error),
        publication=PublicationView.of(controller.publication),
        services=snapshot.services,
        imports=[
            ImportView(
                name=item.name,
                peer=item.peer,
                zone=item.snapshot.zone,
                ports=item.service.ports,
                healthy_endpoints=item.service.healthy_endpoints,
                total_endpoints=item.service.total_endpoints,
                gateway_addresses=item.snapshot.gateway_addresses,
            )
            for item in imported
        ],
        failover_groups=[
            FailoverGroupView(
                name=group.name,
                sources=group.sources,
                split=group.weights,
                listeners={
                    port_name: bound[group.listener_name(port_name)]
                    for port_name in group.port_names
                    if group.listener_name(port_name) in bound
                },
            )
            for group in controller.failover_groups()
        ],
    )


class CatalogHoldView(BaseModel):
    """Whether exports were held because the catalog came up empty, and whether this call released them."""

    released: bool


@router.post("/catalog/confirm-empty", dependencies=[Depends(require_admin)])
def confirm_empty_catalog(request: Request) -> CatalogHoldView:
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


@router.delete(
    "/exports/{namespace}/{service}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[Depends(require_admin)],
)
async def remove_export(namespace: str, service: str, request: Request) -> Response:
    """Stop exporting a service to every peer."""
    controller = _controller(request)
    try:
        with ExportRules(controller.zone.directory) as rules:
            removed = rules.remove(service, namespace)
    except FederationError as err:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(err)) from None
    audit_call(request, controller.zone.directory, "export.remove", f"{service}.{namespace}", to="*", removed=removed)
    if controller.ready:
        await controller.exports_changed()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
