"""The peering service of a zone's controller: the owner of its peerings' links, server and store.

It composes the parts, each in its own module:

* :mod:`~meshfed.federation.server` — the gRPC server on two ports (establish
  and stream) and the controller SVID its TLS presents, rotated with the CA;
* :mod:`~meshfed.federation.acceptor` — the acceptor's half: redeeming tokens
  and taking dialers' streams;
* :mod:`~meshfed.federation.dialer` — the dialer's half: establishment, and the
  reconnect loop (exponential backoff with jitter) of each peering it dials;
* :mod:`~meshfed.federation.link` — one live peering's state machine, on which
  the sessions of :mod:`~meshfed.federation.stream` run;
* :mod:`~meshfed.federation.peer_status` — what the API and CLI report.

This module owns the store, the set of live links, their reconciliation with
the store, and the heartbeat deadlines. A link asks it for what it needs
through a :class:`~meshfed.federation.link.LinkHost`.

Pick-up of CLI changes: the CLI writes the store (``meshfed peer establish``,
``meshfed peer delete``) and this service polls it every
``settings.store_poll_interval`` seconds (and on :meth:`PeeringService.refresh`, which
``POST /v1/peerings/refresh`` calls). The poll also renews a lease in the
store, which tells the CLI whether the zone is running.

A little over 400 lines: the reconciliation of links with the store, the
heartbeat deadlines and the members the API and the controller call share the
set of links this class owns; the parts that stand alone are already modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
from collections.abc import Awaitable, Callable, Iterator

from meshfed.clock import SYSTEM_CLOCK, Clock
from meshfed.errors import MeshfedError, PeeringError
from meshfed.federation.acceptor import EstablishmentServicer, StreamServicer
from meshfed.federation.dialer import dial_forever, establish
from meshfed.federation.exchange import MAX_VERSION, ServiceSnapshot
from meshfed.federation.link import LinkSettings, PeerLink, new_epoch
from meshfed.federation.peer_status import PeerStatus
from meshfed.federation.peer_trust import held_bundle, trust_owned_elsewhere
from meshfed.federation.peering_state import LIVE_STATES, Peering, PeerState
from meshfed.federation.peering_store import PeeringStore, encode_changes
from meshfed.federation.peering_tokens import IssuedToken
from meshfed.federation.server import PeeringServer
from meshfed.federation.settings import PeeringSettings
from meshfed.federation.token import DEFAULT_TOKEN_TTL
from meshfed.supervisor import Component, Supervisor
from meshfed.trust.bundle import TrustBundle, newest
from meshfed.trust.spiffe import TrustDomain
from meshfed.zone import Zone

log = logging.getLogger(__name__)

ExportsOf = Callable[[str], ServiceSnapshot | None]
ImportProblem = Callable[[str], str | None]
OnImports = Callable[[str, ServiceSnapshot], Awaitable[None]]
OnTrustChanged = Callable[[], Awaitable[None]]
OnPeerState = Callable[[str, PeerState], Awaitable[None]]


class PeeringService:
    """The controller service that establishes peerings and keeps one stream per peering.

    ``exports(peer)`` is called on the event loop when a snapshot is due for
    ``peer`` (coalesced: at most once per round trip); keep it cheap. It
    returns None while nothing may be sent yet: the peer keeps what it holds
    until :meth:`notify_exports_changed`.
    ``on_imports(peer, snapshot)`` receives every new version of a peer's
    exports as a full snapshot, in order, once per version; on teardown it gets
    an empty snapshot, then ``on_peer_state(peer, TERMINATED)``.
    ``on_trust_changed()`` runs after a peer's bundle is stored or replaced.
    ``settings`` holds every tunable (addresses, heartbeats, polling, limits).
    ``clock`` is what the service, its store and its links read the time from
    and wait on: heartbeats and their deadlines, the store poll, tokens'
    lifetimes (the dialers' reconnect backoff stays on real time).
    """

    def __init__(
        self,
        zone: Zone,
        settings: PeeringSettings = PeeringSettings(),
        *,
        exports: ExportsOf,
        on_imports: OnImports,
        on_trust_changed: OnTrustChanged,
        on_peer_state: OnPeerState | None = None,
        import_problem: ImportProblem = lambda peer: None,
        supervisor: Supervisor | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.zone = zone
        self.settings = settings
        self.clock = clock
        self.exports = exports
        self.on_imports = on_imports
        self.on_trust_changed = on_trust_changed
        self.on_peer_state = on_peer_state
        self.import_problem = import_problem
        self.supervisor = supervisor or Supervisor(zone.name)
        self._server = PeeringServer(
            zone,
            live_trust_domains=self._live_trust_domains,
            peers_behind=self._peers_behind,
            listen_address=settings.listen_address,
            establish_address=settings.establish_address,
            advertise_host=settings.advertise_host,
        )
        self._host = _LinkHost(self)
        self._running = False
        self._links: dict[str, PeerLink] = {}
        self._tasks: list[Component] = []
        self._own_bundle_sequence = 0
        self._reconcile_lock = asyncio.Lock()

    @contextlib.contextmanager
    def peerings(self) -> Iterator[PeeringStore]:
        """The peering store for one block (PeeringError while the service is not running).

        In the zone process the block borrows the zone's one connection to
        ``state.db`` (:mod:`meshfed.database`): keep it short, and never await inside.
        """
        if not self._running:
            raise PeeringError(f"zone {self.zone.name}: the peering service is not running")
        with PeeringStore.of(self.zone, clock=self.clock) as store:
            yield store

    @property
    def stream_addresses(self) -> list[str]:
        """Where peers dial this zone's stream (empty until started)."""
        return self._server.stream_addresses

    @property
    def establish_addresses(self) -> list[str]:
        """Where dialers redeem this zone's tokens (empty until started)."""
        return self._server.establish_addresses

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        self._running = True
        self._own_bundle_sequence = self.zone.trust.own_bundle().sequence
        await self._server.start(EstablishmentServicer(self), StreamServicer(self))
        with self.peerings() as store:
            store.record_listener(self.establish_addresses, self.stream_addresses)
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
        await self._server.stop()
        self._links.clear()
        if self._running:
            with self.peerings() as store:
                store.release_lease()
            self._running = False

    # -- read accessors ---------------------------------------------------

    def peers(self) -> list[PeerStatus]:
        now = self.clock.now()
        with self.peerings() as store:
            peerings = store.peerings()
        return [PeerStatus.of(p, self._links.get(p.name), now=now) for p in peerings]

    def peer(self, name: str) -> PeerStatus:
        with self.peerings() as store:
            peering = store.require(name)
        return PeerStatus.of(peering, self._links.get(name), now=self.clock.now())

    # -- operations --------------------------------------------------------

    def issue_token(self, peer_name: str, ttl: dt.timedelta = DEFAULT_TOKEN_TTL) -> IssuedToken:
        with self.peerings() as store:
            return store.issue_token(self.zone, peer_name, self.establish_addresses, ttl)

    async def establish(self, token: str, name: str | None = None) -> Peering:
        """Dial the acceptor named by ``token`` (this zone is the dialer), then start the stream."""
        peering = await establish(self.zone, token, name, stream_addresses=self.stream_addresses, clock=self.clock)
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
            peerings = await asyncio.to_thread(self._stored_peerings)
            for peering in peerings:
                if peering.delete_requested:
                    await self._teardown(peering.name, "deleted by zone " + self.zone.name, remove=True)
                elif peering.state in LIVE_STATES and peering.name not in self._links:
                    # A link resumes from the stored snapshots: the one read that parses them.
                    resumed = await asyncio.to_thread(self._stored_with_snapshots, peering.name)
                    self._links[peering.name] = self._start_link(resumed)
            known = {p.name for p in peerings}
            for name in [n for n in self._links if n not in known]:
                await self._links.pop(name).stop()
            self._server.rebuild_credentials()

    def _stored_peerings(self) -> list[Peering]:
        with self.peerings() as store:
            return store.peerings()

    def _stored_with_snapshots(self, name: str) -> Peering:
        with self.peerings() as store:
            return store.require(name, snapshots=True)

    async def delete(self, name: str) -> None:
        """Tear a peering down on both sides (telling the peer if connected) and forget it."""
        with self.peerings() as store:
            store.require(name)
        async with self._reconcile_lock:
            await self._teardown(name, "deleted by zone " + self.zone.name, remove=True)

    # -- called by the acceptor's half --------------------------------------

    def link_for_caller(self, trust_domain: str) -> PeerLink | None:
        link = next((lk for lk in self._links.values() if lk.peer_trust_domain == trust_domain), None)
        return link if link is not None and link.role == "acceptor" and not link.stopped else None

    def bundle_of_live_peer(self, trust_domain: TrustDomain) -> TrustBundle | None:
        if not any(link.peer_trust_domain == trust_domain.name for link in self._links.values()):
            return None
        return held_bundle(self.zone, trust_domain)

    # -- internals ---------------------------------------------------------

    def _start_link(self, peering: Peering) -> PeerLink:
        settings = LinkSettings(
            zone=self.zone.name,
            trust_domain=str(self.zone.trust_domain),
            heartbeat_interval=self.settings.heartbeat_interval,
            missed_heartbeats=self.settings.missed_heartbeats,
            peer_heartbeat_bounds=self.settings.peer_heartbeat_bounds,
            limits=self.settings.limits,
        )
        link = PeerLink(self._host, settings, peering, clock=self.clock)
        if link.role == "dialer":
            dial = functools.partial(
                dial_forever, link, self._server.client_credentials, self.settings.reconnect_backoff
            )
            link.dialer = self.supervisor.spawn(f"peer-{link.name}-dialer", dial)
        return link

    def _live_trust_domains(self) -> set[str]:
        with self.peerings() as store:
            peerings = store.peerings()
        return {p.peer_trust_domain for p in peerings if p.state in LIVE_STATES and p.peer_trust_domain}

    def _peers_behind(self, sequence: int) -> list[str]:
        return sorted(link.name for link in self._links.values() if link.peer_bundle_sequence < sequence)

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
        with self.peerings() as store:
            peering = store.get(name)
            if remove:
                store.delete(name)
            else:
                store.update(
                    name, state=PeerState.TERMINATED, state_reason=reason, received_snapshot=None, connected=False
                )
        self._server.rebuild_credentials()
        if peering is not None and peering.peer_zone is not None and peering.peer_trust_domain is not None:
            held = link.received_version if link else peering.received_version
            epoch = link.received_epoch if link else peering.received_epoch
            if held >= MAX_VERSION:
                # A peer may have pushed its version to the largest SQLite integer: no newer version of
                # its epoch exists, so the empty snapshot opens a new one (else it reads as a replay).
                epoch = new_epoch()
            empty = ServiceSnapshot(
                zone=peering.peer_zone,
                trust_domain=peering.peer_trust_domain,
                gateway_addresses=[],
                version=min(held + 1, MAX_VERSION),
                epoch=epoch,
            )
            await self.on_imports(name, empty)
            # The peering brought this trust domain; with it gone, its roots verify nothing here.
            if await asyncio.to_thread(
                self.zone.trust.forget_peering_bundle, TrustDomain.parse(peering.peer_trust_domain)
            ):
                await self.on_trust_changed()
        if self.on_peer_state is not None:
            await self.on_peer_state(name, PeerState.TERMINATED)
        log.info("peering %s torn down: %s", name, reason)

    async def _peer_terminated(self, link: PeerLink, reason: str) -> None:
        link.stopped = True
        async with self._reconcile_lock:
            if self._links.get(link.name) is link:
                await self._teardown(link.name, f"the peer ended the peering: {reason}", remove=False)

    async def _bundle_received(self, offered: TrustBundle) -> None:
        stored = next(
            (s for s in self.zone.trust.trusted_bundles() if s.bundle.trust_domain == offered.trust_domain), None
        )
        if stored is not None and stored.source != "peering":
            raise PeeringError(trust_owned_elsewhere(offered.trust_domain, stored.source))
        held = stored.bundle if stored is not None else None
        kept = newest(held, offered)
        if kept is held:
            return
        await asyncio.to_thread(self.zone.trust.import_bundle, kept, "peering")
        self._server.rebuild_credentials()
        log.info("peer bundle of %s updated to sequence %d", offered.trust_domain, kept.sequence)
        await self.on_trust_changed()

    async def _poll_store(self) -> None:
        while True:
            await self.clock.sleep(self.settings.store_poll_interval)
            try:
                # Store blocks run off the loop: the zone's one connection may be held by a worker
                # writing a 10,000-service snapshot, and waiting for it here would stall every peer.
                await asyncio.to_thread(self._renew_lease)
                await self.refresh()
                self._server.current_svid()
                sequence = self.zone.trust.own_bundle().sequence
                if sequence != self._own_bundle_sequence:
                    self._own_bundle_sequence = sequence
                    for link in self._links.values():
                        if link.session is not None:
                            link.session.bundle_changed()
                seen: dict[str, dict[str, object]] = {
                    link.name: {
                        "last_connected_at": link.last_connected_at,
                        "last_heartbeat_sent_at": link.last_heartbeat_sent_at,
                        "last_heartbeat_received_at": link.last_heartbeat_received_at,
                        "connected": link.connected_now,
                    }
                    for link in self._links.values()
                }
                dropped = await asyncio.to_thread(self._record_links, seen)
                for name in dropped:
                    log.info("zone %s: peering %s dropped: its token expired unredeemed", self.zone.name, name)
            except MeshfedError as err:
                log.error("zone %s peering poll: %s", self.zone.name, err)

    def _renew_lease(self) -> None:
        with self.peerings() as store:
            store.renew_lease()

    def _record_links(self, seen: dict[str, dict[str, object]]) -> list[str]:
        """Write each link's connection times; drop expired pending peerings. Returns the names dropped."""
        with self.peerings() as store:
            for name, changes in seen.items():
                store.update(name, **changes)
            return store.drop_expired_pending()

    async def _watch_heartbeats(self) -> None:
        while True:
            await self.clock.sleep(self.settings.heartbeat_interval / 4)
            now = self.clock.monotonic()
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


class _LinkHost:
    """What the service's links may ask of it (:class:`~meshfed.federation.link.LinkHost`), and no more."""

    def __init__(self, service: PeeringService) -> None:
        self._service = service

    def exports(self, peer: str) -> ServiceSnapshot | None:
        return self._service.exports(peer)

    def import_problem(self, peer: str) -> str | None:
        return self._service.import_problem(peer)

    async def deliver(self, peer: str, snapshot: ServiceSnapshot) -> None:
        await self._service.on_imports(peer, snapshot)

    async def state_changed(self, peer: str, state: PeerState) -> None:
        if self._service.on_peer_state is not None:
            await self._service.on_peer_state(peer, state)

    def record(self, peer: str, **changes: object) -> None:
        _update_row(self._service, peer, changes)

    async def record_snapshot(self, peer: str, **changes: object) -> None:
        await asyncio.to_thread(_update_row, self._service, peer, changes)

    def own_bundle_json(self) -> bytes:
        return self._service.zone.trust.own_bundle().to_spiffe_json()

    def own_stream_addresses(self) -> list[str]:
        return self._service.stream_addresses

    def held_bundle_sequence(self, trust_domain: str) -> int:
        bundle = held_bundle(self._service.zone, TrustDomain(trust_domain))
        return bundle.sequence if bundle is not None else 0

    async def bundle_received(self, offered: TrustBundle) -> None:
        await self._service._bundle_received(offered)

    def peer_bundle_changed(self) -> None:
        # The controller SVID may move to the new CA now.
        self._service._server.current_svid()

    async def peer_terminated(self, link: PeerLink, reason: str) -> None:
        await self._service._peer_terminated(link, reason)


def _update_row(service: PeeringService, peer: str, changes: dict[str, object]) -> None:
    # A large snapshot is serialised on a worker thread (record_snapshot): not the event loop's work. Either
    # way the serialising happens before the store's block, which holds the zone's one connection: what
    # waits on that connection (the loop's own small writes) must not wait on an encoding.
    # Refused (PeeringError) once the service stopped.
    values = encode_changes(peer, changes)
    with service.peerings() as store:
        store.write_encoded(peer, values)


__all__ = ["PeeringService"]
