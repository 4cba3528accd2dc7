"""A hostile peer for the peering tests, and zones run the way `meshfed up` runs them.

:class:`HostilePeer` is a real zone directory that establishes a real peering
with the zone under test (a token from the running zone, the real
``establish``), then opens the peering stream itself over real mTLS with its
real controller SVID, so it can say whatever a scenario needs: after its Hello,
any message, valid or not, and it reads what the target answers. With a
:class:`ForgedIdentity` instead of a zone it is a peer with a hand-made CA (a
trust domain no meshfed CA could be made for), establishing with a raw
Establish call.

:class:`RunningZone` is an assembled zone (controller, peering, rotation,
pollers) on loopback with ephemeral ports; its addresses are kept after the
first start, so a restart on the same directory listens where peers expect it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshfed.catalog import EmbeddedCatalog, Endpoint, Service
from meshfed.federation import dialer
from meshfed.federation import service as peering_service
from meshfed.federation._proto import peering_pb2 as pb
from meshfed.federation._proto import peering_pb2_grpc as pb_grpc
from meshfed.federation.exports import ExportRules
from meshfed.federation.gateway_config import INGRESS_LISTENER
from meshfed.federation.identity import federation_host, issue_controller_svid
from meshfed.federation.peer_status import PeerStatus
from meshfed.federation.token import decode_token
from meshfed.runtime import ZoneRuntime, ZoneSettings, assemble_zone
from meshfed.trust.bundle import TrustBundle, parse_bundle
from meshfed.trust.spiffe import TrustDomain
from meshfed.zone import Zone
from tests.conftest import key_usage
from tests.test_e2e_federation import LOOPBACK as E2E_LOOPBACK

# The registered endpoints are not real: let the catalog alone say what is healthy.
LOOPBACK = replace(E2E_LOOPBACK, controller=replace(E2E_LOOPBACK.controller, health_check=None))
# Where a hostile peer says its gateway is: a valid address nobody needs to reach.
SOME_GATEWAY = "127.0.0.1:9"


class RunningZone:
    """One zone assembled as `meshfed up` assembles it; restartable on the same directory and addresses."""

    def __init__(self, zone: Zone, settings: ZoneSettings = LOOPBACK) -> None:
        self.zone = zone
        self.settings = settings
        self._runtime: ZoneRuntime | None = None

    @property
    def runtime(self) -> ZoneRuntime:
        assert self._runtime is not None, f"zone {self.zone.name} is not running"
        return self._runtime

    @property
    def peering(self) -> peering_service.PeeringService:
        return self.runtime.peering

    @property
    def running(self) -> bool:
        return self._runtime is not None

    async def start(self, **overrides: Any) -> ZoneRuntime:
        """Assemble and start; ``overrides`` set public attributes of the peering service before it starts."""
        runtime = assemble_zone(self.zone, self.settings)
        for name, value in overrides.items():
            assert hasattr(runtime.peering, name), name
            setattr(runtime.peering, name, value)
        await runtime.controller.start()
        self._runtime = runtime
        # Keep the addresses: peers hold them (the dialer's stored peer address, the peer's imports).
        host, port = runtime.controller.gateway.address(INGRESS_LISTENER)
        self.settings = replace(
            self.settings,
            controller=replace(self.settings.controller, gateway_address=f"{host}:{port}"),
            peering=replace(
                self.settings.peering,
                listen_address=runtime.peering.stream_addresses[0],
                establish_address=runtime.peering.establish_addresses[0],
            ),
        )
        return runtime

    async def stop(self) -> None:
        if self._runtime is not None:
            runtime, self._runtime = self._runtime, None
            await runtime.controller.stop()

    async def restart(self, **overrides: Any) -> ZoneRuntime:
        await self.stop()
        return await self.start(**overrides)

    def status(self, peer: str) -> PeerStatus:
        return self.peering.peer(peer)

    def state(self, peer: str) -> str:
        return str(self.status(peer).state)

    def listeners(self) -> set[str]:
        return set(self.runtime.controller.gateway.addresses())

    def has_import(self, service: str, peer: str, port: str = "tcp", namespace: str = "default") -> bool:
        return egress(service, peer, port, namespace) in self.listeners()


def egress(service: str, peer: str, port: str = "tcp", namespace: str = "default") -> str:
    """The egress listener of an import."""
    return f"egress:{service}.{namespace}.{peer}:{port}"


def export(zone: Zone, name: str, to: str, *, port: int = 7, endpoint: tuple[str, int] = ("127.0.0.1", 1)) -> None:
    """Register ``name`` in the zone's embedded catalog and export it to peer ``to``, as the CLI does."""
    with EmbeddedCatalog(zone.directory) as catalog:
        catalog.register(
            Service(name=name, ports={"tcp": port}, endpoints=[Endpoint(address=endpoint[0], port=endpoint[1])])
        )
    with ExportRules(zone.directory) as rules:
        rules.add(name, "default", [to])


