"""CA rotation: phases survive restarts, and traffic between zones loses no request while a root rotates."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import threading
from dataclasses import dataclass, field

import pytest

from meshfed.errors import RotationError
from meshfed.gateway import (
    AuthzRule,
    Cluster,
    Endpoint,
    Gateway,
    GatewayConfig,
    Identity,
    OriginateListener,
    Route,
    TerminateListener,
    UpstreamTls,
    service_sni,
)
from meshfed.trust.bundle import bundle_roots_pem, fingerprint, parse_bundle
from meshfed.trust.svid import verify_x509_svid
from meshfed.zone import Zone
from meshfed.zone.rotation import RotationService
from tests.conftest import EchoServer, round_trip, trust_each_other

SVID_TTL = dt.timedelta(hours=1)
OVERLAP = dt.timedelta(minutes=15)


def test_rotate_publishes_the_new_root_at_once_and_keeps_the_old_ca_signing(make_zone):
    east = make_zone("east")
    old_root = east.trust.own_bundle().roots[0]
    t0 = dt.datetime.now(dt.UTC)
    generation = east.authority.rotate(overlap=OVERLAP, now=t0)
    bundle = east.trust.own_bundle()
    assert bundle.sequence == 2
    assert bundle.fingerprints() == [fingerprint(old_root), generation.root_fingerprint]
    assert generation.state == "published"
    assert generation.activate_at == t0 + OVERLAP
    svid = east.authority.issue_svid(east.trust_domain.gateway_id, SVID_TTL)
    assert _signed_by(svid.intermediates[0], old_root)  # still the old CA
    assert east.authority.advance(now=t0 + OVERLAP - dt.timedelta(seconds=1)) == []


def test_rotation_phases_follow_their_deadlines_and_survive_reopening_the_zone(make_zone):
    east = make_zone("east")
    old_fp = east.trust.own_bundle().fingerprints()[0]
    t0 = dt.datetime.now(dt.UTC)
    east.authority.issue_svid(east.trust_domain.gateway_id, SVID_TTL)
    new_fp = east.authority.rotate(overlap=OVERLAP, now=t0).root_fingerprint

    reopened = Zone.open(east.directory)  # a restart: nothing but the directory carries over
    steps = reopened.authority.advance(now=t0 + OVERLAP)
    assert [(step.generation, step.state) for step in steps] == [(0, "retiring"), (1, "active")]
    svid = reopened.authority.issue_svid(east.trust_domain.gateway_id, dt.timedelta(hours=2))
    assert fingerprint(_root_of(reopened, svid)) == new_fp
    assert reopened.trust.own_bundle().fingerprints() == [old_fp, new_fp]  # old root still trusted

    retire_at = {g.generation: g.retire_at for g in reopened.authority.generations()}[0]
    # Generation 0 issued only a 1 h SVID before the switch: it is retired 1 h (+1 s) after it.
    assert retire_at is not None
    assert t0 + OVERLAP + SVID_TTL <= retire_at <= t0 + OVERLAP + SVID_TTL + dt.timedelta(seconds=2)
    assert Zone.open(east.directory).authority.advance(now=retire_at - dt.timedelta(seconds=1)) == []
    steps = Zone.open(east.directory).authority.advance(now=retire_at)
    assert [(step.generation, step.state) for step in steps] == [(0, "retired")]
    bundle = east.trust.own_bundle()
    assert bundle.fingerprints() == [new_fp]
    assert bundle.sequence == 3
    assert not (east.directory / "ca" / "root.key").exists()
    assert not (east.directory / "ca" / "intermediate.key").exists()
    assert Zone.open(east.directory).authority.advance(now=retire_at + dt.timedelta(days=1)) == []


def test_a_second_rotation_is_refused_while_one_is_in_progress_and_changes_nothing(make_zone):
    east = make_zone("east")
    east.authority.rotate(overlap=OVERLAP)
    before = east.trust.own_bundle()
    with pytest.raises(RotationError, match="a rotation is in progress"):
        east.authority.rotate(overlap=OVERLAP)
    assert east.trust.own_bundle() == before
    assert len(east.authority.generations()) == 2


def test_the_default_overlap_is_three_refresh_hints(make_zone):
    east = make_zone("east")
    t0 = dt.datetime.now(dt.UTC)
    generation = east.authority.rotate(now=t0)
    assert generation.activate_at == t0 + 3 * dt.timedelta(seconds=east.trust.own_bundle().refresh_hint_seconds)


def _root_of(zone: Zone, svid):
    bundle = zone.trust.own_bundle()
    chain = (svid.leaf, *svid.intermediates)
    verify_x509_svid(chain, {zone.trust_domain: bundle}, dt.datetime.now(dt.UTC))
    return next(root for root in bundle.roots if _signed_by(svid.intermediates[0], root))


def _signed_by(cert, issuer) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:
        return False
    return True


# -- rotation under traffic ---------------------------------------------------------------------------------------


@dataclass
class Traffic:
    """Requests on fresh connections (each a full gateway-to-gateway mTLS handshake), counted."""

    address: tuple[str, int]
    succeeded: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        number = 0
        while not self.stop.is_set():
            number += 1
            payload = f"request {number}\n".encode() * 8
            try:
                with socket.create_connection(self.address, timeout=5) as sock:
                    echoed = round_trip(sock, payload)
            except OSError as err:
                self.failures.append(f"{number}: {err}")
                continue
            if echoed == payload:
                self.succeeded += 1
            else:
                self.failures.append(f"{number}: got {len(echoed)} of {len(payload)} bytes back")

    def wait_for(self, more: int) -> None:
        target = self.succeeded + more
        for _ in range(2000):
            if self.succeeded >= target or self.failures:
                return
            threading.Event().wait(0.005)
        raise AssertionError(f"traffic stalled at {self.succeeded} requests")


class Mesh:
    """Two zones' gateways, configured the way the controller does: from each zone's state."""

    def __init__(self, server: Zone, client: Zone, backend: EchoServer) -> None:
        self.server, self.client, self.backend = server, client, backend
        self.sni = service_sni("echo", "default", 7, server.trust_domain)
        self.ingress = Gateway(self._ingress_config("127.0.0.1:0"))
        self.ingress_address = self.ingress.address("ingress")
        self.egress = Gateway(self._egress_config("127.0.0.1:0"))

    def reconfigure(self) -> None:
        """What `Controller.reconfigure` does on each zone: current pools, an SVID from the CA that signs now."""
        # Same listener name and address as at start: the gateway keeps the bound socket.
        self.ingress.apply(self._ingress_config("127.0.0.1:0"))
        self.egress.apply(self._egress_config("127.0.0.1:0"))

    def close(self) -> None:
        self.egress.close()
        self.ingress.close()

    def _ingress_config(self, address: str) -> GatewayConfig:
        return GatewayConfig(
            identity=_identity(self.server),
            trust_bundles=bundle_roots_pem([s.bundle for s in self.server.trust.trusted_bundles()]),
            listeners=[
                TerminateListener(
                    name="ingress",
                    address=address,
                    routes=[
                        Route(
                            sni=self.sni,
                            cluster="echo",
                            rules=[AuthzRule(action="allow", id=f"spiffe://{self.client.trust_domain}/*")],
                        )
                    ],
                )
            ],
            clusters=[Cluster(name="echo", endpoints=[Endpoint(address=self.backend.endpoint)])],
        )

    def _egress_config(self, address: str) -> GatewayConfig:
        return GatewayConfig(
            identity=_identity(self.client),
            trust_bundles=bundle_roots_pem([s.bundle for s in self.client.trust.trusted_bundles()]),
            listeners=[
                OriginateListener(
                    name="egress",
                    address=address,
                    cluster="peer",
                )
            ],
            clusters=[
                Cluster(
                    name="peer",
                    endpoints=[Endpoint(address=f"{self.ingress_address[0]}:{self.ingress_address[1]}")],
                    tls=UpstreamTls(sni=self.sni, peer_spiffe_id=str(self.server.trust_domain.gateway_id)),
                )
            ],
        )


def _identity(zone: Zone) -> Identity:
    svid = zone.authority.issue_svid(zone.trust_domain.gateway_id, SVID_TTL)
    return Identity(cert_chain_pem=svid.cert_chain_pem().decode(), private_key_pem=svid.private_key_pem().decode())


def _publish(exporter: Zone, importer: Zone) -> None:
    """The bundle reaching the peer in the SPIFFE wire form (what the poller or peering stream does)."""
    importer.trust.import_bundle(parse_bundle(exporter.trust_domain, exporter.trust.own_bundle().to_spiffe_json()))


@pytest.mark.parametrize("rotating", ["server", "client"])
def test_rotating_a_root_under_traffic_between_zones_loses_no_request(make_zone, echo_server, rotating):
    east, west = make_zone("east"), make_zone("west")
    trust_each_other(east, west)
    mesh = Mesh(server=east, client=west, backend=echo_server)
    zone, peer = (east, west) if rotating == "server" else (west, east)
    clock = [dt.datetime.now(dt.UTC)]

    changed = asyncio.Event()

    async def on_trust_changed() -> None:
        # The rotating zone's controller reconfigures; the peer learns the bundle and reconfigures too.
        _publish(zone, peer)
        await asyncio.to_thread(mesh.reconfigure)
        changed.set()

    async def rotate_under_traffic(traffic: Traffic, long_lived: socket.socket) -> list[int]:
        service = RotationService(
            zone, on_trust_changed, check_interval=dt.timedelta(seconds=60), clock=lambda: clock[0]
        )
        await service.start()
        sequences = []
        try:
            for move in (None, OVERLAP, SVID_TTL + dt.timedelta(seconds=2)):
                changed.clear()  # before the change: the service may notice it on its own, before wake()
                if move is None:
                    await asyncio.to_thread(zone.authority.rotate, OVERLAP, clock[0])  # as `meshfed trust rotate` does
                else:
                    clock[0] += move
                service.wake()
                await asyncio.wait_for(changed.wait(), timeout=10)
                sequences.append(zone.trust.own_bundle().sequence)
                await asyncio.to_thread(traffic.wait_for, 50)
                assert round_trip(long_lived, b"still here") == b"still here"
        finally:
            await service.stop()
        return sequences

    traffic = Traffic(mesh.egress.address("egress"))
    thread = threading.Thread(target=traffic.run, name="traffic")
    try:
        with socket.create_connection(mesh.egress.address("egress"), timeout=5) as long_lived:
            assert round_trip(long_lived, b"hello") == b"hello"
            thread.start()
            traffic.wait_for(50)
            sequences = asyncio.run(rotate_under_traffic(traffic, long_lived))
    finally:
        traffic.stop.set()
        if thread.is_alive():
            thread.join()
        mesh.close()

    assert traffic.failures == []
    assert traffic.succeeded >= 200
    assert sequences == [2, 2, 3]
    new_root = next(g for g in zone.authority.generations() if g.state == "active").root_fingerprint
    held = peer.trust.bundle_of(zone.trust_domain)
    assert held is not None
    assert held.fingerprints() == [new_root]
    print(f"rotation of the {rotating} zone under traffic: {traffic.succeeded} requests, 0 failed")


def test_switching_to_a_new_root_the_peer_does_not_know_yet_fails_requests(make_zone, echo_server):
    # The control experiment: the same traffic, but the server signs with its new CA before
    # the client zone has the new root. This is the outage the overlap exists to prevent.
    east, west = make_zone("east"), make_zone("west")
    trust_each_other(east, west)
    mesh = Mesh(server=east, client=west, backend=echo_server)
    try:
        t0 = dt.datetime.now(dt.UTC)
        east.authority.rotate(overlap=OVERLAP, now=t0)
        east.authority.advance(now=t0 + OVERLAP)
        mesh.reconfigure()  # east presents an SVID from the new CA; west still trusts only the old root
        with socket.create_connection(mesh.egress.address("egress"), timeout=5) as sock:
            try:
                echoed = round_trip(sock, b"ping")
            except ConnectionError:
                echoed = b""
            assert echoed != b"ping"
        assert mesh.egress.stats()["listeners"]["egress"]["peer_identities"] == {}
    finally:
        mesh.close()
