"""The Rust gateway driven from Python, with real TLS on loopback."""

from __future__ import annotations

import socket
import ssl

import pytest

from meshfed.errors import GatewayConfigError, GatewayError
from meshfed.gateway import (
    AuthzRule,
    Cluster,
    Endpoint,
    Gateway,
    GatewayConfig,
    OriginateListener,
    PassthroughListener,
    Route,
    TerminateListener,
    UpstreamTls,
    service_sni,
)
from meshfed.gateway.handle import compile_config
from meshfed.trust.bundle import bundle_roots_pem
from meshfed.zone import Zone
from tests.conftest import (
    EchoServer,
    client_hello_bytes,
    gateway_identity,
    round_trip,
    settled,
    trust_each_other,
    write_svid,
)

ECHO = "echo"


def _ingress(zone: Zone, sni: str, backend: EchoServer, allow: list[str]) -> GatewayConfig:
    return GatewayConfig(
        identity=gateway_identity(zone),
        trust_bundles=bundle_roots_pem([s.bundle for s in zone.trust.trusted_bundles()]),
        listeners=[
            TerminateListener(
                name="ingress",
                address="127.0.0.1:0",
                routes=[
                    Route(sni=sni, cluster=ECHO, rules=[AuthzRule(action="allow", id=pattern) for pattern in allow])
                ],
            )
        ],
        clusters=[Cluster(name=ECHO, endpoints=[Endpoint(address=backend.endpoint)])],
    )


def _egress(zone: Zone, peer: Zone, sni: str, ingress: tuple[str, int]) -> GatewayConfig:
    return GatewayConfig(
        identity=gateway_identity(zone),
        trust_bundles=bundle_roots_pem([s.bundle for s in zone.trust.trusted_bundles()]),
        listeners=[
            OriginateListener(
                name="egress",
                address="127.0.0.1:0",
                cluster="peer",
            )
        ],
        clusters=[
            Cluster(
                name="peer",
                endpoints=[Endpoint(address=f"{ingress[0]}:{ingress[1]}")],
                tls=UpstreamTls(sni=sni, peer_spiffe_id=str(peer.trust_domain.gateway_id)),
            )
        ],
    )