# -- messages ------------------------------------------------------------------------------------------------------


def service(
    name: str,
    ports: Mapping[str, int] | None = None,
    *,
    namespace: str = "default",
    healthy: int = 1,
    total: int = 1,
) -> pb.ExportedService:
    return pb.ExportedService(
        name=name,
        namespace=namespace,
        ports=dict(ports if ports is not None else {"http": 8080}),
        healthy_endpoints=healthy,
        total_endpoints=total,
    )


def snapshot(
    version: int,
    services: Iterable[pb.ExportedService] = (),
    *,
    epoch: str = "e1",
    addresses: Iterable[str] = (SOME_GATEWAY,),
) -> pb.PeerMessage:
    return pb.PeerMessage(
        snapshot=pb.Snapshot(version=version, epoch=epoch, gateway_addresses=list(addresses), services=list(services))
    )


def delta(
    from_version: int,
    version: int,
    upserted: Iterable[pb.ExportedService] = (),
    *,
    epoch: str = "e1",
    addresses: Iterable[str] = (SOME_GATEWAY,),
) -> pb.PeerMessage:
    return pb.PeerMessage(
        delta=pb.Delta(
            from_version=from_version,
            version=version,
            epoch=epoch,
            gateway_addresses=list(addresses),
            upserted=list(upserted),
        )
    )


# -- the hostile peer ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForgedIdentity:
    """A trust domain with a hand-made CA, as a peer that does not run meshfed could have.

    meshfed's own CAs put the trust domain into their certificates' common names (at most 64
    characters); a hand-made CA need not, so its trust domain may be as long as SPIFFE allows.
    """

    zone: str
    trust_domain: TrustDomain
    root: x509.Certificate
    key_pem: bytes
    chain_pem: bytes

    @property
    def bundle(self) -> TrustBundle:
        return TrustBundle(self.trust_domain, (self.root,), sequence=1)


