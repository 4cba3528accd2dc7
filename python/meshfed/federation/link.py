"""One live peering's state machine: its state, versions and snapshots across connections.

A :class:`PeerLink` outlives its connections; at most one
:class:`~meshfed.federation.stream.Session` runs on it at a time (a newer
connection replaces an older one). It owns the peering's live state; what it
needs of the zone it asks of its :class:`LinkHost` (the peering service), and
it writes only its own peering's row, through the host.

A large snapshot received from the peer (more than :data:`OFF_LOOP_SERVICES`
services) is recorded off the event loop: thousands of services take tens of
milliseconds to serialise and write. A small one costs less to write than to
hand to a thread, and is written at once. Either way, one write at a time per
link, in the order the snapshots were delivered, and a newer snapshot is never
overwritten by an older one.

Longer than this package's other modules (about 520 lines): :class:`PeerLink`
is one state machine whose fields its methods share; split, each half would
reach into the other's state.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import secrets
import threading
from collections.abc import Callable, Sequence
from typing import ParamSpec, Protocol

import grpc

from meshfed.addresses import parse_host_port
from meshfed.clock import SYSTEM_CLOCK, Clock
from meshfed.errors import MeshfedError, PeeringError, PeerInputError
from meshfed.federation import wire
from meshfed.federation._proto import peering_pb2 as pb
from meshfed.federation.churn import UpdateBudget
from meshfed.federation.exchange import MAX_VERSION, ServiceSnapshot
from meshfed.federation.peering_state import Peering, PeerState
from meshfed.federation.stream import CAPABILITIES, PeerTerminatedError, Session
from meshfed.supervisor import Component
from meshfed.trust.bundle import TrustBundle, parse_bundle
from meshfed.trust.spiffe import TrustDomain

# The peering service's one logger, whichever of its modules logs: log lines keep their logger name.
log = logging.getLogger("meshfed.federation.service")

# Deltas can be made from this many recent versions; an older ack gets a full snapshot.
HISTORY_DEPTH = 16
# A peer's announced heartbeat interval is held within these bounds (seconds): a peer announcing
# 4294967295 ms must not make itself impossible to mark FAILING.
PEER_HEARTBEAT_BOUNDS = (0.05, 60.0)
# A SPIFFE bundle with a handful of roots is a few KiB; SPIRE's with JWT keys stays well under this.
MAX_BUNDLE_BYTES = 256 * 1024
# A received snapshot of more services than this is checked, serialised and written on a worker thread.
OFF_LOOP_SERVICES = 100
# As many as a token may carry.
MAX_STREAM_ADDRESSES = 16
_P = ParamSpec("_P")


@dataclasses.dataclass(frozen=True)
class PeerLimits:
    """What one peer may make this zone hold: refused beyond, with a message naming the limit."""

    max_services: int = 10_000  # services imported from one peer
    max_listeners: int = 10_000  # egress listeners (one socket each: a service port) for one peer
    # Updates (snapshots, deltas) of one peer applied per second after a burst (meshfed.federation.churn):
    # well above an honest peer's health changes, well below what a 10,000-service reconfigure costs.
    updates_per_second: float = 5.0
    update_burst: int = 20


@dataclasses.dataclass(frozen=True)
class LinkSettings:
    """What a link is told once: this zone's identity, its heartbeats and the limits a peer gets."""

    zone: str
    trust_domain: str
    heartbeat_interval: float
    missed_heartbeats: int
    peer_heartbeat_bounds: tuple[float, float]
    limits: PeerLimits


class LinkHost(Protocol):
    """What a link asks of the service that owns it (``peer`` is the link's name)."""

    def exports(self, peer: str) -> ServiceSnapshot | None:
        """What this zone exports to ``peer`` now; None while its ingress does not admit ``peer`` yet."""
        ...

    def import_problem(self, peer: str) -> str | None:
        """Why ``peer``'s imports are withheld, if they are."""
        ...

    async def deliver(self, peer: str, snapshot: ServiceSnapshot) -> None:
        """Apply a new version of ``peer``'s exports (PeerInputError: refused, nothing applied)."""
        ...

    async def state_changed(self, peer: str, state: PeerState) -> None: ...

    def record(self, peer: str, **changes: object) -> None:
        """Write some fields of ``peer``'s row, on the event loop."""
        ...

    async def record_snapshot(self, peer: str, **changes: object) -> None:
        """Write some fields of ``peer``'s row that include a large snapshot, off the event loop."""
        ...

    def own_bundle_json(self) -> bytes: ...

    def own_stream_addresses(self) -> Sequence[str]:
        """Where this zone's peering stream is reached now (told to dialing peers in the hello)."""
        ...

    def held_bundle_sequence(self, trust_domain: str) -> int:
        """The sequence of the bundle this zone holds for ``trust_domain`` (0: none)."""
        ...

    async def bundle_received(self, offered: TrustBundle) -> None:
        """Keep a peer's bundle if it is newer than the one held (PeeringError: refused)."""
        ...

    def peer_bundle_changed(self) -> None:
        """A peer confirmed a newer bundle of ours."""
        ...

    async def peer_terminated(self, link: PeerLink, reason: str) -> None:
        """The peer ended the peering."""
        ...


