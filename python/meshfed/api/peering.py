"""``/v1/peerings``: list, show, tokens, establish, delete, refresh.

The routes use the zone's :class:`~meshfed.federation.service.PeeringService`,
which the app keeps at ``app.state.peering``.
"""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from pydantic import BaseModel, Field, field_validator

from meshfed.api.auth import audit_call, require_admin, require_reader
from meshfed.errors import InvalidTokenError, PeeringError
from meshfed.federation.peer_status import PeerStatus
from meshfed.federation.peering_names import check_peering_name
from meshfed.federation.service import PeeringService
from meshfed.federation.token import DEFAULT_TOKEN_TTL, MAX_TOKEN_TTL

router = APIRouter(prefix="/v1/peerings", tags=["peerings"])


class TokenRequest(BaseModel):
    peer_name: str = Field(
        min_length=1, max_length=63, description="Zone allowed to redeem the token (its name, a DNS label)."
    )
    ttl_seconds: int = Field(
        default=int(DEFAULT_TOKEN_TTL.total_seconds()), ge=1, le=int(MAX_TOKEN_TTL.total_seconds())
    )

    @field_validator("peer_name")
    @classmethod
    def _check_peer_name(cls, value: str) -> str:
        try:
            return check_peering_name(value, "the peer's zone name")
        except PeeringError as err:
            raise ValueError(str(err)) from None


class TokenResponse(BaseModel):
    token: str
    expires_at: dt.datetime
    addresses: list[str]


class EstablishRequest(BaseModel):
    token: str = Field(min_length=1, max_length=65536)
    name: str | None = Field(default=None, min_length=1, max_length=63)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        try:
            return None if value is None else check_peering_name(value)
        except PeeringError as err:
            raise ValueError(str(err)) from None


def _service(request: Request) -> PeeringService:
    service = getattr(request.app.state, "peering", None)
    if not isinstance(service, PeeringService):
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "this zone runs no peering service")
    return service


def _not_found(name: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no peering named {name!r}")


# The handlers are coroutines: the peering service's links belong to the event loop, so they are read on it.
@router.get("", dependencies=[Depends(require_reader)])
async def list_peerings(request: Request) -> list[PeerStatus]:
    """Every peering with its state, heartbeats, versions and lag."""
    return _service(request).peers()


@router.get("/{name}", dependencies=[Depends(require_reader)], responses={404: {"description": "No such peering"}})
async def show_peering(name: str, request: Request) -> PeerStatus:
    try:
        return _service(request).peer(name)
    except PeeringError:
        raise _not_found(name) from None


@router.post("/tokens", dependencies=[Depends(require_admin)], status_code=status.HTTP_201_CREATED)
async def create_token(body: TokenRequest, request: Request) -> TokenResponse:
    """Issue a one-time token for zone ``peer_name``; the response is the only copy of its secret."""
    service = _service(request)
    try:
        issued = service.issue_token(body.peer_name, dt.timedelta(seconds=body.ttl_seconds))
    except PeeringError as err:
        raise HTTPException(status.HTTP_409_CONFLICT, str(err)) from None
    # The token's secret is the caller's alone: the log says only that one was issued, for whom, until when.
    audit_call(
        request,
        service.zone.directory,
        "peer.token",
        f"peer {body.peer_name}",
        expires_at=issued.token.expires_at.isoformat(),
        addresses=issued.token.addresses,
    )
    return TokenResponse(token=issued.encoded, expires_at=issued.token.expires_at, addresses=issued.token.addresses)


@router.post(
    "/establish",
    dependencies=[Depends(require_admin)],
    status_code=status.HTTP_201_CREATED,
    responses={400: {"description": "The token is invalid"}, 502: {"description": "The acceptor refused"}},
)
async def establish_peering(body: EstablishRequest, request: Request) -> PeerStatus:
    """Redeem another zone's token (this zone dials it)."""
    service = _service(request)
    try:
        peering = await service.establish(body.token, body.name)
    except InvalidTokenError as err:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(err)) from None
    except PeeringError as err:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, str(err)) from None
    audit_call(
        request,
        service.zone.directory,
        "peer.establish",
        f"peer {peering.name}",
        zone=peering.peer_zone,
        trust_domain=peering.peer_trust_domain,
    )
    return service.peer(peering.name)


@router.delete("/{name}", dependencies=[Depends(require_admin)], status_code=status.HTTP_204_NO_CONTENT)
async def delete_peering(name: str, request: Request) -> Response:
    """Tear the peering down on both sides and remove its imports."""
    service = _service(request)
    try:
        await service.delete(name)
    except PeeringError:
        raise _not_found(name) from None
    audit_call(request, service.zone.directory, "peer.delete", f"peer {name}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/refresh", dependencies=[Depends(require_admin)], status_code=status.HTTP_204_NO_CONTENT)
async def refresh(request: Request) -> Response:
    """Pick up peerings changed in the store (the service also polls every second)."""
    service = _service(request)
    await service.refresh()
    audit_call(request, service.zone.directory, "peer.refresh", f"zone {service.zone.name}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


__all__ = ["router"]
