"""The peering service of a zone's controller: establishment server, stream server and dialer.

One grpc.aio server listens on two ports (grpcio credentials either require a
client certificate or never ask for one):

* ``establish_address`` — server-only TLS; ``PeeringEstablishment/Establish``
  redeems a token. These are the addresses a token carries.
* ``listen_address`` — mutual TLS with controller SVIDs;
  ``PeeringStream/Stream``. The server's root pool holds the roots of every
  live peer and is swapped at run time (``dynamic_ssl_server_credentials``);
  each caller is then verified again against its own trust domain's bundle.

The dialing side of each peering runs a reconnect loop (exponential backoff
with jitter); the accepting side waits for the dialer.

Pick-up of CLI changes: the CLI writes the store (``meshfed peer establish``,
``meshfed peer delete``) and this service polls it every
``store_poll_interval`` seconds (and on :meth:`PeeringService.refresh`, which
``POST /v1/peerings/refresh`` calls). The poll also renews a lease in the
store, which tells the CLI whether the zone is running.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import logging
import random
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from meshfed.addresses import HostPort, parse_host_port
from meshfed.errors import InvalidTokenError, MeshfedError, PeeringError, PeerInputError
from meshfed.federation import wire
from meshfed.federation._proto import peering_pb2 as pb
from meshfed.federation._proto import peering_pb2_grpc as pb_grpc
from meshfed.federation.exchange import MAX_VERSION, ServiceSnapshot
from meshfed.federation.identity import (
    authenticate_peer,
    federation_host,
    issue_controller_svid,
    needs_renewal,
    probe_acceptor,
)
from meshfed.federation.peer_status import PeerStatus
from meshfed.federation.peering import (
    LIVE_STATES,
    IssuedToken,
    Peering,
    PeeringStore,
    PeerState,
    check_peering_name,
)
from meshfed.federation.stream import CAPABILITIES, PeerTerminatedError, Session
from meshfed.federation.token import DEFAULT_TOKEN_TTL, decode_token
from meshfed.supervisor import Component, Supervisor
from meshfed.trust.bundle import TrustBundle, newest, parse_bundle
from meshfed.trust.ca import Svid
from meshfed.trust.spiffe import TrustDomain
from meshfed.zone import Zone

log = logging.getLogger(__name__)

ExportsOf = Callable[[str], ServiceSnapshot]
ImportProblem = Callable[[str], str | None]
OnImports = Callable[[str, ServiceSnapshot], Awaitable[None]]
OnTrustChanged = Callable[[], Awaitable[None]]
OnPeerState = Callable[[str, PeerState], Awaitable[None]]

# Peers in other clusters dial these, so they listen on every interface by default.
DEFAULT_LISTEN_ADDRESS = "0.0.0.0:15440"
DEFAULT_ESTABLISH_ADDRESS = "0.0.0.0:15441"
ESTABLISH_TIMEOUT = 10.0
# Deltas can be made from this many recent versions; an older ack gets a full snapshot.
HISTORY_DEPTH = 16
# A peer's announced heartbeat interval is held within these bounds (seconds): a peer announcing
# 4294967295 ms must not make itself impossible to mark FAILING.
PEER_HEARTBEAT_BOUNDS = (0.05, 60.0)


@dataclasses.dataclass(frozen=True)
class PeerLimits:
    """What one peer may make this zone hold: refused beyond, with a message naming the limit."""

    max_services: int = 10_000  # services imported from one peer
    max_listeners: int = 10_000  # egress listeners (one socket each: a service port) for one peer


# A SPIFFE bundle with a handful of roots is a few KiB; SPIRE's with JWT keys stays well under this.
MAX_BUNDLE_BYTES = 256 * 1024
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]", ""})  # noqa: S104 -- recognised, not bound


class PeerLink:
    """The running state of one live peering; at most one :class:`Session` at a time."""

    def __init__(self, service: PeeringService, peering: Peering) -> None:
        assert peering.peer_trust_domain is not None
        assert peering.peer_zone is not None
        self.service = service
        self.name = peering.name
        self.role = peering.role
        self.peer_zone = peering.peer_zone
        self.peer_trust_domain = peering.peer_trust_domain
        self.peer_addresses = peering.peer_addresses
        self.state = peering.state
        self.state_reason = peering.state_reason
        self.heartbeat_interval = service.heartbeat_interval
        self.peer_heartbeat_interval = service.heartbeat_interval
        self.sent = peering.sent_snapshot
        self.sent_version = peering.sent_version
        self.acked_version = peering.acked_version
        self.received = peering.received_snapshot
        # A stored snapshot that no longer parses counts as nothing held: the peer resends everything.
        self.received_version = peering.received_version if self.received is not None else 0
        self.sent_epoch = peering.sent_epoch
        self.received_epoch = peering.received_epoch if self.received is not None else ""
        self.refused_reason = peering.refused_reason
        self.export_error = ""
        self.peer_bundle_sequence = peering.peer_bundle_sequence
        self.held_peer_bundle_sequence = service.held_bundle_sequence(peering.peer_trust_domain)
        self._epoch_restarted = False
        self.history: collections.OrderedDict[int, ServiceSnapshot] = collections.OrderedDict()
        if self.sent is not None:
            self.history[self.sent_version] = self.sent
        self._version_sent_at: dict[int, float] = {}
        self.last_connected_at = peering.last_connected_at
        self.last_heartbeat_sent_at = peering.last_heartbeat_sent_at
        self.last_heartbeat_received_at = peering.last_heartbeat_received_at
        self.last_message_at = time.monotonic()
        self.session: Session | None = None
        self.stopped = False
        self._dialer: Component | None = None

    @property
    def connected_now(self) -> bool:
        return self.session is not None and self.session.said_hello

    def as_peering(self, stored: Peering) -> Peering:
        return dataclasses.replace(
            stored,
            state=self.state,
            state_reason=self.state_reason,
            sent_version=self.sent_version,
            sent_snapshot=self.sent,
            acked_version=self.acked_version,
            received_version=self.received_version,
            received_snapshot=self.received,
            refused_reason=self.refused_reason,
            peer_bundle_sequence=self.peer_bundle_sequence,
            last_connected_at=self.last_connected_at,
            last_heartbeat_sent_at=self.last_heartbeat_sent_at,
            last_heartbeat_received_at=self.last_heartbeat_received_at,
        )

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        if self.role == "dialer":
            self._dialer = self.service.supervisor.spawn(f"peer-{self.name}-dialer", self._dial_forever)

    async def stop(self) -> None:
        self.stopped = True
        if self._dialer is not None:
            await self._dialer.cancel()

    async def run_session(self, session: Session) -> None:
        """Run ``session`` as this link's one connection (a newer connection replaces an older one)."""
        if self.stopped:
            raise PeeringError(f"peering {self.name} is being torn down")
        previous, self.session = self.session, session
        if previous is not None:
            log.info("peer %s reconnected; replacing the previous stream", self.name)
            previous.close()
        try:
            await session.run()
        except PeerTerminatedError as err:
            await self.service.peer_terminated(self, str(err))
        except asyncio.CancelledError:
            if self.role == "acceptor":
                # grpc cancels the stream handler when the dialer's connection drops without a word:
                # the stream is lost as surely as on an error (a link being stopped ignores it).
                await self._lost(session, "the connection to the peer dropped")
            raise
        except BaseException as err:
            await self._lost(session, _describe_stream_error(err))
            raise
        else:
            await self._lost(session, "the stream ended")
        finally:
            if self.session is session:
                self.session = None

    async def _lost(self, session: Session, reason: str) -> None:
        """The stream dropped: show it at once (DISCONNECTED); FAILING follows at the heartbeat deadline."""
        if self.session is not session or self.stopped or not session.said_hello:
            return
        self.session = None
        if self.state is PeerState.ACTIVE:
            await self.set_state(PeerState.DISCONNECTED, f"{reason}; reconnecting")

    async def _dial_forever(self) -> None:
        attempt = 0
        base, cap = self.service.reconnect_backoff
        while not self.stopped:
            address = self.peer_addresses[attempt % len(self.peer_addresses)]
            session: Session | None = None
            try:
                credentials = self.service.client_credentials(self.peer_trust_domain)
                options = [("grpc.ssl_target_name_override", federation_host(self.peer_trust_domain))]
                async with grpc.aio.secure_channel(address, credentials, options=options) as channel:
                    call: Any = pb_grpc.PeeringStreamStub(channel).Stream()  # type: ignore[no-untyped-call]
                    session = Session(self, call.read, call.write)
                    await self.run_session(session)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as err:
                log.warning(
                    "peer %s at %s: %s", self.name, address, _describe_stream_error(err, self.peer_trust_domain)
                )
            except MeshfedError as err:
                log.warning("peer %s at %s: %s", self.name, address, _describe_stream_error(err))
            except Exception:
                log.exception("peer %s: stream failed", self.name)
            if self.stopped:
                return
            attempt = 1 if session is not None and session.said_hello else attempt + 1
            # Full jitter keeps many dialers from reconnecting in lockstep after an acceptor restarts.
            delay = min(cap, base * 2 ** min(attempt, 16)) * random.uniform(0.5, 1.0)  # noqa: S311
            await asyncio.sleep(delay)

    # -- called by the session --------------------------------------------

    def hello(self) -> pb.Hello:
        zone = self.service.zone
        return pb.Hello(
            zone=zone.name,
            trust_domain=str(zone.trust_domain),
            capabilities=CAPABILITIES,
            last_acked_version=self.received_version,
            last_acked_epoch=self.received_epoch,
            heartbeat_interval_ms=int(self.heartbeat_interval * 1000),
            bundle_sequence=self.held_peer_bundle_sequence,
        )

    async def connected(self, hello: pb.Hello) -> None:
        if hello.heartbeat_interval_ms:
            low, high = self.service.peer_heartbeat_bounds
            self.peer_heartbeat_interval = min(max(hello.heartbeat_interval_ms / 1000, low), high)
        self.peer_bundle_confirmed(hello.bundle_sequence)
        self.last_connected_at = dt.datetime.now(dt.UTC)
        self.last_message_at = time.monotonic()
        await self.set_state(PeerState.ACTIVE, "")

    async def message_received(self, message: pb.PeerMessage) -> None:
        self.last_message_at = time.monotonic()
        if message.WhichOneof("body") == "heartbeat":
            self.last_heartbeat_received_at = dt.datetime.now(dt.UTC)
        if self.state in (PeerState.FAILING, PeerState.DISCONNECTED):
            await self.set_state(PeerState.ACTIVE, "")

    def heartbeat_sent(self) -> None:
        self.last_heartbeat_sent_at = dt.datetime.now(dt.UTC)

    def own_bundle_json(self) -> bytes:
        return self.service.zone.own_bundle().to_spiffe_json()

    def current_exports(self) -> ServiceSnapshot:
        """What we export to the peer now, with a version that grows whenever the content changes."""
        snapshot = self.service.exports(self.name)
        if self.sent is not None and self.sent.epoch == self.sent_epoch and wire.same_content(self.sent, snapshot):
            return self.sent
        if not self.sent_epoch:
            self.sent_epoch = _new_epoch()
        version = max(snapshot.version, self.sent_version + 1)
        snapshot = snapshot.model_copy(update={"version": version, "epoch": self.sent_epoch})
        # Persisted before it is sent, so a restart never reuses a version for other content.
        self.service.store.update(self.name, sent_version=version, sent_snapshot=snapshot, sent_epoch=self.sent_epoch)
        self.sent, self.sent_version = snapshot, version
        self.history[version] = snapshot
        while len(self.history) > HISTORY_DEPTH:
            self.history.popitem(last=False)
        self._version_sent_at.setdefault(version, time.monotonic())
        return snapshot

    def peer_holds(self, epoch: str, version: int) -> int | None:
        """The version of our exports the peer holds, or None when it must get a full snapshot.

        A peer holding a version of our current epoch that we never sent means our
        history went backwards (this zone's state was restored from an older
        backup): start a new epoch, so the peer takes the next full snapshot.
        """
        if not epoch or epoch != self.sent_epoch:
            return None
        if version <= self.sent_version:
            return version
        if self._epoch_restarted:
            raise PeeringError(
                f"peer {self.name} acknowledges version {version} of export epoch {epoch[:16]}, which this zone "
                "never sent; closing the stream"
            )
        log.warning(
            "peer %s holds version %d of this zone's exports, but this zone only reached %d: its state was "
            "restored from an older backup; starting a new export epoch and resending everything",
            self.name,
            version,
            self.sent_version,
        )
        self._epoch_restarted = True
        self.sent_epoch, self.sent, self.acked_version = _new_epoch(), None, 0
        self.history.clear()
        self.service.store.update(self.name, sent_epoch=self.sent_epoch, acked_version=0)
        return None

    def export_refused(self, reason: str) -> None:
        if reason != self.export_error:
            log.error("peer %s refused this zone's exports: %s", self.name, reason)
        self.export_error = reason

    def acked(self, version: int) -> None:
        self.export_error = ""
        self.acked_version = version
        for old in [v for v in self._version_sent_at if v <= version]:
            del self._version_sent_at[old]
        self.service.store.update(self.name, acked_version=version)

    def propagation_lag(self) -> float:
        if not self._version_sent_at or self.acked_version >= self.sent_version:
            return 0.0
        return time.monotonic() - min(self._version_sent_at.values())

    def _ack(self, *, resync: bool = False) -> pb.Ack:
        return pb.Ack(version=self.received_version, epoch=self.received_epoch, resync=resync)

    async def apply_snapshot(self, message: pb.Snapshot) -> pb.Ack:
        """Apply a full snapshot; raises PeerInputError (nothing applied) when it breaks a rule or a limit."""
        if message.epoch == self.received_epoch and message.version <= self.received_version:
            return self._ack()  # a replay: applied already (or the sender went back; it starts a new epoch)
        snapshot = wire.snapshot_from_proto(message, self.peer_zone, self.peer_trust_domain)
        if self.received_epoch and snapshot.epoch != self.received_epoch:
            log.info("peer %s started a new export epoch; taking its full snapshot", self.name)
        await self._deliver(snapshot)
        return self._ack()

    async def apply_delta(self, delta: pb.Delta) -> pb.Ack:
        if delta.epoch != self.received_epoch or self.received is None:
            return self._ack(resync=True)
        if delta.version <= self.received_version:
            return self._ack()
        if delta.from_version != self.received_version:
            return self._ack(resync=True)
        await self._deliver(wire.apply_delta(self.received, delta))
        return self._ack()

    def _check_limits(self, snapshot: ServiceSnapshot) -> None:
        limits = self.service.limits
        if len(snapshot.services) > limits.max_services:
            raise PeerInputError(
                f"peer {self.name} exports {len(snapshot.services)} services to this zone, more than its limit of "
                f"{limits.max_services} (max_services per peer): ask its operator to export fewer, or raise the limit"
            )
        if snapshot.listener_count > limits.max_listeners:
            raise PeerInputError(
                f"peer {self.name}'s exports need {snapshot.listener_count} egress listeners here, more than its "
                f"limit of {limits.max_listeners} (max_listeners per peer): ask its operator to export fewer "
                "ports, or raise the limit"
            )

    async def _deliver(self, snapshot: ServiceSnapshot) -> None:
        # Checked, applied, then recorded, then acked: a crash in between re-delivers the same
        # full snapshot (harmless), never skips one; a refusal anywhere leaves everything as it was.
        self._check_limits(snapshot)
        await self.service.on_imports(self.name, snapshot)
        self.service.store.update(
            self.name,
            received_version=snapshot.version,
            received_snapshot=snapshot,
            received_epoch=snapshot.epoch,
            refused_reason="",
        )
        self.received, self.received_version, self.received_epoch = snapshot, snapshot.version, snapshot.epoch
        self.refused_reason = ""

    def refused(self, reason: str) -> pb.Ack:
        """Record why the peer's update was refused and answer with a NACK; its last good imports stay."""
        if reason != self.refused_reason:
            log.error(
                "peer %s: update refused, its imports keep version %d: %s", self.name, self.received_version, reason
            )
            self.refused_reason = reason
            self.service.store.update(self.name, refused_reason=reason)
        return pb.Ack(version=self.received_version, epoch=self.received_epoch, error=reason)

    def quarantine_reason(self) -> str:
        return self.service.import_problem(self.name) or ""

    async def apply_bundle(self, data: bytes) -> None:
        if len(data) > MAX_BUNDLE_BYTES:
            raise PeerInputError(
                f"peer {self.name} sent a bundle of {len(data)} bytes; the limit is {MAX_BUNDLE_BYTES}"
            )
        offered = parse_bundle(TrustDomain(self.peer_trust_domain), data)
        await self.service.bundle_received(offered)
        self.held_peer_bundle_sequence = self.service.held_bundle_sequence(self.peer_trust_domain)

    def bundle_refused(self, reason: str) -> None:
        log.error("peer %s sent a bundle this zone refused (the one it holds stays): %s", self.name, reason)

    def peer_bundle_confirmed(self, sequence: int) -> None:
        """The peer says it holds our bundle at ``sequence``: a rotation may now present the new CA to it."""
        # A uint64 from the peer: capped to what SQLite stores (no bundle of ours gets anywhere near it).
        sequence = min(sequence, MAX_VERSION)
        if sequence == self.peer_bundle_sequence:
            return
        self.peer_bundle_sequence = sequence
        self.service.store.update(self.name, peer_bundle_sequence=sequence)
        self.service.peer_bundle_changed()

    async def set_state(self, state: PeerState, reason: str) -> None:
        if state is self.state and reason == self.state_reason:
            return
        previous, self.state, self.state_reason = self.state, state, reason
        self.service.store.update(self.name, state=state, state_reason=reason)
        if state is not previous:
            level = logging.WARNING if state in (PeerState.DISCONNECTED, PeerState.FAILING) else logging.INFO
            log.log(level, "peer %s: %s -> %s %s", self.name, previous, state, _with_hint(state, reason, self))
            if self.service.on_peer_state is not None:
                await self.service.on_peer_state(self.name, state)

    def failure_deadline(self) -> float:
        """Seconds of silence after which the peer is FAILING."""
        return self.peer_heartbeat_interval * self.service.missed_heartbeats


