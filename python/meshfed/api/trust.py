"""Trust routes under ``/v1/trust``: the zone's bundle, what it trusts, imports, removals, rotation, federation.

The zone's own bundle is open (public by design); the listing of what it trusts
needs a token of the zone, and every change the admin token. Errors are 400 with
the same one-line message the CLI prints. Private keys never appear in any response.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from pydantic import BaseModel, Field

from meshfed.api.auth import audit_call, require_admin, require_reader
from meshfed.errors import TrustError
from meshfed.federation.trust_removal import remove_trust
from meshfed.trust.bundle import parse_bundle
from meshfed.trust.spiffe import SpiffeId, TrustDomain
from meshfed.zone import Zone
from meshfed.zone.trust_listing import (
    federation_added,
    imported_bundle,
    removed_trust,
    rotation_ended,
    rotation_started,
    trust_listing,
)

router = APIRouter(prefix="/v1/trust", tags=["trust"])

_SPIFFE_JSON = "application/json"


class RotationRequest(BaseModel):
    overlap_seconds: int | None = Field(
        default=None, ge=0, le=366 * 86400, description="Default: 3x the bundle's refresh hint; at most a year."
    )
    finish: bool = Field(
        default=False,
        description="End the rotation in progress now: its new CA signs at once and the old root leaves the bundle "
        "(after a key compromise).",
    )
    abort: bool = Field(default=False, description="Drop the new CA of the rotation in progress before it signs.")


class FederationRequest(BaseModel):
    trust_domain: str
    endpoint_url: str
    profile: Literal["https_web", "https_spiffe"]
    endpoint_spiffe_id: str | None = None
    bootstrap_bundle: str | None = Field(default=None, description="SPIFFE bundle JSON or PEM roots.")
    web_ca_pem: str | None = None


def _zone(request: Request) -> Zone:
    zone: Zone = request.app.state.controller.zone
    return zone


@router.get("/bundle", response_class=Response, responses={200: {"content": {_SPIFFE_JSON: {}}}})
async def own_bundle(request: Request) -> Response:
    """This zone's bundle in the SPIFFE format (what peers import)."""
    bundle = await asyncio.to_thread(_zone(request).trust.own_bundle)
    return Response(bundle.to_spiffe_json(), media_type=_SPIFFE_JSON)


@router.get("/bundles", dependencies=[Depends(require_reader)])
async def trusted_bundles(request: Request) -> dict[str, Any]:
    """Every trusted trust domain (sequence, roots, expiry, last refresh, source) and the rotation phases."""
    return await asyncio.to_thread(trust_listing, _zone(request), dt.datetime.now(dt.UTC))


# The body is read raw: a bundle is SPIFFE JSON or PEM, and parse_bundle is its one parser (FastAPI would
# decode a body sent as application/json, the bundle's own type, into a dict and refuse it as not bytes).
_BUNDLE_BODY = {
    "requestBody": {
        "required": True,
        "content": {_SPIFFE_JSON: {"schema": {"type": "object"}}, "application/x-pem-file": {"schema": {}}},
    }
}


@router.put(
    "/bundles/{trust_domain}",
    dependencies=[Depends(require_admin)],
    status_code=status.HTTP_200_OK,
    openapi_extra=_BUNDLE_BODY,
)
async def import_bundle(request: Request, trust_domain: str) -> dict[str, Any]:
    """Trust ``trust_domain`` with this bundle (SPIFFE JSON or PEM), replacing its earlier one."""
    body = await request.body()
    zone = _zone(request)
    try:
        bundle = parse_bundle(TrustDomain.parse(trust_domain), body)
        await asyncio.to_thread(zone.trust.import_bundle, bundle)
    except TrustError as err:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(err)) from None
    audit_call(request, zone.directory, "trust.import", bundle.trust_domain.name, sequence=bundle.sequence)
    await _trust_changed(request)
    return imported_bundle(bundle)


@router.post("/rotate", dependencies=[Depends(require_admin)])
async def rotate(request: Request, rotation: RotationRequest) -> dict[str, Any]:
    """Start a CA rotation (the new root is published now and signs after the overlap), or end one early.

    ``finish`` retires the old CA now (after a key compromise); ``abort`` drops a new CA that does not sign
    yet. A zone whose root key is offline rotates only with the CLI on its host (``--root-key``).
    """
    zone = _zone(request)
    if rotation.finish or rotation.abort:
        return await _end_rotation(request, zone, rotation)
    overlap = dt.timedelta(seconds=rotation.overlap_seconds) if rotation.overlap_seconds is not None else None
    try:
        if await asyncio.to_thread(zone.authority.root_key_offline):
            raise TrustError(
                f"zone {zone.name} keeps its root key offline, and it never travels to the API: rotate on the "
                "zone's host with 'meshfed trust rotate --root-key FILE' (or --offline-root-key NEWFILE)"
            )
        generation = await asyncio.to_thread(zone.authority.rotate, overlap)
    except TrustError as err:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(err)) from None
    audit_call(request, zone.directory, "trust.rotate", str(zone.trust_domain), generation=generation.generation)
    await _trust_changed(request)
    return rotation_started(generation)


