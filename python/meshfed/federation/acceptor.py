"""The acceptor's half of a peering: redeeming tokens, then taking the dialer's stream.

A dialer redeems a token this zone issued on the establishment port
(:class:`EstablishmentServicer`, :func:`accept`), then opens the stream on the
stream port (:class:`StreamServicer`), authenticated by its controller SVID and
run on its peering's link. What they need of the zone's peering service is
:class:`AcceptorHost`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import grpc

from meshfed.clock import Clock
from meshfed.errors import InvalidTokenError, MeshfedError, PeeringError
from meshfed.federation._proto import peering_pb2 as pb
from meshfed.federation._proto import peering_pb2_grpc as pb_grpc
from meshfed.federation.identity import authenticate_peer
from meshfed.federation.link import MAX_BUNDLE_BYTES, PeerLink
from meshfed.federation.peer_trust import refuse_trust_owned_elsewhere
from meshfed.federation.peering_state import Peering, PeerState
from meshfed.federation.peering_store import PeeringStore
from meshfed.federation.stream import Session
from meshfed.trust.bundle import TrustBundle, parse_bundle
from meshfed.trust.spiffe import TrustDomain
from meshfed.zone import Zone

# The peering service's one logger, whichever of its modules logs: log lines keep their logger name.
log = logging.getLogger("meshfed.federation.service")


class AcceptorHost(Protocol):
    """What the acceptor's half asks of the peering service (:class:`PeeringService` is one)."""

    @property
    def zone(self) -> Zone: ...

    def peerings(self) -> AbstractContextManager[PeeringStore]:
        """The peering store, for one block without an await."""
        ...

    @property
    def clock(self) -> Clock:
        """What the acceptor reads the time from (its store reads the same)."""
        ...

    @property
    def stream_addresses(self) -> Sequence[str]: ...

    @property
    def on_trust_changed(self) -> Callable[[], Awaitable[None]]: ...

    async def refresh(self) -> None: ...

    def link_for_caller(self, trust_domain: str) -> PeerLink | None: ...

    def bundle_of_live_peer(self, trust_domain: TrustDomain) -> TrustBundle | None: ...


async def accept(host: AcceptorHost, request: pb.EstablishRequest) -> pb.EstablishResponse:
    """Redeem a token (the acceptor's half of establishment)."""
    zone = host.zone
    with host.peerings() as store:
        pending = store.redeem_token(request.secret, dialer_zone=request.zone)
        if request.peer_name != pending.name:
            raise InvalidTokenError(
                f"the token names peer {request.peer_name!r}, its secret belongs to {pending.name!r}"
            )
        trust_domain = TrustDomain.parse(request.trust_domain)
        if trust_domain == zone.trust_domain:
            raise InvalidTokenError(
                "a zone cannot peer with its own trust domain; this token was presented to its issuer"
            )
        # A TERMINATED peering with this trust domain (the peer ended it) gives way to the new one.
        store.replace_terminated(pending.name, trust_domain.name)
        clash = store.by_trust_domain(trust_domain.name)
        if clash is not None:
            raise PeeringError(f"this zone already peers with {trust_domain} as {clash.name!r}")
        refuse_trust_owned_elsewhere(zone, trust_domain)
        if len(request.bundle) > MAX_BUNDLE_BYTES:
            raise PeeringError(f"the dialer's bundle is {len(request.bundle)} bytes; the limit is {MAX_BUNDLE_BYTES}")
        bundle = parse_bundle(trust_domain, request.bundle)
        now = host.clock.now()
        established = Peering(
            name=pending.name,
            role="acceptor",
            state=PeerState.ESTABLISHING,
            created_at=pending.created_at,
            updated_at=now,
            peer_zone=request.zone,
            peer_trust_domain=trust_domain.name,
            peer_addresses=tuple(request.stream_addresses),
        )
        # Spent (with the peering stored) before any trust is added: of concurrent redemptions of one
        # token, exactly one gets here, so no trust domain is ever trusted without a peering owning it.
        store.spend_token(request.secret, established)
    try:
        await asyncio.to_thread(zone.trust.import_bundle, bundle, "peering")
    except BaseException:
        with host.peerings() as store:
            store.delete(established.name)
        raise
    await host.refresh()
    await host.on_trust_changed()
    log.info("zone %s accepted peering %s (%s)", zone.name, established.name, trust_domain)
    return pb.EstablishResponse(
        zone=zone.name,
        trust_domain=str(zone.trust_domain),
        bundle=zone.trust.own_bundle().to_spiffe_json(),
        stream_addresses=host.stream_addresses,
    )


class EstablishmentServicer(pb_grpc.PeeringEstablishmentServicer):
    """``PeeringEstablishment/Establish``: a token refused is PERMISSION_DENIED, a peering FAILED_PRECONDITION."""

    def __init__(self, host: AcceptorHost) -> None:
        self._host = host

    async def Establish(  # noqa: N802 -- the gRPC method name
        self, request: pb.EstablishRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.EstablishResponse:
        try:
            return await accept(self._host, request)
        except InvalidTokenError as err:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
        except MeshfedError as err:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        raise AssertionError("unreachable: abort raises")


class StreamServicer(pb_grpc.PeeringStreamServicer):
    """``PeeringStream/Stream``: a live peer's dialer, authenticated, runs its session on its link."""

    def __init__(self, host: AcceptorHost) -> None:
        self._host = host

    async def Stream(  # noqa: N802 -- the gRPC method name
        self, request_iterator: object, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        host = self._host
        try:
            caller = authenticate_peer(context.auth_context(), host.bundle_of_live_peer)
        except PeeringError as err:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(err))
        link = host.link_for_caller(caller.trust_domain.name)
        if link is None:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"zone {host.zone.name} has no live peering with {caller.trust_domain}",
            )
        assert link is not None
        session = Session(link, context.read, context.write)
        try:
            await link.run_session(session)
        except MeshfedError as err:
            log.info("peer %s: stream ended: %s", link.name, err)


__all__ = ["AcceptorHost", "EstablishmentServicer", "StreamServicer", "accept"]
