"""The peering service's gRPC server, and the controller SVID and roots its TLS presents.

One grpc.aio server listens on two ports (grpcio credentials either require a
client certificate or never ask for one):

* ``establish_address`` — server-only TLS; ``PeeringEstablishment/Establish``
  redeems a token. These are the addresses a token carries.
* ``listen_address`` — mutual TLS with controller SVIDs;
  ``PeeringStream/Stream``. The server's root pool holds the roots of every
  live peer and is swapped at run time (``dynamic_ssl_server_credentials``);
  each caller is then verified again against its own trust domain's bundle.

The controller SVID is renewed before it expires, and follows CA rotations
only as fast as the live peers confirm the new bundle (see
:meth:`PeeringServer._presented_generation`). Dialers present the same SVID
(:meth:`PeeringServer.client_credentials`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc

from meshfed import defaults
from meshfed.addresses import HostPort, parse_host_port
from meshfed.errors import PeeringError
from meshfed.federation._proto import peering_pb2_grpc as pb_grpc
from meshfed.federation.identity import issue_controller_svid, needs_renewal
from meshfed.federation.peer_trust import held_bundle
from meshfed.trust.ca import Svid
from meshfed.trust.spiffe import TrustDomain
from meshfed.zone import Zone

# The peering service's one logger, whichever of its modules logs: log lines keep their logger name.
log = logging.getLogger("meshfed.federation.service")

_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]", ""})  # noqa: S104 -- recognised, not bound

# The trust domains of the live peerings: the stream port's root pool.
LiveTrustDomains = Callable[[], set[str]]
# The live peers that have not confirmed our bundle at this sequence, by name.
PeersBehind = Callable[[int], list[str]]


class PeeringServer:
    """The two ports of the peering service, and the credentials both ends of its streams present."""

    def __init__(
        self,
        zone: Zone,
        *,
        live_trust_domains: LiveTrustDomains,
        peers_behind: PeersBehind,
        listen_address: str = defaults.PEERING_ADDRESS,
        establish_address: str = defaults.ESTABLISH_ADDRESS,
        advertise_host: str | None = None,
    ) -> None:
        self._zone = zone
        self._live_trust_domains = live_trust_domains
        self._peers_behind = peers_behind
        self._listen_address = listen_address
        self._establish_address = establish_address
        self._advertise_host = advertise_host
        self.stream_addresses: list[str] = []
        self.establish_addresses: list[str] = []
        self._server: grpc.aio.Server | None = None
        self._svid: Svid | None = None
        # The CA generation the controller SVID came from (None: a zone that never rotated).
        self._svid_generation: int | None = None
        # grpc calls the credential fetchers on its own threads, once per handshake.
        self._credentials_lock = threading.Lock()
        self._stream_config: Any = None
        self._establish_config: Any = None
        self._served: dict[str, Any] = {}
        self._credentials_key: tuple[bytes, bytes] | None = None

    async def start(
        self, establishment: pb_grpc.PeeringEstablishmentServicer, stream: pb_grpc.PeeringStreamServicer
    ) -> None:
        """Issue the controller SVID, then serve ``establishment`` and ``stream`` on their ports."""
        self._svid = await asyncio.to_thread(self._issue_svid)
        self.rebuild_credentials()
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_PeeringEstablishmentServicer_to_server(establishment, server)  # type: ignore[no-untyped-call]
        pb_grpc.add_PeeringStreamServicer_to_server(stream, server)  # type: ignore[no-untyped-call]
        stream_port = self._listen(
            server,
            self._listen_address,
            grpc.dynamic_ssl_server_credentials(
                self._stream_config, self._fetch_stream_config, require_client_authentication=True
            ),
        )
        establish_port = self._listen(
            server,
            self._establish_address,
            grpc.dynamic_ssl_server_credentials(
                self._establish_config, self._fetch_establish_config, require_client_authentication=False
            ),
        )
        await server.start()
        self._server = server
        self.stream_addresses = [self._advertised(self._listen_address, stream_port)]
        self.establish_addresses = [self._advertised(self._establish_address, establish_port)]

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=0.2)
            self._server = None

    def _listen(self, server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials) -> int:
        # grpc raises a bare RuntimeError (or returns 0, in older versions) when it cannot bind.
        try:
            port = server.add_secure_port(address, credentials)
        except RuntimeError:
            port = 0
        if not port:
            raise PeeringError(
                f"zone {self._zone.name}: the peering service cannot listen on {address}; is another zone or "
                "program using the port?"
            )
        return port

    def _advertised(self, listen: str, port: int) -> str:
        host = parse_host_port(listen, what="peering listen address", allow_zero=True).host
        if self._advertise_host:
            host = self._advertise_host
        elif host in _WILDCARD_HOSTS:
            # Only meaningful on one machine: a peer elsewhere would dial itself.
            log.warning(
                "zone %s: peering listens on %s without --advertise-host, so tokens and peers are told "
                "127.0.0.1:%d; set --advertise-host to the name or address other zones reach this host at",
                self._zone.name,
                listen,
                port,
            )
            host = "127.0.0.1"
        return str(HostPort(host, port))

    # -- credentials -------------------------------------------------------

    def client_credentials(self, peer_trust_domain: str) -> grpc.ChannelCredentials:
        """mTLS to one peer: our controller SVID, and only that peer's roots."""
        bundle = held_bundle(self._zone, TrustDomain(peer_trust_domain))
        if bundle is None or not bundle.roots:
            raise PeeringError(f"no bundle for {peer_trust_domain}; re-establish the peering")
        svid = self.current_svid()
        return grpc.ssl_channel_credentials(bundle.to_pem(), svid.private_key_pem(), svid.cert_chain_pem())

    def _presented_generation(self) -> int | None:
        """The CA generation our controller SVID must come from so that every live peer can verify it.

        After a rotation activates a new CA, a peer that has not confirmed our
        newest bundle (it was offline through the overlap) trusts only the old
        root, and the new root reaches it only over a stream that would need it.
        So while any live peer is behind and the old CA still retires (its root
        stays in our bundle meanwhile), the SVID comes from the old CA; once
        every peer confirmed, from the new one. If the old root retired before a
        peer came back, that peer cannot verify us: its dial errors say so.
        """
        generations = self._zone.authority.generations()
        active = next((g.generation for g in generations if g.state == "active"), None)
        retiring = [g.generation for g in generations if g.state == "retiring"]
        if not retiring:
            return active
        behind = self._peers_behind(self._zone.trust.own_bundle().sequence)
        if not behind:
            return active
        if active != self._svid_generation:
            log.info(
                "zone %s: presenting the retiring CA's controller SVID until peer(s) %s confirm the new bundle",
                self._zone.name,
                ", ".join(behind),
            )
        return max(retiring)

    def _issue_svid(self) -> Svid:
        generation = self._presented_generation()
        svid = issue_controller_svid(self._zone, generation=generation)
        self._svid_generation = generation
        return svid

    def current_svid(self) -> Svid:
        """The controller SVID, renewed first when it nears expiry or the CA it must come from changed."""
        if self._svid is None or needs_renewal(self._svid) or self._presented_generation() != self._svid_generation:
            self._svid = self._issue_svid()
            self.rebuild_credentials()
        return self._svid

    def rebuild_credentials(self) -> None:
        """Serve the current SVID, and the roots of the live peers on the stream port (kept if unchanged)."""
        svid = self._svid
        assert svid is not None
        live = self._live_trust_domains()
        bundles = [s.bundle for s in self._zone.trust.trusted_bundles() if s.bundle.trust_domain.name in live]
        # A pool may not be empty; with no peers, our own roots stand in (no peering matches our own domain).
        roots = b"".join(b.to_pem() for b in bundles if b.roots) or self._zone.trust.own_bundle().to_pem()
        pair = [(svid.private_key_pem(), svid.cert_chain_pem())]
        key = (pair[0][1], roots)
        if key == self._credentials_key:
            return  # unchanged: handshakes keep the configs they have
        with self._credentials_lock:
            self._credentials_key = key
            self._stream_config = grpc.ssl_server_certificate_configuration(pair, roots)
            self._establish_config = grpc.ssl_server_certificate_configuration(pair)

    def _fetch_stream_config(self) -> Any:
        return self._fetch("stream", self._stream_config)

    def _fetch_establish_config(self) -> Any:
        return self._fetch("establish", self._establish_config)

    def _fetch(self, port: str, config: Any) -> Any:
        with self._credentials_lock:
            if self._served.get(port) is config:
                return None
            self._served[port] = config
            return config


__all__ = ["PeeringServer"]