def forged_identity(zone: str, trust_domain: str) -> ForgedIdentity:
    """A root for ``trust_domain`` and a controller SVID issued by it (short common names)."""
    domain = TrustDomain(trust_domain)  # not parse(): a forger need not keep the rules
    now = dt.datetime.now(dt.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged root")])
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(domain.id))]), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged controller")]))
        .issuer_name(root_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(ca=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    # Written out, not built with controller_id(): that would refuse an overlong domain.
                    x509.UniformResourceIdentifier(f"spiffe://{domain}/ns/meshfed-system/sa/controller"),
                    x509.DNSName(federation_host(domain)),
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ForgedIdentity(zone, domain, root, key_pem, leaf.public_bytes(serialization.Encoding.PEM))


@dataclass
class HostilePeer:
    """A zone that peers for real, then speaks the stream protocol by hand.

    ``zone`` is a real zone directory (its CA, its controller SVID, the real ``establish``); or, with
    ``forged``, a hand-made identity that redeems the token with a raw Establish call.
    """

    zone: Zone | None
    target: RunningZone
    forged: ForgedIdentity | None = None
    received: list[pb.PeerMessage] = field(default_factory=list)
    _acks: asyncio.Queue[pb.Ack] = field(default_factory=asyncio.Queue)
    _channel: grpc.aio.Channel | None = None
    _call: Any = None
    _reader: asyncio.Task[None] | None = None
    _target_bundle: TrustBundle | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        if self.forged is not None:
            return self.forged.zone
        assert self.zone is not None
        return self.zone.name

    @property
    def trust_domain(self) -> TrustDomain:
        if self.forged is not None:
            return self.forged.trust_domain
        assert self.zone is not None
        return self.zone.trust_domain

    async def establish(self) -> None:
        """Redeem a token of the running target, as `meshfed peer establish` would; the target names us ``name``."""
        token = self.target.peering.issue_token(self.name).encoded
        if self.forged is None:
            assert self.zone is not None
            await dialer.establish(self.zone, token, self.target.zone.name, stream_addresses=[])
            self._target_bundle = self.zone.trust.bundle_of(self.target.zone.trust_domain)
            return
        decoded = decode_token(token)
        target_domain = self.target.zone.trust_domain
        options = [("grpc.ssl_target_name_override", federation_host(target_domain))]
        roots = grpc.ssl_channel_credentials(parse_bundle(target_domain, decoded.ca_bundle.encode()).to_pem())
        async with grpc.aio.secure_channel(decoded.addresses[0], roots, options=options) as channel:
            stub = pb_grpc.PeeringEstablishmentStub(channel)  # type: ignore[no-untyped-call]
            request = pb.EstablishRequest(
                secret=decoded.secret,
                peer_name=decoded.peer_name,
                zone=self.name,
                trust_domain=self.trust_domain.name,
                bundle=self.forged.bundle.to_spiffe_json(),
            )
            response = await stub.Establish(request, timeout=10)
        self._target_bundle = parse_bundle(target_domain, response.bundle)

    async def connect(
        self,
        *,
        heartbeat_interval_ms: int = 60_000,
        last_acked_version: int = 0,
        last_acked_epoch: str = "",
        bundle_sequence: int = 1,
    ) -> pb.Hello:
        """Open the stream with our controller SVID, say hello, and return the target's hello."""
        target_domain = self.target.zone.trust_domain
        assert self._target_bundle is not None, "establish first"
        if self.forged is not None:
            key_pem, chain_pem = self.forged.key_pem, self.forged.chain_pem
        else:
            assert self.zone is not None
            svid = issue_controller_svid(self.zone)
            key_pem, chain_pem = svid.private_key_pem(), svid.cert_chain_pem()
        credentials = grpc.ssl_channel_credentials(self._target_bundle.to_pem(), key_pem, chain_pem)
        self._channel = grpc.aio.secure_channel(
            self.target.peering.stream_addresses[0],
            credentials,
            options=[("grpc.ssl_target_name_override", federation_host(target_domain))],
        )
        self._call = pb_grpc.PeeringStreamStub(self._channel).Stream()  # type: ignore[no-untyped-call]
        self.received, self._acks, self.ended = [], asyncio.Queue(), asyncio.Event()
        hello = pb.Hello(
            zone=self.name,
            trust_domain=self.trust_domain.name,
            capabilities=["delta"],
            last_acked_version=last_acked_version,
            last_acked_epoch=last_acked_epoch,
            heartbeat_interval_ms=heartbeat_interval_ms,
            bundle_sequence=bundle_sequence,
        )
        await self._call.write(pb.PeerMessage(hello=hello))
        first = await asyncio.wait_for(self._call.read(), 10)
        assert isinstance(first, pb.PeerMessage), first
        assert first.WhichOneof("body") == "hello", first
        self._reader = asyncio.create_task(self._read(), name=f"hostile-{self.name}-read")
        return first.hello

    async def _read(self) -> None:
        try:
            while True:
                message = await self._call.read()
                if message is grpc.aio.EOF:
                    return
                self.received.append(message)
                if message.WhichOneof("body") == "ack":
                    self._acks.put_nowait(message.ack)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            return
        finally:
            self.ended.set()

    async def send(self, message: pb.PeerMessage) -> None:
        await self._call.write(message)

    async def update(self, message: pb.PeerMessage, timeout: float = 10.0) -> pb.Ack:
        """Send a snapshot or delta and return the target's answer to it."""
        await self.send(message)
        return await self.next_ack(timeout)

    async def next_ack(self, timeout: float = 10.0) -> pb.Ack:
        try:
            return await asyncio.wait_for(self._acks.get(), timeout)
        except TimeoutError:
            raise AssertionError(f"no ack from {self.target.zone.name} within {timeout} s") from None

    def kinds(self) -> list[str]:
        return [str(message.WhichOneof("body")) for message in self.received]

    async def half_close(self) -> None:
        """Close our side of the stream cleanly (the target reads the end of the stream)."""
        await self._call.done_writing()

    async def close(self) -> None:
        """Drop the connection without a word (the process died, the network went)."""
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None


__all__ = [
    "LOOPBACK",
    "SOME_GATEWAY",
    "ForgedIdentity",
    "HostilePeer",
    "RunningZone",
    "delta",
    "egress",
    "export",
    "forged_identity",
    "service",
    "snapshot",
]