class PeeringService:
    """The controller service that establishes peerings and keeps one stream per peering.

    ``exports(peer)`` is called on the event loop when a snapshot is due for
    ``peer`` (coalesced: at most once per round trip); keep it cheap.
    ``on_imports(peer, snapshot)`` receives every new version of a peer's
    exports as a full snapshot, in order, once per version; on teardown it gets
    an empty snapshot, then ``on_peer_state(peer, TERMINATED)``.
    ``on_trust_changed()`` runs after a peer's bundle is stored or replaced.
    """

    def __init__(
        self,
        zone: Zone,
        *,
        exports: ExportsOf,
        on_imports: OnImports,
        on_trust_changed: OnTrustChanged,
        on_peer_state: OnPeerState | None = None,
        import_problem: ImportProblem = lambda peer: None,
        limits: PeerLimits = PeerLimits(),
        supervisor: Supervisor | None = None,
        listen_address: str = DEFAULT_LISTEN_ADDRESS,
        establish_address: str = DEFAULT_ESTABLISH_ADDRESS,
        advertise_host: str | None = None,
        heartbeat_interval: float = 5.0,
        missed_heartbeats: int = 3,
        peer_heartbeat_bounds: tuple[float, float] = PEER_HEARTBEAT_BOUNDS,
        store_poll_interval: float = 1.0,
        reconnect_backoff: tuple[float, float] = (0.2, 10.0),
    ) -> None:
        self.zone = zone
        self.exports = exports
        self.on_imports = on_imports
        self.on_trust_changed = on_trust_changed
        self.on_peer_state = on_peer_state
        self.import_problem = import_problem
        self.limits = limits
        self.supervisor = supervisor or Supervisor(zone.name)
        self._own_supervisor = supervisor is None
        self.heartbeat_interval = heartbeat_interval
        self.missed_heartbeats = missed_heartbeats
        self.peer_heartbeat_bounds = peer_heartbeat_bounds
        self.reconnect_backoff = reconnect_backoff
        self._listen_address = listen_address
        self._establish_address = establish_address
        self._advertise_host = advertise_host
        self._store_poll_interval = store_poll_interval
        self.stream_addresses: list[str] = []
        self.establish_addresses: list[str] = []
        self._store: PeeringStore | None = None
        self._server: grpc.aio.Server | None = None
        self._svid: Svid | None = None
        # The CA generation the controller SVID came from (None: a zone that never rotated).
        self._svid_generation: int | None = None
        self._links: dict[str, PeerLink] = {}
        self._tasks: list[Component] = []
        self._own_bundle_sequence = 0
        self._reconcile_lock = asyncio.Lock()
        # grpc calls the credential fetchers on its own threads, once per handshake.
        self._credentials_lock = threading.Lock()
        self._stream_config: Any = None
        self._establish_config: Any = None
        self._served: dict[str, Any] = {}
        self._credentials_key: tuple[bytes, bytes] | None = None

    @property
    def store(self) -> PeeringStore:
        if self._store is None:
            raise PeeringError(f"zone {self.zone.name}: the peering service is not running")
        return self._store

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        self._store = PeeringStore.of(self.zone)
        self._svid = await asyncio.to_thread(self._issue_svid)
        self._own_bundle_sequence = self.zone.own_bundle().sequence
        self._rebuild_credentials()
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_PeeringEstablishmentServicer_to_server(_Establishment(self), server)  # type: ignore[no-untyped-call]
        pb_grpc.add_PeeringStreamServicer_to_server(_Stream(self), server)  # type: ignore[no-untyped-call]
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
        self.store.record_listener(self.establish_addresses, self.stream_addresses)
        await self.refresh()
        self._tasks = [
            self.supervisor.spawn("peering-poll", self._poll_store),
            self.supervisor.spawn("peering-heartbeats", self._watch_heartbeats),
        ]
        log.info(
            "zone %s peering: establish on %s, stream on %s",
            self.zone.name,
            ", ".join(self.establish_addresses),
            ", ".join(self.stream_addresses),
        )

    async def stop(self) -> None:
        for task in self._tasks:
            await task.cancel()
        self._tasks = []
        for link in list(self._links.values()):
            if link.session is not None:
                link.session.close()
            await link.stop()
        if self._server is not None:
            await self._server.stop(grace=0.2)
            self._server = None
        self._links.clear()
        if self._store is not None:
            self._store.release_lease()
            self._store.close()
            self._store = None

    def _listen(self, server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials) -> int:
        # grpc raises a bare RuntimeError (or returns 0, in older versions) when it cannot bind.
        try:
            port = server.add_secure_port(address, credentials)
        except RuntimeError:
            port = 0
        if not port:
            raise PeeringError(
                f"zone {self.zone.name}: the peering service cannot listen on {address}; is another zone or "
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
                self.zone.name,
                listen,
                port,
            )
            host = "127.0.0.1"
        return str(HostPort(host, port))

    # -- read accessors ---------------------------------------------------

    def peers(self) -> list[PeerStatus]:
        return [PeerStatus.of(p, self._links.get(p.name)) for p in self.store.peerings()]

    def peer(self, name: str) -> PeerStatus:
        return PeerStatus.of(self.store.require(name), self._links.get(name))

    # -- operations --------------------------------------------------------

    def issue_token(self, peer_name: str, ttl: dt.timedelta = DEFAULT_TOKEN_TTL) -> IssuedToken:
        return self.store.issue_token(self.zone, peer_name, self.establish_addresses, ttl)

    async def establish(self, token: str, name: str | None = None) -> Peering:
        """Dial the acceptor named by ``token`` (this zone is the dialer), then start the stream."""
        peering = await establish(self.zone, token, name, stream_addresses=self.stream_addresses)
        await self.refresh()
        return peering

    def notify_exports_changed(self) -> None:
        """Exports or the catalog changed: every connected peer gets the new snapshot (coalesced)."""
        for link in self._links.values():
            if link.session is not None:
                link.session.exports_changed()

    async def refresh(self) -> None:
        """Pick up what the CLI changed in the store now, instead of at the next poll."""
        async with self._reconcile_lock:
            peerings = self.store.peerings()
            for peering in peerings:
                if peering.delete_requested:
                    await self._teardown(peering.name, "deleted by zone " + self.zone.name, remove=True)
                elif peering.state in LIVE_STATES and peering.name not in self._links:
                    # A link resumes from the stored snapshots: the one read that parses them.
                    link = PeerLink(self, self.store.require(peering.name, snapshots=True))
                    self._links[peering.name] = link
                    link.start()
            known = {p.name for p in peerings}
            for name in [n for n in self._links if n not in known]:
                await self._links.pop(name).stop()
            self._rebuild_credentials()

    async def delete(self, name: str) -> None:
        """Tear a peering down on both sides (telling the peer if connected) and forget it."""
        self.store.require(name)
        async with self._reconcile_lock:
            await self._teardown(name, "deleted by zone " + self.zone.name, remove=True)

    # -- internals ---------------------------------------------------------

    async def _teardown(self, name: str, reason: str, *, remove: bool, notify_peer: bool = True) -> None:
        link = self._links.pop(name, None)
        if link is not None:
            session = link.session
            if notify_peer and session is not None and session.said_hello:
                session.terminate(reason)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):  # not wait_for: it can swallow a racing cancel on 3.11
                        await session.finished.wait()
            await link.stop()
        peering = self.store.get(name)
        if remove:
            self.store.delete(name)
        else:
            self.store.update(
                name, state=PeerState.TERMINATED, state_reason=reason, received_snapshot=None, connected=False
            )
        self._rebuild_credentials()
        if peering is not None and peering.peer_zone is not None and peering.peer_trust_domain is not None:
            held = link.received_version if link else peering.received_version
            epoch = link.received_epoch if link else peering.received_epoch
            if held >= MAX_VERSION:
                # A peer may have pushed its version to the largest SQLite integer: no newer version of
                # its epoch exists, so the empty snapshot opens a new one (else it reads as a replay).
                epoch = _new_epoch()
            empty = ServiceSnapshot(
                zone=peering.peer_zone,
                trust_domain=peering.peer_trust_domain,
                gateway_addresses=[],
                version=min(held + 1, MAX_VERSION),
                epoch=epoch,
            )
            await self.on_imports(name, empty)
            # The peering brought this trust domain; with it gone, its roots verify nothing here.
            if await asyncio.to_thread(self.zone.forget_peering_bundle, TrustDomain.parse(peering.peer_trust_domain)):
                await self.on_trust_changed()
        if self.on_peer_state is not None:
            await self.on_peer_state(name, PeerState.TERMINATED)
        log.info("peering %s torn down: %s", name, reason)

    async def peer_terminated(self, link: PeerLink, reason: str) -> None:
        link.stopped = True
        async with self._reconcile_lock:
            if self._links.get(link.name) is link:
                await self._teardown(link.name, f"the peer ended the peering: {reason}", remove=False)

    async def bundle_received(self, offered: TrustBundle) -> None:
        stored = next((s for s in self.zone.trusted_bundles() if s.bundle.trust_domain == offered.trust_domain), None)
        if stored is not None and stored.source != "peering":
            raise PeeringError(_trust_owned_elsewhere(offered.trust_domain, stored.source))
        held = stored.bundle if stored is not None else None
        kept = newest(held, offered)
        if kept is held:
            return
        await asyncio.to_thread(self.zone.import_bundle, kept, "peering")
        self._rebuild_credentials()
        log.info("peer bundle of %s updated to sequence %d", offered.trust_domain, kept.sequence)
        await self.on_trust_changed()

    def client_credentials(self, peer_trust_domain: str) -> grpc.ChannelCredentials:
        """mTLS to one peer: our controller SVID, and only that peer's roots."""
        bundle = self._bundle_of(TrustDomain(peer_trust_domain))
        if bundle is None or not bundle.roots:
            raise PeeringError(f"no bundle for {peer_trust_domain}; re-establish the peering")
        svid = self._current_svid()
        return grpc.ssl_channel_credentials(bundle.to_pem(), svid.private_key_pem(), svid.cert_chain_pem())

    def link_for_caller(self, trust_domain: str) -> PeerLink | None:
        link = next((lk for lk in self._links.values() if lk.peer_trust_domain == trust_domain), None)
        return link if link is not None and link.role == "acceptor" and not link.stopped else None

    def bundle_of_live_peer(self, trust_domain: TrustDomain) -> TrustBundle | None:
        if not any(link.peer_trust_domain == trust_domain.name for link in self._links.values()):
            return None
        return self._bundle_of(trust_domain)

    def _bundle_of(self, trust_domain: TrustDomain) -> TrustBundle | None:
        return next((s.bundle for s in self.zone.trusted_bundles() if s.bundle.trust_domain == trust_domain), None)

    def held_bundle_sequence(self, trust_domain: str) -> int:
        """The sequence of the bundle this zone holds for a peer's trust domain (0: none)."""
        bundle = self._bundle_of(TrustDomain(trust_domain))
        return bundle.sequence if bundle is not None else 0

    def peer_bundle_changed(self) -> None:
        """A peer confirmed a newer bundle of ours: the controller SVID may move to the new CA now."""
        self._current_svid()

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
        generations = self.zone.ca_generations()
        active = next((g.generation for g in generations if g.state == "active"), None)
        retiring = [g.generation for g in generations if g.state == "retiring"]
        if not retiring:
            return active
        newest_sequence = self.zone.own_bundle().sequence
        behind = sorted(link.name for link in self._links.values() if link.peer_bundle_sequence < newest_sequence)
        if not behind:
            return active
        if active != self._svid_generation:
            log.info(
                "zone %s: presenting the retiring CA's controller SVID until peer(s) %s confirm the new bundle",
                self.zone.name,
                ", ".join(behind),
            )
        return max(retiring)

    def _issue_svid(self) -> Svid:
        generation = self._presented_generation()
        svid = issue_controller_svid(self.zone, generation=generation)
        self._svid_generation = generation
        return svid

    def _current_svid(self) -> Svid:
        if self._svid is None or needs_renewal(self._svid) or self._presented_generation() != self._svid_generation:
            self._svid = self._issue_svid()
            self._rebuild_credentials()
        return self._svid

    def _rebuild_credentials(self) -> None:
        svid = self._svid
        assert svid is not None
        live = {p.peer_trust_domain for p in self.store.peerings() if p.state in LIVE_STATES and p.peer_trust_domain}
        bundles = [s.bundle for s in self.zone.trusted_bundles() if s.bundle.trust_domain.name in live]
        # A pool may not be empty; with no peers, our own roots stand in (no peering matches our own domain).
        roots = b"".join(b.to_pem() for b in bundles if b.roots) or self.zone.own_bundle().to_pem()
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

    async def _poll_store(self) -> None:
        while True:
            await asyncio.sleep(self._store_poll_interval)
            try:
                self.store.renew_lease()
                await self.refresh()
                self._current_svid()
                sequence = self.zone.own_bundle().sequence
                if sequence != self._own_bundle_sequence:
                    self._own_bundle_sequence = sequence
                    for link in self._links.values():
                        if link.session is not None:
                            link.session.bundle_changed()
                for link in self._links.values():
                    self.store.update(
                        link.name,
                        last_connected_at=link.last_connected_at,
                        last_heartbeat_sent_at=link.last_heartbeat_sent_at,
                        last_heartbeat_received_at=link.last_heartbeat_received_at,
                        connected=link.connected_now,
                    )
                for name in self.store.drop_expired_pending():
                    log.info("zone %s: peering %s dropped: its token expired unredeemed", self.zone.name, name)
            except MeshfedError as err:
                log.error("zone %s peering poll: %s", self.zone.name, err)

    async def _watch_heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval / 4)
            now = time.monotonic()
            for link in list(self._links.values()):
                silent = now - link.last_message_at
                if link.state in (PeerState.ACTIVE, PeerState.DISCONNECTED) and silent > link.failure_deadline():
                    await link.set_state(
                        PeerState.FAILING,
                        f"no message for {silent:.1f}s (heartbeats every {link.peer_heartbeat_interval:g}s)",
                    )
                    # A half-open connection would never error; drop it so the dialer reconnects.
                    if link.session is not None:
                        link.session.close()

    async def accept(self, request: pb.EstablishRequest) -> pb.EstablishResponse:
        """Redeem a token (the acceptor's half of establishment)."""
        store = self.store
        pending = store.redeem_token(request.secret, dialer_zone=request.zone)
        if request.peer_name != pending.name:
            raise InvalidTokenError(
                f"the token names peer {request.peer_name!r}, its secret belongs to {pending.name!r}"
            )
        trust_domain = TrustDomain.parse(request.trust_domain)
        if trust_domain == self.zone.trust_domain:
            raise InvalidTokenError(
                "a zone cannot peer with its own trust domain; this token was presented to its issuer"
            )
        # A TERMINATED peering with this trust domain (the peer ended it) gives way to the new one.
        store.replace_terminated(pending.name, trust_domain.name)
        clash = store.by_trust_domain(trust_domain.name)
        if clash is not None:
            raise PeeringError(f"this zone already peers with {trust_domain} as {clash.name!r}")
        _refuse_trust_owned_elsewhere(self.zone, trust_domain)
        if len(request.bundle) > MAX_BUNDLE_BYTES:
            raise PeeringError(f"the dialer's bundle is {len(request.bundle)} bytes; the limit is {MAX_BUNDLE_BYTES}")
        bundle = parse_bundle(trust_domain, request.bundle)
        now = dt.datetime.now(dt.UTC)
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
            await asyncio.to_thread(self.zone.import_bundle, bundle, "peering")
        except BaseException:
            store.delete(established.name)
            raise
        await self.refresh()
        await self.on_trust_changed()
        log.info("zone %s accepted peering %s (%s)", self.zone.name, established.name, trust_domain)
        return pb.EstablishResponse(
            zone=self.zone.name,
            trust_domain=str(self.zone.trust_domain),
            bundle=self.zone.own_bundle().to_spiffe_json(),
            stream_addresses=self.stream_addresses,
        )


