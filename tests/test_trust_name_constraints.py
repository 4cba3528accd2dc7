"""Name constraints on the zone CA: the root permits URI names of its own trust domain only.

Who enforces them, tested here against the real implementations: OpenSSL (the
``openssl verify`` of an operator, Python's ``ssl``) refuses a leaf of another
trust domain under the root; rustls-webpki 0.103 (the Rust gateway) implements
no URI constraints and fails closed, so the gateway is given each root as a
trust anchor without its URI subtrees (``bundle_roots_pem``), and the zone's
intermediates carry none. SPIRE's acceptance (Go's crypto/x509) is in
``tests/test_spire_interop.py``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshfed.gateway import (
    AuthzRule,
    Cluster,
    Endpoint,
    Gateway,
    GatewayConfig,
    Route,
    TerminateListener,
    service_sni,
)
from meshfed.store import StateStore
from meshfed.trust.bundle import TrustBundle, bundle_roots_pem, fingerprint, gateway_anchor, permitted_uri_hosts
from meshfed.trust.ca import certificates_to_pem, load_private_key_pem, private_key_to_pem
from meshfed.trust.spiffe import TrustDomain
from meshfed.zone import Zone
from tests.conftest import EchoServer, gateway_identity, round_trip, trust_each_other

CLIENT_ID = "spiffe://west.mesh/ns/default/sa/client"


def _constraints(cert: x509.Certificate) -> x509.Extension[x509.NameConstraints] | None:
    try:
        return cert.extensions.get_extension_for_class(x509.NameConstraints)
    except x509.ExtensionNotFound:
        return None


def _root_key(zone: Zone, directory: str = "ca") -> ec.EllipticCurvePrivateKey:
    return load_private_key_pem((zone.directory / directory / "root.key").read_bytes(), "root key")


def _leaf(issuer: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey, spiffe_id: str):
    """A leaf signed directly with the issuer's key: what a CA compromised or misused could sign."""
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )
    return cert, key


def _intermediate(
    root: x509.Certificate,
    root_key: ec.EllipticCurvePrivateKey,
    trust_domain: str,
    constraints: x509.NameConstraints | None,
):
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test intermediate")]))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False
        )
    )
    if constraints is not None:
        builder = builder.add_extension(constraints, critical=True)
    return builder.sign(root_key, hashes.SHA256()), key


def test_a_zone_root_permits_only_its_own_trust_domain_and_its_intermediate_carries_no_constraints(make_zone):
    east = make_zone("east")
    authority = east.authority.signing_ca()
    constraints = _constraints(authority.root)
    assert constraints is not None
    assert constraints.critical
    assert constraints.value.permitted_subtrees == [x509.UniformResourceIdentifier("east.mesh")]
    assert constraints.value.excluded_subtrees is None
    assert _constraints(authority.intermediate) is None
    generation = east.authority.rotate(overlap=dt.timedelta(0))
    rotated = (east.directory / generation.directory / "root.pem").read_bytes()
    assert permitted_uri_hosts(x509.load_pem_x509_certificate(rotated)) == ["east.mesh"]


