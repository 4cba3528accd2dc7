"""Zero trust across zones, end to end: the calling workload's own identity reaches the exporter.

Two zones assembled as ``meshfed up`` runs them. West's egress is strict: local
workloads present west SVIDs, and west's gateway conveys the verified ID to
east's ingress inside the mTLS tunnel. East's authorization rules decide on that
ID, and east's backend reads it from a PROXY v2 header. A hostile west gateway
cannot vouch for identities outside west's trust domain.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import socketserver
import ssl
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from meshfed.catalog import EmbeddedCatalog, Endpoint, Service
from meshfed.federation.authz import AuthzRules
from meshfed.federation.exports import ExportRules
from meshfed.gateway.sni import service_sni
from meshfed.policy.authz import RuleSpec
from meshfed.runtime import ZoneRuntime, assemble_zone
from meshfed.trust.spiffe import SpiffeId
from meshfed.zone import Zone
from tests.conftest import eventually
from tests.test_e2e_federation import LOOPBACK

PROXY_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
CALLER_TLV = 0xE0
CALLER_ALPN = "meshfed-caller/1"
SERVICE, NAMESPACE, PORT = "orders", "shop", 8080
EGRESS = f"egress:{SERVICE}.{NAMESPACE}.east:tcp"
CART = "spiffe://west.mesh/ns/shop/sa/cart"
INTRUDER = "spiffe://west.mesh/ns/shop/sa/intruder"


@dataclass
class ProxyBackend:
    """A backend behind east's gateway: reads the PROXY v2 header, records the caller, echoes the rest."""

    address: tuple[str, int] = ("127.0.0.1", 0)
    callers: list[str | None] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)


def _read_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed inside the PROXY header")
        data += chunk
    return data


def parse_proxy_caller(sock: socket.socket) -> str | None:
    """Read a PROXY v2 header off ``sock``; the SPIFFE ID in TLV 0xE0, if any."""
    head = _read_exact(sock, 16)
    assert head[:12] == PROXY_SIGNATURE, head
    family, length = head[13], struct.unpack("!H", head[14:16])[0]
    body = _read_exact(sock, length)
    offset = {0x11: 12, 0x21: 36}[family]
    caller = None
    while offset < len(body):
        kind, size = body[offset], struct.unpack("!H", body[offset + 1 : offset + 3])[0]
        if kind == CALLER_TLV:
            caller = body[offset + 3 : offset + 3 + size].decode()
        offset += 3 + size
    return caller