async def _end_rotation(request: Request, zone: Zone, rotation: RotationRequest) -> dict[str, Any]:
    if (rotation.finish and rotation.abort) or rotation.overlap_seconds is not None:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, "give one of finish or abort, and no overlap_seconds with either"
        )
    try:
        steps = await asyncio.to_thread(zone.authority.finish if rotation.finish else zone.authority.abort)
    except TrustError as err:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(err)) from None
    action = "trust.rotate.finish" if rotation.finish else "trust.rotate.abort"
    sequence = (await asyncio.to_thread(zone.trust.own_bundle)).sequence
    audit_call(request, zone.directory, action, str(zone.trust_domain), bundle_sequence=sequence)
    await _trust_changed(request)
    endpoint = getattr(request.app.state, "bundle_endpoint", None)
    if endpoint is not None and rotation.finish:
        # Consumers that take the new bundle must reach the endpoint at once, not after its next check.
        await endpoint.renew_if_signer_retired()
    return rotation_ended(sequence, steps)


@router.post("/federations", dependencies=[Depends(require_admin)], status_code=status.HTTP_201_CREATED)
async def federate(request: Request, federation: FederationRequest) -> dict[str, Any]:
    """Federate with a trust domain's bundle endpoint: fetched at once, then at the refresh hint it announces."""
    zone = _zone(request)
    try:
        domain = TrustDomain.parse(federation.trust_domain)
        bootstrap = parse_bundle(domain, federation.bootstrap_bundle.encode()) if federation.bootstrap_bundle else None
        endpoint_id = SpiffeId.parse(federation.endpoint_spiffe_id) if federation.endpoint_spiffe_id else None
        await asyncio.to_thread(
            lambda: zone.trust.federate(
                domain,
                federation.endpoint_url,
                federation.profile,
                endpoint_spiffe_id=endpoint_id,
                bootstrap_bundle=bootstrap,
                web_ca_pem=federation.web_ca_pem,
            )
        )
    except TrustError as err:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(err)) from None
    audit_call(request, zone.directory, "trust.federate", domain.name, endpoint_url=federation.endpoint_url)
    if bootstrap is not None:
        await _trust_changed(request)
    poller = getattr(request.app.state, "bundle_poller", None)
    if poller is not None:
        poller.wake()  # the first fetch now, not at the next poll
    return federation_added(domain.name, federation.endpoint_url, federation.profile)


@router.delete(
    "/bundles/{trust_domain}",
    dependencies=[Depends(require_admin)],
    responses={400: {"description": "The zone's own domain, a peer's, or one it does not trust"}},
)
async def remove_bundle(request: Request, trust_domain: str) -> dict[str, Any]:
    """Stop trusting an imported or federated trust domain: its bundle and any federation with it go."""
    return await _remove(request, trust_domain, federation_only=False)


@router.delete(
    "/federations/{trust_domain}",
    dependencies=[Depends(require_admin)],
    responses={400: {"description": "No federation with that domain, or a peer's domain"}},
)
async def remove_federation(request: Request, trust_domain: str) -> dict[str, Any]:
    """Stop federating with a trust domain: the relationship and the bundle it fetched go (an imported one stays)."""
    return await _remove(request, trust_domain, federation_only=True)


async def _remove(request: Request, trust_domain: str, *, federation_only: bool) -> dict[str, Any]:
    zone = _zone(request)
    try:
        domain = TrustDomain.parse(trust_domain)
        removed = await asyncio.to_thread(lambda: remove_trust(zone, domain, federation_only=federation_only))
    except TrustError as err:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(err)) from None
    action = "trust.federation.remove" if federation_only else "trust.remove"
    audit_call(request, zone.directory, action, domain.name, bundle=removed.bundle, federation=removed.federation)
    await _trust_changed(request)
    return removed_trust(removed)


async def _trust_changed(request: Request) -> None:
    # Push the new pools to the running gateway now rather than at the rotation service's next check.
    reconfigure = getattr(request.app.state.controller, "reconfigure", None)
    if reconfigure is not None and getattr(request.app.state.controller, "ready", False):
        await reconfigure()


__all__ = ["router"]