def _openssl_verify(tmp_path: Path, roots: bytes, chain: list[x509.Certificate]) -> subprocess.CompletedProcess[str]:
    (tmp_path / "roots.pem").write_bytes(roots)
    (tmp_path / "leaf.pem").write_bytes(certificates_to_pem(chain[:1])[0])
    (tmp_path / "untrusted.pem").write_bytes(b"".join(certificates_to_pem(chain)))
    return subprocess.run(
        ["openssl", "verify", "-CAfile", "roots.pem", "-untrusted", "untrusted.pem", "leaf.pem"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )


def test_openssl_refuses_a_leaf_of_another_trust_domain_signed_under_the_root(make_zone, tmp_path):
    east = make_zone("east")
    authority = east.authority.signing_ca()
    roots = east.trust.own_bundle().to_pem()
    own, _ = _leaf(authority.intermediate, authority.intermediate_key, "spiffe://east.mesh/ns/default/sa/web")
    assert _openssl_verify(tmp_path, roots, [own, authority.intermediate]).returncode == 0
    # The intermediate's key signs an ID of west.mesh: the root's constraints refuse the path.
    forged, _ = _leaf(authority.intermediate, authority.intermediate_key, "spiffe://west.mesh/ns/default/sa/web")
    refused = _openssl_verify(tmp_path, roots, [forged, authority.intermediate])
    assert refused.returncode != 0
    assert "permitted subtree violation" in refused.stdout + refused.stderr


def _ingress(east: Zone, backend: EchoServer, trust_bundles: dict[str, str]) -> tuple[GatewayConfig, str]:
    sni = service_sni("echo", "default", 7, east.trust_domain)
    config = GatewayConfig(
        identity=gateway_identity(east),
        trust_bundles=trust_bundles,
        listeners=[
            TerminateListener(
                name="ingress",
                address="127.0.0.1:0",
                routes=[Route(sni=sni, cluster="echo", rules=[AuthzRule(action="allow", id="spiffe://west.mesh/*")])],
            )
        ],
        clusters=[Cluster(name="echo", endpoints=[Endpoint(address=backend.endpoint)])],
    )
    return config, sni


def _call(
    gateway: Gateway,
    sni: str,
    server: Zone,
    chain: list[x509.Certificate],
    key: ec.EllipticCurvePrivateKey,
    tmp_path: Path,
) -> bool:
    """One mTLS round trip through the ingress presenting ``chain``; False if the gateway refuses it."""
    cert_file, key_file = tmp_path / "client.pem", tmp_path / "client.key"
    cert_file.write_bytes(b"".join(certificates_to_pem(chain)))
    key_file.write_bytes(private_key_to_pem(key))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # SVIDs name workloads by URI SAN
    # OpenSSL checks the gateway's SVID against east's root, name constraints included.
    context.load_verify_locations(cadata=server.trust.own_bundle().to_pem().decode())
    context.load_cert_chain(cert_file, key_file)
    try:
        with (
            socket.create_connection(gateway.address("ingress"), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=sni) as tls,
        ):
            return round_trip(tls, b"ping") == b"ping"
    except (ssl.SSLError, ConnectionError):
        return False


def test_the_gateway_verifies_svids_under_constrained_roots_through_the_anchors_it_is_given(
    make_zone, echo_server, tmp_path
):
    east, west = make_zone("east"), make_zone("west")
    trust_each_other(east, west)
    svid = west.authority.issue_svid(west.trust_domain.workload("default", "client"), dt.timedelta(hours=1))
    config, sni = _ingress(east, echo_server, bundle_roots_pem([s.bundle for s in east.trust.trusted_bundles()]))
    with Gateway(config) as gateway:
        assert _call(gateway, sni, east, [svid.leaf, *svid.intermediates], svid.private_key, tmp_path)


def test_webpki_fails_closed_on_uri_constraints_so_raw_roots_would_refuse_every_svid(make_zone, echo_server, tmp_path):
    """Pins why the gateway gets anchors without URI subtrees: should webpki learn URI constraints,
    this fails, and ``gateway_anchor`` can go."""
    east, west = make_zone("east"), make_zone("west")
    trust_each_other(east, west)
    svid = west.authority.issue_svid(west.trust_domain.workload("default", "client"), dt.timedelta(hours=1))
    raw = {s.bundle.trust_domain.name: s.bundle.to_pem().decode() for s in east.trust.trusted_bundles()}
    config, sni = _ingress(east, echo_server, raw)
    with Gateway(config) as gateway:
        assert not _call(gateway, sni, east, [svid.leaf, *svid.intermediates], svid.private_key, tmp_path)


@pytest.mark.parametrize("constrained", [False, True])
def test_an_intermediate_with_uri_constraints_is_refused_by_the_gateway(make_zone, echo_server, tmp_path, constrained):
    """Why meshfed's intermediates carry no constraints of their own: webpki would refuse every SVID below."""
    east, west = make_zone("east"), make_zone("west")
    trust_each_other(east, west)
    root = west.authority.signing_ca().root
    constraints = x509.NameConstraints([x509.UniformResourceIdentifier("west.mesh")], None) if constrained else None
    intermediate, intermediate_key = _intermediate(root, _root_key(west), "west.mesh", constraints)
    leaf, key = _leaf(intermediate, intermediate_key, CLIENT_ID)
    config, sni = _ingress(east, echo_server, bundle_roots_pem([s.bundle for s in east.trust.trusted_bundles()]))
    with Gateway(config) as gateway:
        assert _call(gateway, sni, east, [leaf, intermediate], key, tmp_path) is not constrained


def test_the_gateway_anchor_keeps_subject_and_key_and_drops_only_the_uri_subtrees_of_its_domain(make_zone):
    east = make_zone("east")
    root = east.authority.signing_ca().root
    anchor = gateway_anchor(east.trust_domain, root)
    assert anchor.subject == root.subject
    assert anchor.public_key() == root.public_key()
    assert _constraints(anchor) is None
    assert {type(e.value) for e in anchor.extensions} == {type(e.value) for e in root.extensions} - {
        x509.NameConstraints
    }
    # Constraints this gateway cannot stand in for stay, for webpki to apply (or fail closed on).
    assert gateway_anchor(TrustDomain("west.mesh"), root) is root
    unconstrained = x509.load_pem_x509_certificate(
        (Path(__file__).parent / "data" / "spiffe" / "x509svid" / "good-leaf-and-intermediate.pem").read_bytes()
    )
    assert gateway_anchor(TrustDomain("example.org"), unconstrained) is unconstrained


def make_legacy_root(zone: Zone) -> x509.Certificate:
    """Give ``zone`` the root an older meshfed made: no name constraints (same key and names, re-signed).

    For tests of the checks that stand behind the constraints: a peer or SPIRE root may have none.
    """
    ca = zone.directory / "ca"
    key = _root_key(zone)
    old = zone.authority.signing_ca().root
    builder = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(old.issuer)
        .public_key(old.public_key())
        .serial_number(old.serial_number)
        .not_valid_before(old.not_valid_before_utc)
        .not_valid_after(old.not_valid_after_utc)
    )
    for extension in old.extensions:
        if not isinstance(extension.value, x509.NameConstraints):
            builder = builder.add_extension(extension.value, extension.critical)
    root = builder.sign(key, hashes.SHA256())
    (ca / "root.pem").write_bytes(certificates_to_pem([root])[0])
    with StateStore(zone.directory / "state.db") as store:
        store.put_bundle(TrustBundle(zone.trust_domain, (root,)), source="self")
        (generation,) = store.ca_generations()
        store.put_ca_generation(replace(generation, root_fingerprint=fingerprint(root)))
    return root