@contextlib.contextmanager
def running_proxy_backend(*, proxy_header: bool = True) -> Iterator[ProxyBackend]:
    """``proxy_header=False``: a backend that expects none (records ``None`` per connection)."""
    state = ProxyBackend()

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            try:
                state.callers.append(parse_proxy_caller(self.request) if proxy_header else None)
            except ConnectionError:
                return
            while data := self.request.recv(65536):
                state.received.extend(data)
                self.request.sendall(data)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    server = Server(("127.0.0.1", 0), Handler)
    state.address = ("127.0.0.1", server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def proxy_header(caller: str | None) -> bytes:
    """A PROXY v2 header from 127.0.0.1:1 to 127.0.0.1:2, with ``caller`` in TLV 0xE0 if given."""
    body = socket.inet_aton("127.0.0.1") * 2 + struct.pack("!HH", 1, 2)
    if caller is not None:
        value = caller.encode()
        body += bytes([CALLER_TLV]) + struct.pack("!H", len(value)) + value
    return PROXY_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def tls_client(trusting: Zone, svid_of: Zone | None, spiffe_id: str | None, tmp: Path) -> ssl.SSLContext:
    """A client context trusting ``trusting``'s roots, presenting an SVID of ``svid_of`` if given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # SPIFFE names live in URI SANs; the roots are the check
    context.load_verify_locations(cadata=trusting.trust.own_bundle().to_pem().decode())
    if svid_of is not None and spiffe_id is not None:
        svid = svid_of.authority.issue_svid(SpiffeId.parse(spiffe_id), dt.timedelta(hours=1))
        name = spiffe_id.rsplit("/", 1)[-1]
        cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
        cert.write_bytes(svid.cert_chain_pem())
        key.write_bytes(svid.private_key_pem())
        context.load_cert_chain(cert, key)
    return context


def tls_exchange(
    address: tuple[str, int], context: ssl.SSLContext, payload: bytes, *, sni: str | None = None, first: bytes = b""
) -> bytes | str:
    """Send ``first`` + ``payload`` over TLS and read the echo; on failure, the error's text."""
    try:
        with socket.create_connection(address, timeout=5) as raw, context.wrap_socket(raw, server_hostname=sni) as tls:
            tls.sendall(first + payload)
            received = b""
            while len(received) < len(payload):
                chunk = tls.recv(65536)
                if not chunk:
                    return "closed"
                received += chunk
            return received
    except (ssl.SSLError, OSError) as err:
        return str(err)


def plain_exchange(address: tuple[str, int], payload: bytes) -> bytes | str:
    try:
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(payload)
            data = sock.recv(65536)
            return data if data else "closed"
    except OSError as err:
        return str(err)


def address_of(runtime: ZoneRuntime, listener: str) -> tuple[str, int]:
    host, port = runtime.controller.gateway.addresses()[listener]
    return host, port


def ingress_stats(runtime: ZoneRuntime) -> dict[str, Any]:
    stats: dict[str, Any] = runtime.controller.gateway_stats()["listeners"]["ingress"]
    return stats


def export_orders(east: Zone, backend: ProxyBackend) -> None:
    """orders.shop on ``backend``, exported to west with the caller in a PROXY v2 header."""
    with EmbeddedCatalog(east.directory) as catalog:
        catalog.register(
            Service(
                name=SERVICE,
                namespace=NAMESPACE,
                ports={"tcp": PORT},
                endpoints=[Endpoint(address="127.0.0.1", port=backend.address[1])],
            )
        )
    with ExportRules(east.directory) as rules:
        rules.add(SERVICE, NAMESPACE, ["west"], proxy_protocol=True)


@pytest.fixture
def zones(make_zone):
    east, west = make_zone("east"), make_zone("west")
    return east, west


def test_a_workload_identity_crosses_zones_and_east_authorizes_it(zones, tmp_path) -> None:
    east, west = zones
    with running_proxy_backend() as backend:
        export_orders(east, backend)
        with AuthzRules(east.directory) as authz:
            authz.add(RuleSpec(service=SERVICE, namespace=NAMESPACE, action="deny", id=INTRUDER))
            authz.add(RuleSpec(service=SERVICE, namespace=NAMESPACE, action="allow", id="spiffe://west.mesh/ns/shop/*"))

        async def scenario() -> None:
            e = assemble_zone(east, LOOPBACK)
            w = assemble_zone(
                west, replace(LOOPBACK, controller=replace(LOOPBACK.controller, egress_workload_tls="strict"))
            )
            for runtime in (e, w):
                await runtime.controller.start()
            try:
                await w.peering.establish(e.peering.issue_token("west").encoded, "east")
                await eventually(lambda: EGRESS in w.controller.gateway.addresses(), "west's egress for orders")
                egress, ingress = address_of(w, EGRESS), address_of(e, "ingress")
                sni = service_sni(SERVICE, NAMESPACE, PORT, east.trust_domain)

                def run(func: Any, *args: Any, **kwargs: Any) -> Any:
                    return asyncio.to_thread(func, *args, **kwargs)

                # cart, through west's strict egress: reaches east's backend, which sees exactly cart.
                cart = tls_client(west, west, CART, tmp_path)
                assert await run(tls_exchange, egress, cart, b"order #1") == b"order #1"
                assert backend.callers == [CART]

                # intruder, through the same egress: east's deny rule stops it before the backend.
                intruder = tls_client(west, west, INTRUDER, tmp_path)
                assert await run(tls_exchange, egress, intruder, b"steal") != b"steal"
                assert backend.callers == [CART]
                assert ingress_stats(e)["denied_by_trust_domain"].get("west.mesh", 0) >= 1

                # intruder calling east's ingress directly with its own SVID: refused in the handshake
                # with the TLS alert access_denied.
                direct = tls_client(east, west, INTRUDER, tmp_path)
                refused = await run(tls_exchange, ingress, direct, b"steal", sni=sni)
                assert "ACCESS_DENIED" in str(refused).upper(), refused

                # no SVID: strict egress refuses plain TCP and TLS without a client certificate.
                assert await run(plain_exchange, egress, b"hello") != b"hello"
                anonymous = tls_client(west, None, None, tmp_path)
                assert await run(tls_exchange, egress, anonymous, b"hello") != b"hello"
                assert backend.callers == [CART]

                # A hostile west gateway (west's real gateway SVID) offering the caller protocol may not
                # vouch for an east.mesh or third-domain identity; for a west one it may.
                hostile = tls_client(east, west, str(west.trust_domain.gateway_id), tmp_path)
                hostile.set_alpn_protocols([CALLER_ALPN])
                for forged in ("spiffe://east.mesh/ns/shop/sa/cart", "spiffe://third.mesh/ns/shop/sa/cart"):
                    answer = await run(tls_exchange, ingress, hostile, b"forged", sni=sni, first=proxy_header(forged))
                    assert answer != b"forged", forged
                assert backend.callers == [CART]
                vouched = await run(tls_exchange, ingress, hostile, b"vouched", sni=sni, first=proxy_header(CART))
                assert vouched == b"vouched"
                assert backend.callers == [CART, CART]

                # The caller table holds only callers that were let in.
                identities = ingress_stats(e)["peer_identities"]
                assert INTRUDER not in identities
                assert identities.get(CART, 0) >= 2
            finally:
                for runtime in (w, e):
                    await runtime.controller.stop()

        asyncio.run(scenario())
    assert bytes(backend.received) == b"order #1vouched"


def test_authz_rules_change_a_running_zone(zones, tmp_path) -> None:
    """A rule added while the zone runs applies at once; removing it restores the export's default."""
    east, west = zones
    with running_proxy_backend() as backend:
        export_orders(east, backend)

        async def scenario() -> None:
            e = assemble_zone(east, LOOPBACK)
            w = assemble_zone(
                west, replace(LOOPBACK, controller=replace(LOOPBACK.controller, egress_workload_tls="permissive"))
            )
            for runtime in (e, w):
                await runtime.controller.start()
            try:
                await w.peering.establish(e.peering.issue_token("west").encoded, "east")
                await eventually(lambda: EGRESS in w.controller.gateway.addresses(), "west's egress for orders")
                egress = address_of(w, EGRESS)
                cart = tls_client(west, west, CART, tmp_path)

                # Default (no rules): any identity of west.mesh; permissive egress serves plain clients as the gateway.
                assert await asyncio.to_thread(tls_exchange, egress, cart, b"a") == b"a"
                assert await asyncio.to_thread(plain_exchange, egress, b"b") == b"b"
                assert backend.callers == [CART, str(west.trust_domain.gateway_id)]

                with AuthzRules(east.directory) as authz:
                    rule = authz.add(RuleSpec(service=SERVICE, namespace=NAMESPACE, action="allow", id=CART))

                def gateway_denied() -> bool:
                    return plain_exchange(egress, b"c") != b"c"

                await eventually(gateway_denied, "the rule to deny west's gateway itself")
                assert await asyncio.to_thread(tls_exchange, egress, cart, b"d") == b"d"

                with AuthzRules(east.directory) as authz:
                    authz.remove(rule.rule_id)
                await eventually(lambda: plain_exchange(egress, b"e") == b"e", "the default to come back")
            finally:
                for runtime in (w, e):
                    await runtime.controller.stop()

        asyncio.run(scenario())