class _Establishment(pb_grpc.PeeringEstablishmentServicer):
    def __init__(self, service: PeeringService) -> None:
        self._service = service

    async def Establish(  # noqa: N802 -- the gRPC method name
        self, request: pb.EstablishRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.EstablishResponse:
        try:
            return await self._service.accept(request)
        except InvalidTokenError as err:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(err))
        except MeshfedError as err:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        raise AssertionError("unreachable: abort raises")


class _Stream(pb_grpc.PeeringStreamServicer):
    def __init__(self, service: PeeringService) -> None:
        self._service = service

    async def Stream(  # noqa: N802 -- the gRPC method name
        self, request_iterator: object, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        service = self._service
        try:
            caller = authenticate_peer(context.auth_context(), service.bundle_of_live_peer)
        except PeeringError as err:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(err))
        link = service.link_for_caller(caller.trust_domain.name)
        if link is None:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"zone {service.zone.name} has no live peering with {caller.trust_domain}",
            )
        assert link is not None
        session = Session(link, context.read, context.write)
        try:
            await link.run_session(session)
        except MeshfedError as err:
            log.info("peer %s: stream ended: %s", link.name, err)


async def establish(
    zone: Zone,
    token_text: str,
    name: str | None = None,
    *,
    stream_addresses: Sequence[str] | None = None,
    timeout: float = ESTABLISH_TIMEOUT,
) -> Peering:
    """The dialer's half: redeem ``token_text`` at the acceptor and store the peering (ESTABLISHING).

    Nothing is stored unless the acceptor accepted. The stream starts when
    this zone's controller runs (a running one picks the peering up within a
    second).
    """
    token = decode_token(token_text)
    now = dt.datetime.now(dt.UTC)
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
    with PeeringStore.of(zone) as store:
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
    _refuse_trust_owned_elsewhere(zone, peer_domain)
    request = pb.EstablishRequest(
        secret=token.secret,
        peer_name=token.peer_name,
        zone=zone.name,
        trust_domain=str(zone.trust_domain),
        bundle=zone.own_bundle().to_spiffe_json(),
        stream_addresses=list(stream_addresses),
    )
    response = await _redeem(token.addresses, ca_bundle, request, timeout)
    if response.trust_domain != peer_domain.name:
        raise PeeringError(f"the acceptor answered as {response.trust_domain}, but the token is for {peer_domain}")
    peer_bundle = parse_bundle(peer_domain, response.bundle)
    if not response.stream_addresses:
        raise PeeringError(f"zone {response.zone} sent no stream address; is its peering service configured?")
    await asyncio.to_thread(zone.import_bundle, peer_bundle, "peering")
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
    with PeeringStore.of(zone) as store:
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


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_epoch() -> str:
    return secrets.token_hex(8)