def _mtls_client(zone: Zone, spiffe_id: str, server_zone: Zone, tmp_path) -> ssl.SSLContext:
    files = write_svid(zone, spiffe_id, tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # SVIDs name workloads by URI SAN, not DNS
    context.load_verify_locations(cadata=server_zone.trust.own_bundle().to_pem().decode())
    context.load_cert_chain(files.cert, files.key)
    return context


def _connection_is_refused(sock: socket.socket) -> bool:
    """True if the peer closes or errors instead of echoing."""
    try:
        sock.sendall(b"ping")
        return sock.recv(16) == b""
    except (ssl.SSLError, ConnectionError):
        return True


@pytest.fixture
def federated(make_zone):
    east, west = make_zone("east"), make_zone("west")
    trust_each_other(east, west)
    return east, west


def test_bytes_flow_egress_to_ingress_to_backend_with_both_identities_verified(federated, echo_server):
    east, west = federated
    sni = service_sni("echo", "default", 7, east.trust_domain)
    with (
        Gateway(_ingress(east, sni, echo_server, allow=["spiffe://west.mesh/*"])) as ingress,
        Gateway(_egress(west, east, sni, ingress.address("ingress"))) as egress,
        socket.create_connection(egress.address("egress"), timeout=5) as sock,
    ):
        payload = b"x" * 100_000
        assert round_trip(sock, payload) == payload
        sock.close()
        ingress_stats = ingress.stats()["listeners"]["ingress"]
        egress_stats = egress.stats()["listeners"]["egress"]
    assert ingress_stats["peer_identities"] == {str(west.trust_domain.gateway_id): 1}
    assert egress_stats["peer_identities"] == {str(east.trust_domain.gateway_id): 1}
    assert bytes(echo_server.received) == payload


def test_terminate_refuses_a_client_from_an_unimported_trust_domain(federated, make_zone, echo_server, tmp_path):
    east, _ = federated
    stranger = make_zone("stranger")  # east never imported stranger.mesh
    sni = service_sni("echo", "default", 7, east.trust_domain)
    with Gateway(_ingress(east, sni, echo_server, allow=["*"])) as ingress:
        context = _mtls_client(stranger, "spiffe://stranger.mesh/ns/default/sa/app", east, tmp_path)
        with (
            socket.create_connection(ingress.address("ingress"), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=sni) as tls,
        ):
            assert _connection_is_refused(tls)
        stats = settled(
            lambda: ingress.stats()["listeners"]["ingress"],
            lambda listener: listener["handshake_failures"] >= 1,
            "the ingress to count the handshake failure",
        )
    assert stats["peer_identities"] == {}
    assert echo_server.connections == []


def test_terminate_denies_a_trusted_caller_the_route_does_not_allow(federated, echo_server, tmp_path):
    east, west = federated
    sni = service_sni("echo", "default", 7, east.trust_domain)
    with Gateway(_ingress(east, sni, echo_server, allow=["spiffe://west.mesh/ns/payments/*"])) as ingress:
        context = _mtls_client(west, "spiffe://west.mesh/ns/default/sa/app", east, tmp_path)
        with (
            socket.create_connection(ingress.address("ingress"), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=sni) as tls,
        ):
            assert _connection_is_refused(tls)
        settled(
            lambda: ingress.stats()["listeners"]["ingress"]["denied"], lambda denied: denied == 1, "the denial counted"
        )
    assert echo_server.connections == []


def test_passthrough_routes_on_sni_and_closes_unknown_names(echo_server):
    config = GatewayConfig(
        listeners=[
            PassthroughListener(name="sni", address="127.0.0.1:0", routes=[Route(sni="known.example", cluster=ECHO)])
        ],
        clusters=[Cluster(name=ECHO, endpoints=[Endpoint(address=echo_server.endpoint)])],
    )
    context = ssl.create_default_context()
    with Gateway(config) as gateway:
        with (
            socket.create_connection(gateway.address("sni"), timeout=5) as raw,
            pytest.raises((ssl.SSLError, ConnectionError, OSError)),
        ):
            context.wrap_socket(raw, server_hostname="unknown.example")
        assert echo_server.connections == []
        settled(
            lambda: gateway.stats()["listeners"]["sni"]["no_route"], lambda count: count == 1, "the no-route counted"
        )

        # A known name is forwarded untouched: the echo server returns our own
        # ClientHello, which proves the bytes reached it unmodified.
        with socket.create_connection(gateway.address("sni"), timeout=5) as raw:
            hello = client_hello_bytes("known.example")
            assert round_trip(raw, hello) == hello
    assert len(echo_server.connections) == 1


def test_malformed_config_is_rejected_naming_the_field_and_the_old_one_keeps_serving(federated, echo_server):
    east, west = federated
    sni = service_sni("echo", "default", 7, east.trust_domain)
    good = _ingress(east, sni, echo_server, allow=["spiffe://west.mesh/*"])
    with Gateway(good) as ingress, Gateway(_egress(west, east, sni, ingress.address("ingress"))) as egress:
        bad_documents = {
            b"not json": "gateway config rejected",
            b'{"listeners": [{"name": "x", "address": "127.0.0.1:0", "mode": "bogus"}]}': "listeners[0]",
            good.to_json().replace(b'"cluster":"echo"', b'"cluster":"nowhere"'): "listeners[0].routes[0].cluster",
            good.to_json().replace(b'"address":"127.0.0.1:0"', b'"address":"not-an-address"'): "listeners[0].address",
            good.to_json().replace(b'"handshake_timeout_ms"', b'"handshake_timeout_msx"'): "handshake_timeout_msx",
        }
        for document, field in bad_documents.items():
            with pytest.raises(GatewayConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
                ingress.apply(document)
        with socket.create_connection(egress.address("egress"), timeout=5) as sock:
            assert round_trip(sock, b"still serving") == b"still serving"


def test_apply_keeps_live_connections_and_listener_ports(federated, echo_server):
    east, west = federated
    sni = service_sni("echo", "default", 7, east.trust_domain)
    config = _ingress(east, sni, echo_server, allow=["spiffe://west.mesh/*"])
    with Gateway(config) as ingress, Gateway(_egress(west, east, sni, ingress.address("ingress"))) as egress:
        port_before = ingress.address("ingress")
        with socket.create_connection(egress.address("egress"), timeout=5) as sock:
            assert round_trip(sock, b"before") == b"before"
            extra = PassthroughListener(name="extra", address="127.0.0.1:0", routes=[Route(sni="x", cluster=ECHO)])
            ingress.apply(config.model_copy(update={"listeners": [*config.listeners, extra]}))
            assert round_trip(sock, b"after") == b"after"
        assert ingress.address("ingress") == port_before
        assert set(ingress.addresses()) == {"ingress", "extra"}


def test_a_port_in_use_is_reported_with_the_listener_name(echo_server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = GatewayConfig(
            listeners=[
                PassthroughListener(name="busy", address=f"127.0.0.1:{port}", routes=[Route(sni="x", cluster=ECHO)])
            ],
            clusters=[Cluster(name=ECHO, endpoints=[Endpoint(address=echo_server.endpoint)])],
        )
        with pytest.raises(GatewayError, match="busy"):
            Gateway(config)


def test_a_compiled_config_applies_once_and_a_bad_one_is_refused_when_compiled(echo_server):
    """The driver compiles each config once, to check it, and applies what it compiled."""
    base = GatewayConfig(clusters=[Cluster(name=ECHO, endpoints=[Endpoint(address=echo_server.endpoint)])])
    sni = PassthroughListener(name="sni", address="127.0.0.1:0", routes=[Route(sni="known.example", cluster=ECHO)])
    with pytest.raises(GatewayConfigError, match=r"listeners\[0\]\.routes\[0\]\.cluster"):
        compile_config(GatewayConfig(listeners=[sni]))
    with Gateway(base) as gateway:
        compiled = compile_config(base.model_copy(update={"listeners": [sni]}))
        gateway.apply(compiled)
        assert set(gateway.addresses()) == {"sni"}
        with pytest.raises(GatewayError, match="applied already"):
            gateway.apply(compiled)
        assert set(gateway.addresses()) == {"sni"}
    # A gateway starts with a compiled config too (the driver's first one), once.
    first = compile_config(base.model_copy(update={"listeners": [sni]}))
    with Gateway(first) as gateway:
        assert set(gateway.addresses()) == {"sni"}
    with pytest.raises(GatewayError, match="applied already"):
        Gateway(first)
