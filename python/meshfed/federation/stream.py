"""One connection of the peering stream: hello, then updates, acks and heartbeats both ways.

A :class:`Session` is the protocol on one gRPC call, the same on both ends
(the dialer's client call and the acceptor's server handler differ only in how
they read and write). Each end is a sender of its exports and a receiver of
the peer's.

Flow control without queues: one writer task picks the next message from
flags (terminate, ack, bundle, update, heartbeat); at most one update is in
flight until the peer acks it, and the update is computed when it is sent,
so changes made meanwhile coalesce into one. A slow peer costs one pending
snapshot, never a backlog.

Resume: each hello carries the newest version (and epoch) of the peer's
exports this end has applied. The sender answers with nothing (up to date), a
delta (when it still holds that version), or a full snapshot. A peer that
claims a version this end never sent means this end's history went backwards
(a restore from backup): the sender starts a new epoch and sends everything.

Everything read here is a peer's untrusted input: updates are parsed whole
into typed values (:mod:`meshfed.federation.wire`) and refused with a NACK
(``Ack.error``) naming the field; a refused update changes nothing, is never
acked as applied, and the stream carries on. The sender does not resend
content the peer refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

import grpc

from meshfed.clock import Clock
from meshfed.errors import MeshfedError, PeeringError, PeerInputError
from meshfed.federation import wire
from meshfed.federation._proto import peering_pb2 as pb
from meshfed.federation.exchange import ServiceSnapshot

log = logging.getLogger(__name__)

CAPABILITIES = ("delta",)
HANDSHAKE_TIMEOUT = 10.0
TERMINATE_GRACE = 1.0

ReadMessage = Callable[[], Awaitable[object]]
WriteMessage = Callable[[pb.PeerMessage], Awaitable[None]]


class PeerTerminatedError(PeeringError):
    """The peer deleted the peering (it sent Terminate)."""


class SessionLink(Protocol):
    """What a session asks of its peering's link (:class:`~meshfed.federation.link.PeerLink` is one).

    The link holds the peering's state across connections; a session holds
    only what one connection needs (what is in flight, what the peer holds).
    """

    @property
    def name(self) -> str: ...

    @property
    def peer_zone(self) -> str: ...

    @property
    def peer_trust_domain(self) -> str: ...

    @property
    def heartbeat_interval(self) -> float: ...

    @property
    def clock(self) -> Clock:
        """What the session's heartbeat timer runs on."""
        ...

    @property
    def acked_version(self) -> int: ...

    @property
    def held_peer_bundle_sequence(self) -> int: ...

    @property
    def history(self) -> Mapping[int, ServiceSnapshot]: ...

    # -- the handshake ----------------------------------------------------

    def hello(self) -> pb.Hello: ...

    async def connected(self, hello: pb.Hello) -> None: ...

    # -- sending our exports ----------------------------------------------

    def current_exports(self) -> ServiceSnapshot | None: ...

    def persist_sent(self) -> None:
        """Store the version :meth:`current_exports` last made before it is sent (called on a worker thread)."""

    def store_sent_soon(self) -> None:
        """That version was sent: store its content, off the loop and after the send (called on the loop)."""

    def peer_holds(self, epoch: str, version: int) -> int | None: ...

    def acked(self, version: int) -> None: ...

    def export_refused(self, reason: str) -> None: ...

    def own_bundle_json(self) -> bytes: ...

    def heartbeat_sent(self) -> None: ...

    # -- receiving the peer's ---------------------------------------------

    async def message_received(self, message: pb.PeerMessage) -> None: ...

    async def apply_snapshot(self, message: pb.Snapshot) -> pb.Ack: ...

    async def apply_delta(self, delta: pb.Delta) -> pb.Ack: ...

    def refused(self, reason: str) -> pb.Ack: ...

    async def apply_bundle(self, data: bytes) -> None: ...

    def bundle_refused(self, reason: str) -> None: ...

    def peer_bundle_confirmed(self, sequence: int) -> None: ...


