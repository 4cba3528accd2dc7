"""Who the peering endpoints are, and how each side checks the other.

Both ends present the zone's controller SVID,
``spiffe://<td>/ns/meshfed-system/sa/controller``, with one DNS SAN,
``federation.<td>``, because gRPC insists on a host-name check: the dialer
overrides the target name with it. meshfed CAs put that DNS name on no other
certificate, so a chain that verifies against *only the peer's bundle* and
matches the name is the peer's controller.

The stream server's TLS layer verifies client chains against a pool merging
every peer's roots (grpcio has one pool per port), so :func:`authenticate_peer`
verifies the chain again at the application level against the bundle of the
trust domain in the leaf's URI SAN alone — SPIFFE federation forbids trusting
one domain's roots for another domain's IDs.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from collections.abc import Callable, Mapping

from cryptography import x509

from meshfed.addresses import parse_host_port
from meshfed.errors import MeshfedError, PeeringError, TrustError
from meshfed.trust.bundle import TrustBundle
from meshfed.trust.ca import Svid, spiffe_id_of
from meshfed.trust.spiffe import SYSTEM_NAMESPACE, SpiffeId, TrustDomain
from meshfed.trust.svid import parse_certificates, verify_x509_svid
from meshfed.zone import Zone

CONTROLLER_SVID_TTL = dt.timedelta(hours=24)


def controller_id(trust_domain: TrustDomain) -> SpiffeId:
    return trust_domain.workload(SYSTEM_NAMESPACE, "controller")


def federation_host(trust_domain: TrustDomain | str) -> str:
    """The DNS SAN on a controller SVID, and the name its peers verify."""
    return f"federation.{trust_domain}"


def issue_controller_svid(
    zone: Zone, ttl: dt.timedelta = CONTROLLER_SVID_TTL, *, generation: int | None = None
) -> Svid:
    """The controller SVID of ``zone``, with its federation DNS SAN (from CA ``generation``; default: active)."""
    return zone.authority.issue_svid(
        controller_id(zone.trust_domain), ttl, dns_names=[federation_host(zone.trust_domain)], generation=generation
    )


def needs_renewal(svid: Svid, now: dt.datetime | None = None) -> bool:
    """True past half of the SVID's lifetime (renew early, as SPIRE agents do)."""
    now = now or dt.datetime.now(dt.UTC)
    lifetime = svid.leaf.not_valid_after_utc - svid.leaf.not_valid_before_utc
    return now >= svid.leaf.not_valid_before_utc + lifetime / 2


def authenticate_peer(
    auth_context: Mapping[str, list[bytes]] | Mapping[str, object],
    bundle_of: Callable[[TrustDomain], TrustBundle | None],
) -> SpiffeId:
    """The verified SPIFFE ID of a stream's client, checked against its own trust domain's bundle only."""
    leaf_pem = auth_context.get("x509_pem_cert")
    chain_pem = auth_context.get("x509_pem_cert_chain") or []
    if not isinstance(leaf_pem, list) or not leaf_pem or not isinstance(chain_pem, list):
        raise PeeringError("the peer presented no client certificate; the peering stream needs mutual TLS")
    try:
        (leaf,) = parse_certificates(b"".join(part for part in leaf_pem if isinstance(part, bytes)))
        presented = parse_certificates(b"".join(part for part in chain_pem if isinstance(part, bytes)) or leaf_pem[0])
        # grpc reports the chain in no promised order and may include the matched root: put the leaf
        # first; verification picks issuers from the rest and stops at the bundle's roots.
        chain = (leaf, *(cert for cert in presented if cert != leaf))
        spiffe_id = verify_x509_svid(chain, bundle_of, dt.datetime.now(dt.UTC))
    except (MeshfedError, ValueError) as err:
        raise PeeringError(f"the peer's certificate does not verify: {err}") from None
    if spiffe_id != controller_id(spiffe_id.trust_domain):
        raise PeeringError(f"{spiffe_id} is not a meshfed controller; only controllers may open peering streams")
    return spiffe_id


def probe_acceptor(address: str, roots_pem: bytes, trust_domain: TrustDomain, timeout: float) -> None:
    """Connect with plain TLS and check the server is ``trust_domain``'s controller.

    grpcio exposes no peer certificate to clients, so the SPIFFE ID check of
    the establishment server happens on this separate handshake, which also
    turns "unreachable" into an error naming the address.
    """
    parsed = parse_host_port(address, what="acceptor address", allow_zero=False)
    host, port = parsed.host, parsed.port
    context = ssl.create_default_context(cadata=roots_pem.decode())
    context.set_alpn_protocols(["h2"])
    expected = controller_id(trust_domain)
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=federation_host(trust_domain)) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as err:
        raise PeeringError(
            f"{address} is not zone {trust_domain}'s controller: its certificate does not verify against the "
            f"token's CA bundle ({err.verify_message}); is the token for the zone listening there?"
        ) from None
    except (OSError, ssl.SSLError) as err:
        raise PeeringError(
            f"cannot reach the accepting zone at {address}: {err}; check that its controller runs "
            f"('meshfed up') and that port {port} is reachable from here"
        ) from None
    if der is None:
        raise PeeringError(f"{address} presented no certificate")
    try:
        presented = spiffe_id_of(x509.load_der_x509_certificate(der))
    except TrustError as err:
        raise PeeringError(f"{address} presented a certificate without a SPIFFE ID: {err}") from None
    if presented != expected:
        raise PeeringError(f"{address} presented {presented}, expected {expected}; refusing to establish")


__all__ = [
    "authenticate_peer",
    "controller_id",
    "federation_host",
    "issue_controller_svid",
    "needs_renewal",
    "probe_acceptor",
]