def test_an_existing_zone_without_constraints_keeps_working_and_its_next_generation_gets_them(
    make_zone, echo_server, tmp_path
):
    east, west = make_zone("east"), make_zone("west")
    legacy = make_legacy_root(west)
    assert _constraints(legacy) is None
    trust_each_other(east, west)
    before = west.authority.issue_svid(west.trust_domain.workload("default", "client"), dt.timedelta(hours=1))
    generation = west.authority.rotate(overlap=dt.timedelta(0))
    west.authority.advance()
    trust_each_other(east, west)  # east now holds both of west's roots
    after = west.authority.issue_svid(west.trust_domain.workload("default", "client"), dt.timedelta(hours=1))
    new_root = x509.load_pem_x509_certificate((west.directory / generation.directory / "root.pem").read_bytes())
    assert permitted_uri_hosts(new_root) == ["west.mesh"]
    config, sni = _ingress(east, echo_server, bundle_roots_pem([s.bundle for s in east.trust.trusted_bundles()]))
    with Gateway(config) as gateway:
        for svid in (before, after):
            assert _call(gateway, sni, east, [svid.leaf, *svid.intermediates], svid.private_key, tmp_path)


def test_grpc_refuses_at_the_handshake_an_id_signed_under_another_domains_constrained_root(make_zone):
    """BoringSSL (the peering stream's TLS) enforces the root's URI constraints in its merged pool: a
    west.mesh ID signed by north's CA never reaches meshfed's per-domain check (see test_peering_api)."""
    import grpc

    from tests.test_peering import Harness, hello_as_west_signed_by_north

    east = Harness(make_zone("east"))
    west, north = make_zone("west"), make_zone("north")

    async def scenario() -> grpc.StatusCode:
        await east.start()
        try:
            refused = await hello_as_west_signed_by_north(east, west, north)
            assert isinstance(refused, grpc.aio.AioRpcError)
            return refused.code()
        finally:
            await east.stop()

    # The server's handshake fails (name constraints), so the client sees no RPC status from meshfed.
    assert asyncio.run(scenario()) is grpc.StatusCode.UNAVAILABLE