def _trust_owned_elsewhere(trust_domain: TrustDomain, source: str) -> str:
    how = {"import": "an operator imported its bundle", "federation": "it is federated over a bundle endpoint"}
    return (
        f"this zone already trusts {trust_domain} because {how.get(source, f'of source {source!r}')}; a peering "
        f"will not replace that trust: remove it first ('meshfed trust list' shows it), then peer again"
    )


def _refuse_trust_owned_elsewhere(zone: Zone, trust_domain: TrustDomain) -> None:
    stored = next((s for s in zone.trusted_bundles() if s.bundle.trust_domain == trust_domain), None)
    if stored is not None and stored.source != "peering":
        raise PeeringError(_trust_owned_elsewhere(trust_domain, stored.source))


def _with_hint(state: PeerState, reason: str, link: PeerLink) -> str:
    """A state change's reason with what to check, for the log."""
    if state is PeerState.FAILING:
        where = (
            f"can this zone reach it at {', '.join(link.peer_addresses)}?"
            if link.role == "dialer"
            else "can it reach this zone's peering port?"
        )
        return f"{reason}: is zone {link.peer_zone} running, and {where}"
    return reason


def _describe_stream_error(err: BaseException, peer_trust_domain: str | None = None) -> str:
    """One line for a lost or failed stream, naming the likely cause when the TLS handshake failed."""
    if isinstance(err, grpc.aio.AioRpcError):
        details = err.details() or ""
        text = f"{err.code().name} {details}"
        lowered = details.lower()
        if "certificate_verify_failed" in lowered or "handshake failed" in lowered:
            return (
                f"{text}: the TLS handshake failed; if zone {peer_trust_domain or 'the peer'} rotated its CA while "
                "this zone was away, this zone does not hold its new root yet: check 'meshfed trust list' and "
                "import its current bundle"
            )
        if "socket closed" in lowered:
            return f"{text}: the peer closed the connection (did it refuse this zone's certificate?)"
        if err.code() is grpc.StatusCode.UNAVAILABLE or "connection refused" in lowered:
            return (
                f"{text}: cannot connect; is zone {peer_trust_domain or 'the peer'} running, and is its peering "
                "port reachable from this zone (firewall, --peering-address, --advertise-host)?"
            )
        return text
    if isinstance(err, MeshfedError):
        return str(err)
    return f"{type(err).__name__}: {err}"


__all__ = ["PeerLink", "PeeringService", "establish"]