class Session:
    """The protocol on one connection of one peering."""

    def __init__(self, link: SessionLink, read: ReadMessage, write: WriteMessage) -> None:
        self.link = link
        self._read = read
        self._write = write
        self._wake = asyncio.Event()
        self.said_hello = False
        # What the peer holds of our exports (None: unknown, send a full snapshot).
        self._peer_has: int | None = None
        self._in_flight: int | None = None
        # The version the peer refused last: not sent again (only newer content is).
        self._refused: int | None = None
        self._check_exports = True
        self._bundle_due = True
        self._pending_ack: pb.Ack | None = None
        self._terminate_reason: str | None = None
        self._close_requested = asyncio.Event()
        self.finished = asyncio.Event()
        self._next_heartbeat = 0.0

    # -- called by the link / service -----------------------------------

    def exports_changed(self) -> None:
        self._check_exports = True
        self._wake.set()

    def bundle_changed(self) -> None:
        self._bundle_due = True
        self._wake.set()

    def terminate(self, reason: str) -> None:
        """Tell the peer the peering is deleted, then end the session."""
        self._terminate_reason = reason
        self._wake.set()

    def close(self) -> None:
        """End the session without a word to the peer (it was replaced, or the connection looks dead)."""
        self._close_requested.set()

    # -- the protocol ----------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self.finished.set()

    async def _run(self) -> None:
        link = self.link
        await self._write(pb.PeerMessage(hello=link.hello()))
        # asyncio.timeout, not wait_for, here and below: on 3.11 wait_for can swallow a cancel that
        # races the awaited result, and a session that misses its cancel never ends.
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                first = await self._read()
        except TimeoutError:
            raise PeeringError(f"peer {link.name} sent no hello within {HANDSHAKE_TIMEOUT:.0f}s") from None
        if not isinstance(first, pb.PeerMessage) or first.WhichOneof("body") != "hello":
            raise PeeringError(f"peer {link.name} did not start with hello")
        hello = first.hello
        if hello.trust_domain != link.peer_trust_domain:
            raise PeeringError(
                f"peer {link.name} says it is {hello.trust_domain[:256]}, "
                f"but the peering is with {link.peer_trust_domain}"
            )
        if hello.zone != link.peer_zone:
            raise PeeringError(f"peer {link.name} says it is zone {hello.zone[:64]!r}, not {link.peer_zone!r}")
        self._peer_has = link.peer_holds(hello.last_acked_epoch, hello.last_acked_version)
        if self._peer_has is not None and self._peer_has > link.acked_version:
            # The peer applied a version whose ack never reached us (or was not stored before a restart).
            link.acked(self._peer_has)
        self.said_hello = True
        await link.connected(hello)
        reader = asyncio.create_task(self._read_loop(), name=f"peer-{link.name}-read")
        writer = asyncio.create_task(self._write_loop(), name=f"peer-{link.name}-write")
        closer = asyncio.create_task(self._close_requested.wait(), name=f"peer-{link.name}-close")
        tasks = [reader, writer, closer]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if closer in done:
                raise PeeringError(f"stream to peer {link.name} closed locally")
            if writer in done and writer.exception() is None:
                # We sent Terminate: give the peer a moment to read it and close its end, so
                # closing ours does not cancel the call before the message is delivered.
                with contextlib.suppress(TimeoutError, Exception):
                    async with asyncio.timeout(TERMINATE_GRACE):
                        await asyncio.shield(reader)
                return
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for task in done:
            if task is not closer:
                task.result()

    async def _read_loop(self) -> None:
        link = self.link
        while True:
            message = await self._read()
            if message is grpc.aio.EOF or message is None:
                raise PeeringError(f"peer {link.name} closed the stream")
            if not isinstance(message, pb.PeerMessage):
                raise PeeringError(f"peer {link.name} sent an unreadable message")
            await link.message_received(message)
            kind = message.WhichOneof("body")
            if kind == "snapshot":
                self._acknowledge(await self._applied(link.apply_snapshot(message.snapshot)))
            elif kind == "delta":
                self._acknowledge(await self._applied(link.apply_delta(message.delta)))
            elif kind == "ack":
                self._acked(message.ack)
            elif kind == "bundle":
                try:
                    await link.apply_bundle(message.bundle.bundle)
                except MeshfedError as err:
                    # Refused: the peer's bundle we hold stays; the stream (authenticated by it) carries on.
                    link.bundle_refused(str(err))
                else:
                    self.send_heartbeat_now()  # tells the peer which of its bundles we now hold
            elif kind == "heartbeat":
                link.peer_bundle_confirmed(message.heartbeat.bundle_sequence)
            elif kind == "terminate":
                raise PeerTerminatedError(message.terminate.reason or "the peer deleted the peering")
            elif kind == "hello":
                raise PeeringError(f"peer {link.name} sent a second hello")
            # Unknown kinds are ignored (newer peers).

    async def _applied(self, applying: Awaitable[pb.Ack]) -> pb.Ack:
        """The ack of an update, or a NACK naming why it was refused (nothing of it was applied)."""
        try:
            return await applying
        except PeerInputError as err:
            return self.link.refused(str(err))

    def send_heartbeat_now(self) -> None:
        self._next_heartbeat = 0.0
        self._wake.set()

    def _acknowledge(self, ack: pb.Ack) -> None:
        self._pending_ack = ack
        self._wake.set()

    def _acked(self, ack: pb.Ack) -> None:
        link = self.link
        if ack.error:
            # A NACK: the peer still serves what it had; do not send this content again.
            self._refused = self._in_flight
            link.export_refused(ack.error[:1024])
            self._peer_has = link.peer_holds(ack.epoch, ack.version)
        elif ack.resync:
            self._peer_has = None
        else:
            self._peer_has = link.peer_holds(ack.epoch, ack.version)
            if self._peer_has is not None and ack.version == self._in_flight:
                link.acked(ack.version)
        self._in_flight = None
        self._check_exports = True
        self._wake.set()

    async def _write_loop(self) -> None:
        interval = self.link.heartbeat_interval
        clock = self.link.clock
        self._next_heartbeat = clock.monotonic()
        while True:
            self._wake.clear()
            message = self._next_message()
            if callable(message):
                # Encoding a snapshot or a diff is O(services): 10,000 take tens of milliseconds, which
                # would stall the loop once per peer. What to send is decided above, on the loop.
                message = await asyncio.to_thread(message)
            if message is not None:
                await self._write(message)
                body = message.WhichOneof("body")
                if body == "terminate":
                    return
                if body in ("snapshot", "delta"):
                    self.link.store_sent_soon()
                continue
            await self._woken_or_after(self._next_heartbeat - clock.monotonic())
            if clock.monotonic() >= self._next_heartbeat:
                self._next_heartbeat = clock.monotonic() + interval
                self.link.heartbeat_sent()
                heartbeat = pb.Heartbeat(
                    sent_at_unix_ms=int(clock.now().timestamp() * 1000),
                    bundle_sequence=self.link.held_peer_bundle_sequence,
                )
                await self._write(pb.PeerMessage(heartbeat=heartbeat))

    async def _woken_or_after(self, seconds: float) -> None:
        """Wait until woken (:attr:`_wake`) or until ``seconds`` pass on the link's clock, whichever is first.

        A race of two tasks, not ``wait_for``: on 3.11 that can swallow a cancel racing the awaited
        result. A cancel here cancels both, and nothing is left running.
        """
        if self._wake.is_set():
            return
        if seconds <= 0:
            await asyncio.sleep(0)  # a heartbeat is due: one loop turn, as a zero timeout gave, then send it
            return
        timer = asyncio.ensure_future(self.link.clock.sleep(seconds))
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((timer, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            woken.cancel()

    def _next_message(self) -> pb.PeerMessage | Callable[[], pb.PeerMessage] | None:
        """The next message to send, or how to encode it (an update: see :meth:`_update`), or None."""
        if self._terminate_reason is not None:
            return pb.PeerMessage(terminate=pb.Terminate(reason=self._terminate_reason))
        if self._pending_ack is not None:
            ack, self._pending_ack = self._pending_ack, None
            return pb.PeerMessage(ack=ack)
        if self._bundle_due:
            self._bundle_due = False
            return pb.PeerMessage(bundle=pb.BundleUpdate(bundle=self.link.own_bundle_json()))
        if self._in_flight is None and self._check_exports:
            self._check_exports = False
            return self._update()
        return None

    def _update(self) -> Callable[[], pb.PeerMessage] | None:
        """How to encode the update the peer needs (a delta from what it holds, else a snapshot), or None.

        The version is in flight from here; the encoding reads only immutable snapshots, so it may run
        off the loop.
        """
        current = self.link.current_exports()
        if current is None:
            return None  # asked again when the exports change (the ingress admits the peer)
        if current.version == self._peer_has or current.version == self._refused:
            return None
        self._in_flight = current.version
        base = self.link.history.get(self._peer_has) if self._peer_has is not None else None
        link = self.link

        def encode() -> pb.PeerMessage:
            link.persist_sent()  # the version is stored before it is sent
            if base is not None:
                return pb.PeerMessage(delta=wire.diff(base, current))
            return pb.PeerMessage(snapshot=wire.snapshot_to_proto(current))

        return encode


__all__ = ["CAPABILITIES", "PeerTerminatedError", "Session", "SessionLink"]
