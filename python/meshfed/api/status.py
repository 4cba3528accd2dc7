"""``/v1/status`` and ``/v1/explain/{namespace}/{service}``: the zone at a glance, and one service's path."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request

from meshfed.api.auth import require_reader
from meshfed.controller import Controller
from meshfed.diagnose import Explanation, ZoneStatus, explain, zone_status
from meshfed.federation.service import PeeringService

router = APIRouter(prefix="/v1", tags=["status"], dependencies=[Depends(require_reader)])

# The handlers are coroutines: they read the controller's and the peering service's state, which the event
# loop owns and changes, so they run on that loop (a plain def would run on a worker thread meanwhile).


def _parts(request: Request) -> tuple[Controller, PeeringService | None]:
    return request.app.state.controller, request.app.state.peering


@router.get("/status")
async def status(request: Request) -> ZoneStatus:
    """Identity, CA generations, peerings, catalog, imports with their local addresses, and problems.

    ``healthy`` is false when something needs attention; ``problems`` says what, one line each.
    """
    return zone_status(*_parts(request))


@router.get("/explain/{namespace}/{service}")
async def explain_service(
    request: Request,
    namespace: Annotated[str, Path(max_length=63)],
    service: Annotated[str, Path(max_length=63)],
    peer: Annotated[str | None, Query(max_length=63, description="Only towards or from this peer.")] = None,
    caller: Annotated[
        str | None, Query(alias="as", max_length=2048, description="Explain the authorization of this SPIFFE ID.")
    ] = None,
) -> Explanation:
    """Each link of the service's path on this zone, in traffic order; ``broken`` is the first that fails."""
    controller, peering = _parts(request)
    return explain(controller, peering, service=service, namespace=namespace, peer=peer, caller=caller)