class PeerLink:
    """The running state of one live peering; at most one :class:`Session` at a time."""

    def __init__(
        self, host: LinkHost, settings: LinkSettings, peering: Peering, *, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        assert peering.peer_trust_domain is not None
        assert peering.peer_zone is not None
        self._host = host
        # Heartbeat and message times, version send times, and its sessions' heartbeat timers.
        self.clock = clock
        self._settings = settings
        self.updates = UpdateBudget(
            peering.name, settings.limits.updates_per_second, settings.limits.update_burst, clock
        )
        self.name = peering.name
        self.role = peering.role
        self.peer_zone = peering.peer_zone
        self.peer_trust_domain = peering.peer_trust_domain
        self.peer_addresses = peering.peer_addresses
        self.state = peering.state
        self.state_reason = peering.state_reason
        self.heartbeat_interval = settings.heartbeat_interval
        self.peer_heartbeat_interval = settings.heartbeat_interval
        # The content of the last version sent is stored after the send (store_sent_soon): a stored
        # snapshot of an older version than the one recorded as sent is not what the peer may hold.
        stored = peering.sent_snapshot
        self.sent = stored if stored is not None and stored.version == peering.sent_version else None
        self.sent_version = peering.sent_version
        # Checking a large message leaves the loop; updates are checked one at a time, in the order they
        # came, so they reach delivery (and their writes) in that order.
        self._checking = asyncio.Lock()
        # The snapshot current_exports made and the sender has not stored yet (see persist_sent).
        self._persist_lock = threading.Lock()
        self._unpersisted: tuple[int, ServiceSnapshot] | None = None
        self._persisted_version = peering.sent_version
        self._stored_version = peering.sent_version if self.sent is not None else 0
        self._storing: asyncio.Future[None] | None = None
        self.acked_version = peering.acked_version
        self.received = peering.received_snapshot
        # A stored snapshot that no longer parses counts as nothing held: the peer resends everything.
        self.received_version = peering.received_version if self.received is not None else 0
        self.sent_epoch = peering.sent_epoch
        self.received_epoch = peering.received_epoch if self.received is not None else ""
        self.refused_reason = peering.refused_reason
        self.export_error = ""
        self.peer_bundle_sequence = peering.peer_bundle_sequence
        self.held_peer_bundle_sequence = host.held_bundle_sequence(peering.peer_trust_domain)
        self._epoch_restarted = False
        self.history: collections.OrderedDict[int, ServiceSnapshot] = collections.OrderedDict()
        if self.sent is not None:
            self.history[self.sent_version] = self.sent
        self._version_sent_at: dict[int, float] = {}
        self.last_connected_at = peering.last_connected_at
        self.last_heartbeat_sent_at = peering.last_heartbeat_sent_at
        self.last_heartbeat_received_at = peering.last_heartbeat_received_at
        self.last_message_at = self.clock.monotonic()
        self.session: Session | None = None
        self.stopped = False
        # The dialer's reconnect loop (see meshfed.federation.dialer), set by the service that spawned it.
        self.dialer: Component | None = None
        # The newest write of a received snapshot; each write waits for the one before it.
        self._recording: asyncio.Task[None] | None = None

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

    async def stop(self) -> None:
        self.stopped = True
        if self.dialer is not None:
            await self.dialer.cancel()
        if self._recording is not None:
            # A received snapshot still being written lands before whatever the caller writes next.
            await asyncio.wait([self._recording])
        if self._storing is not None:
            await asyncio.wait([self._storing])  # likewise the content of the last version sent

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
            await self._host.peer_terminated(self, str(err))
        except asyncio.CancelledError:
            if self.role == "acceptor":
                # grpc cancels the stream handler when the dialer's connection drops without a word:
                # the stream is lost as surely as on an error (a link being stopped ignores it).
                await self._lost(session, "the connection to the peer dropped")
            raise
        except BaseException as err:
            await self._lost(session, describe_stream_error(err))
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

    # -- called by the session --------------------------------------------

    def hello(self) -> pb.Hello:
        return pb.Hello(
            zone=self._settings.zone,
            trust_domain=self._settings.trust_domain,
            capabilities=CAPABILITIES,
            last_acked_version=self.received_version,
            last_acked_epoch=self.received_epoch,
            heartbeat_interval_ms=int(self.heartbeat_interval * 1000),
            bundle_sequence=self.held_peer_bundle_sequence,
            stream_addresses=list(self._host.own_stream_addresses()) if self.role == "acceptor" else [],
        )

    async def connected(self, hello: pb.Hello) -> None:
        if hello.heartbeat_interval_ms:
            low, high = self._settings.peer_heartbeat_bounds
            self.peer_heartbeat_interval = min(max(hello.heartbeat_interval_ms / 1000, low), high)
        self.peer_bundle_confirmed(hello.bundle_sequence)
        if self.role == "dialer" and hello.stream_addresses:
            self._follow(hello.stream_addresses)
        self.last_connected_at = self.clock.now()
        self.last_message_at = self.clock.monotonic()
        await self.set_state(PeerState.ACTIVE, "")

    def _follow(self, offered: Sequence[str]) -> None:
        """Dial the acceptor where it says its stream is now (a new advertised host, a new load balancer).

        The addresses come from the authenticated peer, as the token's did, and are checked as the
        token's are: at most 16 ``host:port`` values. Anything else is ignored with a warning, and the
        link keeps the addresses it has.
        """
        try:
            if len(offered) > MAX_STREAM_ADDRESSES:
                raise ValueError(f"{len(offered)} addresses, more than {MAX_STREAM_ADDRESSES}")
            addresses = tuple(
                str(parse_host_port(address[:512], what="stream address", allow_zero=False)) for address in offered
            )
        except (ValueError, MeshfedError) as err:
            log.warning(
                "peer %s: ignoring the stream addresses in its hello (%s); still dialling %s",
                self.name,
                str(err)[:200],
                ", ".join(self.peer_addresses),
            )
            return
        if addresses == self.peer_addresses:
            return
        log.info(
            "peer %s: its peering stream is now at %s (was %s); dialling there from now on",
            self.name,
            ", ".join(addresses),
            ", ".join(self.peer_addresses),
        )
        self.peer_addresses = addresses
        self._host.record(self.name, peer_addresses=addresses)

    async def message_received(self, message: pb.PeerMessage) -> None:
        self.last_message_at = self.clock.monotonic()
        if message.WhichOneof("body") == "heartbeat":
            self.last_heartbeat_received_at = self.clock.now()
        if self.state in (PeerState.FAILING, PeerState.DISCONNECTED):
            await self.set_state(PeerState.ACTIVE, "")

    def heartbeat_sent(self) -> None:
        self.last_heartbeat_sent_at = self.clock.now()

    def own_bundle_json(self) -> bytes:
        return self._host.own_bundle_json()

    def current_exports(self) -> ServiceSnapshot | None:
        """What we export to the peer now, with a version that grows whenever the content changes.

        None: nothing to send yet (the ingress does not admit the peer); the peer keeps what it holds.
        """
        snapshot = self._host.exports(self.name)
        if snapshot is None:
            return None
        if self.sent is not None and self.sent.epoch == self.sent_epoch and wire.same_content(self.sent, snapshot):
            return self.sent
        if not self.sent_epoch:
            self.sent_epoch = new_epoch()
        version = max(snapshot.version, self.sent_version + 1)
        snapshot = snapshot.model_copy(update={"version": version, "epoch": self.sent_epoch})
        # Persisted before it is sent (persist_sent, by the sender), so a restart never reuses a version
        # for other content.
        self._unpersisted = (version, snapshot)
        self.sent, self.sent_version = snapshot, version
        self.history[version] = snapshot
        while len(self.history) > HISTORY_DEPTH:
            self.history.popitem(last=False)
        self._version_sent_at.setdefault(version, self.clock.monotonic())
        return snapshot

    def persist_sent(self) -> None:
        """Store the version of the last snapshot :meth:`current_exports` made, unless a newer one is stored.

        The sender calls it before sending, on a worker thread, so a restart never reuses a version for
        other content. The content follows after the send (:meth:`store_sent_soon`): a snapshot of 10,000
        services is a megabyte of JSON to encode and write, which held every change back by 15 ms.
        """
        with self._persist_lock:
            pending = self._unpersisted
            if pending is None or pending[0] <= self._persisted_version:
                return
            version, snapshot = pending
            self._host.record(self.name, sent_version=version, sent_epoch=snapshot.epoch)
            self._persisted_version = version

    def store_sent_soon(self) -> None:
        """The version :meth:`persist_sent` stored was sent: store its content too, off the loop, one write at
        a time. Until it lands (or if it fails) a restart sends the peer a full snapshot instead of a delta."""
        self._storing = asyncio.ensure_future(self._store_sent_after(self._storing))

    async def _store_sent_after(self, earlier: asyncio.Future[None] | None) -> None:
        if earlier is not None:
            await asyncio.wait([earlier])
        try:
            await asyncio.to_thread(self._store_sent)
        except Exception as err:  # a lost write costs a full snapshot after a restart, nothing more
            log.warning(
                "peer %s: could not store the exports last sent (after a restart it gets a full snapshot): %s",
                self.name,
                err,
            )

    def _store_sent(self) -> None:
        with self._persist_lock:
            pending = self._unpersisted
            if pending is None or pending[0] > self._persisted_version or pending[0] <= self._stored_version:
                return
            version, snapshot = pending
            self._host.record(self.name, sent_snapshot=snapshot)
            self._stored_version = version

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
        self.sent_epoch, self.sent, self.acked_version = new_epoch(), None, 0
        self.history.clear()
        self._host.record(self.name, sent_epoch=self.sent_epoch, acked_version=0)
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
        self._host.record(self.name, acked_version=version)

    def propagation_lag(self) -> float:
        if not self._version_sent_at or self.acked_version >= self.sent_version:
            return 0.0
        return self.clock.monotonic() - min(self._version_sent_at.values())

    def _ack(self, *, resync: bool = False) -> pb.Ack:
        return pb.Ack(version=self.received_version, epoch=self.received_epoch, resync=resync)

    async def apply_snapshot(self, message: pb.Snapshot) -> pb.Ack:
        """Apply a full snapshot; raises PeerInputError (nothing applied) when it breaks a rule or a limit."""
        if message.epoch == self.received_epoch and message.version <= self.received_version:
            return self._ack()  # a replay: applied already (or the sender went back; it starts a new epoch)
        await self.updates.take()
        async with self._checking:
            snapshot = await _parsed(
                len(message.services), wire.snapshot_from_proto, message, self.peer_zone, self.peer_trust_domain
            )
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
        await self.updates.take()
        async with self._checking:
            size = len(self.received.services) + len(delta.upserted)
            snapshot = await _parsed(size, wire.apply_delta, self.received, delta)
        await self._deliver(snapshot)
        return self._ack()

    def _check_limits(self, snapshot: ServiceSnapshot) -> None:
        limits = self._settings.limits
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
        await self._host.deliver(self.name, snapshot)
        idle = self._recording is None or self._recording.done()
        if idle and len(snapshot.services) <= OFF_LOOP_SERVICES:
            self._record_received(snapshot)
            return
        recording = asyncio.ensure_future(self._record_received_after(self._recording, snapshot))
        self._recording = recording
        # Shielded: a cancelled session leaves the write and this link's copy to finish together.
        await asyncio.shield(recording)

    async def _record_received_after(self, earlier: asyncio.Task[None] | None, snapshot: ServiceSnapshot) -> None:
        if earlier is not None:
            await asyncio.wait([earlier])  # its outcome is its own caller's
        if len(snapshot.services) <= OFF_LOOP_SERVICES:
            self._record_received(snapshot)
        elif not self._holds_newer(snapshot):
            await self._host.record_snapshot(self.name, **self._received_row(snapshot))
            self._hold_received(snapshot)

    def _record_received(self, snapshot: ServiceSnapshot) -> None:
        if not self._holds_newer(snapshot):
            self._host.record(self.name, **self._received_row(snapshot))
            self._hold_received(snapshot)

    def _holds_newer(self, snapshot: ServiceSnapshot) -> bool:
        # An older delivery (of a replaced session) that finished after a newer one: the newer one stays.
        return snapshot.epoch == self.received_epoch and snapshot.version <= self.received_version

    @staticmethod
    def _received_row(snapshot: ServiceSnapshot) -> dict[str, object]:
        return {
            "received_version": snapshot.version,
            "received_snapshot": snapshot,
            "received_epoch": snapshot.epoch,
            "refused_reason": "",
        }

    def _hold_received(self, snapshot: ServiceSnapshot) -> None:
        self.received, self.received_version, self.received_epoch = snapshot, snapshot.version, snapshot.epoch
        self.refused_reason = ""

    def refused(self, reason: str) -> pb.Ack:
        """Record why the peer's update was refused and answer with a NACK; its last good imports stay."""
        if reason != self.refused_reason:
            log.error(
                "peer %s: update refused, its imports keep version %d: %s", self.name, self.received_version, reason
            )
            self.refused_reason = reason
            self._host.record(self.name, refused_reason=reason)
        return pb.Ack(version=self.received_version, epoch=self.received_epoch, error=reason)

    @property
    def updates_throttled(self) -> int:
        """This peer's updates that waited for its budget (:mod:`meshfed.federation.churn`)."""
        return self.updates.throttled

    def quarantine_reason(self) -> str:
        return self._host.import_problem(self.name) or ""

    async def apply_bundle(self, data: bytes) -> None:
        if len(data) > MAX_BUNDLE_BYTES:
            raise PeerInputError(
                f"peer {self.name} sent a bundle of {len(data)} bytes; the limit is {MAX_BUNDLE_BYTES}"
            )
        offered = parse_bundle(TrustDomain(self.peer_trust_domain), data)
        await self._host.bundle_received(offered)
        self.held_peer_bundle_sequence = self._host.held_bundle_sequence(self.peer_trust_domain)

    def bundle_refused(self, reason: str) -> None:
        log.error("peer %s sent a bundle this zone refused (the one it holds stays): %s", self.name, reason)

    def peer_bundle_confirmed(self, sequence: int) -> None:
        """The peer says it holds our bundle at ``sequence``: a rotation may now present the new CA to it."""
        # A uint64 from the peer: capped to what SQLite stores (no bundle of ours gets anywhere near it).
        sequence = min(sequence, MAX_VERSION)
        if sequence == self.peer_bundle_sequence:
            return
        self.peer_bundle_sequence = sequence
        self._host.record(self.name, peer_bundle_sequence=sequence)
        self._host.peer_bundle_changed()

    async def set_state(self, state: PeerState, reason: str) -> None:
        if state is self.state and reason == self.state_reason:
            return
        previous, self.state, self.state_reason = self.state, state, reason
        self._host.record(self.name, state=state, state_reason=reason)
        if state is not previous:
            level = logging.WARNING if state in (PeerState.DISCONNECTED, PeerState.FAILING) else logging.INFO
            log.log(level, "peer %s: %s -> %s %s", self.name, previous, state, _with_hint(state, reason, self))
            await self._host.state_changed(self.name, state)

    def failure_deadline(self) -> float:
        """Seconds of silence after which the peer is FAILING."""
        return self.peer_heartbeat_interval * self._settings.missed_heartbeats


async def _parsed(
    services: int, parse: Callable[_P, ServiceSnapshot], *args: _P.args, **kwargs: _P.kwargs
) -> ServiceSnapshot:
    """``parse(*args)``: a peer's message checked into a snapshot, off the loop when it is large (10,000
    services take about 0.1 s to check, which would stall every other peer's stream)."""
    if services <= OFF_LOOP_SERVICES:
        return parse(*args, **kwargs)
    return await asyncio.to_thread(parse, *args, **kwargs)


def new_epoch() -> str:
    """A new export epoch: versions of one epoch only grow."""
    return secrets.token_hex(8)


def describe_stream_error(err: BaseException, peer_trust_domain: str | None = None) -> str:
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


__all__ = [
    "HISTORY_DEPTH",
    "MAX_BUNDLE_BYTES",
    "OFF_LOOP_SERVICES",
    "PEER_HEARTBEAT_BOUNDS",
    "LinkHost",
    "LinkSettings",
    "PeerLimits",
    "PeerLink",
    "describe_stream_error",
    "new_epoch",
]
