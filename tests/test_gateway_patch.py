"""Gateway.apply_patch on a real gateway: what a patch adds carries bytes at once, a refused one changes nothing."""

from __future__ import annotations

import socket

import pytest

from meshfed.errors import GatewayConfigError
from meshfed.gateway import (
    Cluster,
    ConnectListener,
    ConnectRoute,
    ConnectRoutePatch,
    Endpoint,
    Gateway,
    GatewayConfig,
    GatewayPatch,
    OriginateListener,
)
from tests.conftest import EchoServer, round_trip, running_echo_server

OK = b"HTTP/1.1 200 Connection established\r\n\r\n"


def _connect(gateway: Gateway, authority: str) -> tuple[socket.socket, bytes]:
    """CONNECT to ``authority`` through listener ``proxy``: the socket and the response head."""
    sock = socket.create_connection(gateway.address("proxy"), timeout=5)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            break
        head += byte
    return sock, head


def _config(backend: EchoServer) -> GatewayConfig:
    return GatewayConfig(
        listeners=[
            ConnectListener(
                name="proxy",
                address="127.0.0.1:0",
                connect_routes=[ConnectRoute(authority="old.ns.east:80", cluster="old")],
            ),
            OriginateListener(name="keep", address="127.0.0.1:0", cluster="old"),
        ],
        clusters=[Cluster(name="old", endpoints=[Endpoint(address=backend.endpoint)])],
    )


def test_a_patch_adds_a_cluster_and_routes_that_carry_bytes(echo_server: EchoServer) -> None:
    with running_echo_server() as other, Gateway(_config(echo_server)) as gateway:
        before = gateway.addresses()
        with socket.create_connection(gateway.address("keep"), timeout=5) as live:
            assert round_trip(live, b"before") == b"before"
            gateway.apply_patch(
                GatewayPatch(
                    clusters=[Cluster(name="new", endpoints=[Endpoint(address=other.endpoint)])],
                    connect_routes=[
                        ConnectRoutePatch(
                            listener="proxy", upsert=[ConnectRoute(authority="new.ns.east:80", cluster="new")]
                        )
                    ],
                    listeners=[OriginateListener(name="added", address="127.0.0.1:0", cluster="new")],
                )
            )
            # The untouched listeners keep their sockets and the live connection.
            assert {name: gateway.addresses()[name] for name in before} == before
            assert round_trip(live, b"after") == b"after"

        sock, head = _connect(gateway, "new.ns.east:80")
        with sock:
            assert head == OK
            assert round_trip(sock, b"routed by a patch") == b"routed by a patch"
        with socket.create_connection(gateway.address("added"), timeout=5) as sock:
            assert round_trip(sock, b"listener by a patch") == b"listener by a patch"
        assert len(other.connections) == 2
        assert gateway.stats()["clusters"]["old"]["connections"] == 1


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (GatewayPatch(remove_clusters=["old"]), 'remove_clusters[0]: cluster "old" is still used by'),
        (GatewayPatch(remove_clusters=["nope"]), 'remove_clusters[0]: no cluster named "nope" to remove'),
        (
            GatewayPatch(
                clusters=[Cluster(name="spare", endpoints=[Endpoint(address="127.0.0.1:9")])],
                connect_routes=[
                    ConnectRoutePatch(listener="proxy", upsert=[ConnectRoute(authority="x.ns.east:80", cluster="x")])
                ],
            ),
            'connect_routes[0].upsert[0].cluster: no cluster named "x"',
        ),
        (
            GatewayPatch(connect_routes=[ConnectRoutePatch(listener="keep", remove=["old.ns.east:80"])]),
            'connect_routes[0].listener: listener "keep" is an originate listener',
        ),
        (b'{"identity": null}', "unknown field `identity`"),
    ],
)
def test_a_refused_patch_changes_nothing(echo_server: EchoServer, patch: GatewayPatch | bytes, message: str) -> None:
    with Gateway(_config(echo_server)) as gateway:
        addresses = gateway.addresses()
        clusters = set(gateway.stats()["clusters"])
        with pytest.raises(GatewayConfigError, match="gateway config rejected") as refused:
            gateway.apply_patch(patch)
        assert message in str(refused.value)
        assert gateway.addresses() == addresses
        assert set(gateway.stats()["clusters"]) == clusters
        sock, head = _connect(gateway, "old.ns.east:80")
        with sock:
            assert head == OK
            assert round_trip(sock, b"intact") == b"intact"
