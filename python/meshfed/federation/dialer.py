"""The dialer's half of a peering: redeeming a token at the acceptor, then keeping the stream up.

:func:`establish` runs once, where the operator peers (``meshfed peer
establish``, ``POST /v1/peerings``, :meth:`PeeringService.establish`): it
redeems the token at the acceptor's establishment port (server-only TLS) and
stores the peering. :func:`dial_forever` runs in the zone's peering service
for each peering this zone dials: it connects to the acceptor's stream port
(mutual TLS) and reconnects with exponential backoff and jitter.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from meshfed.clock import SYSTEM_CLOCK, Clock
from meshfed.errors import InvalidTokenError, MeshfedError, PeeringError
from meshfed.federation._proto import peering_pb2 as pb
from meshfed.federation._proto import peering_pb2_grpc as pb_grpc
from meshfed.federation.identity import federation_host, probe_acceptor
from meshfed.federation.link import PeerLink, describe_stream_error
from meshfed.federation.peer_trust import refuse_trust_owned_elsewhere
from meshfed.federation.peering_names import check_peering_name
from meshfed.federation.peering_state import Peering, PeerState
from meshfed.federation.peering_store import PeeringStore
from meshfed.federation.stream import Session
from meshfed.federation.token import decode_token
from meshfed.trust.bundle import TrustBundle, parse_bundle
from meshfed.trust.spiffe import TrustDomain
from meshfed.zone import Zone

# The peering service's one logger, whichever of its modules logs: log lines keep their logger name.
log = logging.getLogger("meshfed.federation.service")

ESTABLISH_TIMEOUT = 10.0
# grpc credentials for the stream to one peer, by its trust domain (see PeeringServer.client_credentials).
ClientCredentials = Callable[[str], grpc.ChannelCredentials]


async def dial_forever(link: PeerLink, credentials: ClientCredentials, backoff: tuple[float, float]) -> None:
    """Keep ``link``'s stream up until the link stops, trying its peer's addresses in turn."""
    attempt = 0
    base, cap = backoff
    while not link.stopped:
        address = link.peer_addresses[attempt % len(link.peer_addresses)]
        session: Session | None = None
        try:
            channel_credentials = credentials(link.peer_trust_domain)
            options = [("grpc.ssl_target_name_override", federation_host(link.peer_trust_domain))]
            async with grpc.aio.secure_channel(address, channel_credentials, options=options) as channel:
                call: Any = pb_grpc.PeeringStreamStub(channel).Stream()  # type: ignore[no-untyped-call]
                session = Session(link, call.read, call.write)
                await link.run_session(session)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as err:
            log.warning("peer %s at %s: %s", link.name, address, describe_stream_error(err, link.peer_trust_domain))
        except MeshfedError as err:
            log.warning("peer %s at %s: %s", link.name, address, describe_stream_error(err))
        except Exception:
            log.exception("peer %s: stream failed", link.name)
        if link.stopped:
            return
        attempt = 1 if session is not None and session.said_hello else attempt + 1
        # Full jitter keeps many dialers from reconnecting in lockstep after an acceptor restarts.
        delay = min(cap, base * 2 ** min(attempt, 16)) * random.uniform(0.5, 1.0)  # noqa: S311
        await asyncio.sleep(delay)


async def establish(
    zone: Zone,
    token_text: str,
    name: str | None = None,
    *,
    stream_addresses: Sequence[str] | None = None,
    timeout: float = ESTABLISH_TIMEOUT,
    clock: Clock = SYSTEM_CLOCK,
) -> Peering:
    """The dialer's half: redeem ``token_text`` at the acceptor and store the peering (ESTABLISHING).

    Nothing is stored unless the acceptor accepted. The stream starts when
    this zone's controller runs (a running one picks the peering up within a
    second). The token's expiry is checked against ``clock``.
    """
    token = decode_token(token_text)
    now = clock.now()
    if token.expired(now):
        raise InvalidTokenError(f"this peering token expired at {token.expires_at.isoformat()}; ask for a new one")
    if token.trust_domain == str(zone.trust_domain) or token.zone == zone.name:
        raise InvalidTokenError(
            f"this token was issued by zone {token.zone} itself; run establish on zone {token.peer_name}"
        )
    if token.peer_name != zone.name:
        raise InvalidTokenError(
            f"this token was issued for zone {token.peer_name!r}, not {zone.name!r}; "
            f"ask zone {token.zone} for 'meshfed peer token --peer {zone.name}'"
        )
    try:
        peer_domain = TrustDomain.parse(token.trust_domain)
        ca_bundle = parse_bundle(peer_domain, token.ca_bundle.encode())
    except MeshfedError as err:
        raise InvalidTokenError(f"the token's CA bundle is unusable ({err}); copy the token again") from None
    name = check_peering_name(name or token.zone)
    with PeeringStore.of(zone, clock=clock) as store:
        existing = store.get(name)
        if existing is not None and existing.state is not PeerState.TERMINATED:
            raise PeeringError(
                f"a peering named {name!r} already exists ({existing.state}); "
                f"'meshfed peer delete {name}' first, or choose another --name"
            )
        held = store.by_trust_domain(peer_domain.name)
        if held is not None and held.state is not PeerState.TERMINATED:
            raise PeeringError(
                f"this zone already peers with {peer_domain} as {held.name!r}; 'meshfed peer delete {held.name}' first"
            )
        for old in (existing, held):
            if old is not None and old.delete_requested:
                raise PeeringError(
                    f"peering {old.name!r} is being deleted; once the running zone has told the peer "
                    "('meshfed up' if it is not running) peer again"
                )
        if stream_addresses is None:
            listener = store.listener()
            stream_addresses = listener.stream_addresses if listener else ()
    refuse_trust_owned_elsewhere(zone, peer_domain)
    request = pb.EstablishRequest(
        secret=token.secret,
        peer_name=token.peer_name,
        zone=zone.name,
        trust_domain=str(zone.trust_domain),
        bundle=zone.trust.own_bundle().to_spiffe_json(),
        stream_addresses=list(stream_addresses),
    )
    response = await _redeem(token.addresses, ca_bundle, request, timeout)
    if response.trust_domain != peer_domain.name:
        raise PeeringError(f"the acceptor answered as {response.trust_domain}, but the token is for {peer_domain}")
    peer_bundle = parse_bundle(peer_domain, response.bundle)
    if not response.stream_addresses:
        raise PeeringError(f"zone {response.zone} sent no stream address; is its peering service configured?")
    await asyncio.to_thread(zone.trust.import_bundle, peer_bundle, "peering")
    established = Peering(
        name=name,
        role="dialer",
        state=PeerState.ESTABLISHING,
        created_at=now,
        updated_at=now,
        peer_zone=response.zone,
        peer_trust_domain=peer_domain.name,
        peer_addresses=tuple(response.stream_addresses),
    )
    with PeeringStore.of(zone, clock=clock) as store:
        # A TERMINATED peering of that name or trust domain (its imports and trust already gone) makes way.
        store.replace_terminated(name, peer_domain.name)
        store.put(established)
    return established


async def _redeem(
    addresses: Sequence[str], ca_bundle: TrustBundle, request: pb.EstablishRequest, timeout: float
) -> pb.EstablishResponse:
    failures: list[str] = []
    roots = ca_bundle.to_pem()
    for address in addresses:
        try:
            await asyncio.to_thread(probe_acceptor, address, roots, ca_bundle.trust_domain, timeout)
        except PeeringError as err:
            failures.append(str(err))
            continue
        options = [("grpc.ssl_target_name_override", federation_host(ca_bundle.trust_domain))]
        async with grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(roots), options=options) as channel:
            try:
                response: pb.EstablishResponse = await pb_grpc.PeeringEstablishmentStub(channel).Establish(  # type: ignore[no-untyped-call]
                    request, timeout=timeout
                )
            except grpc.aio.AioRpcError as err:
                if err.code() is grpc.StatusCode.PERMISSION_DENIED:
                    raise InvalidTokenError(
                        f"zone {ca_bundle.trust_domain} refused the token: {err.details()}"
                    ) from None
                if err.code() is grpc.StatusCode.FAILED_PRECONDITION:
                    raise PeeringError(f"zone {ca_bundle.trust_domain} refused the peering: {err.details()}") from None
                failures.append(f"{address}: {err.code().name} {err.details()}")
                continue
            return response
    raise PeeringError("; ".join(failures) or "the token lists no address")


__all__ = ["ESTABLISH_TIMEOUT", "ClientCredentials", "dial_forever", "establish"]
