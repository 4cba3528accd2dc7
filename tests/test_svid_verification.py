"""verify_x509_svid refuses what RFC 5280 path validation refuses (path length, validity of every certificate,
foreign roots) and what the X.509-SVID profile refuses (a leaf EKU for another purpose), and accepts meshfed's
own SVIDs, those of a rotated CA, and SPIRE-shaped ones.

Certificates are built here with ``cryptography`` so each test breaks exactly one rule.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from meshfed.errors import UntrustedSvidError
from meshfed.trust.bundle import TrustBundle
from meshfed.trust.ca import create_authority, create_intermediate
from meshfed.trust.spiffe import SpiffeId, TrustDomain
from meshfed.trust.svid import verify_x509_svid
from tests.conftest import key_usage

EAST = TrustDomain("east.mesh")
WEST = TrustDomain("west.mesh")
WEB = SpiffeId.parse("spiffe://east.mesh/ns/default/sa/web")
# The hand-built certificates are valid around NOW; those a meshfed CA issues (create_authority) from the moment
# they are made, which in a long run comes well after this module loaded: they are checked at the time of the test.
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _ca(
    name: str,
    issuer: Issued | None = None,
    *,
    path_length: int | None = None,
    not_before: dt.datetime = NOW - DAY,
    not_after: dt.datetime = NOW + 30 * DAY,
    domain: TrustDomain = EAST,
) -> Issued:
    return _issue(
        name,
        issuer,
        not_before,
        not_after,
        x509.BasicConstraints(ca=True, path_length=path_length),
        key_usage(ca=True),
        str(domain.id),
    )


def _leaf(
    issuer: Issued,
    spiffe_id: SpiffeId = WEB,
    *,
    eku: list[ObjectIdentifier] | None = None,
    not_after: dt.datetime = NOW + HOUR,
) -> Issued:
    return _issue(
        "workload",
        issuer,
        NOW - HOUR,
        not_after,
        x509.BasicConstraints(ca=False, path_length=None),
        key_usage(ca=False),
        str(spiffe_id),
        eku=eku,
    )


def _issue(
    name: str,
    issuer: Issued | None,
    not_before: dt.datetime,
    not_after: dt.datetime,
    constraints: x509.BasicConstraints,
    usage: x509.KeyUsage,
    uri: str,
    *,
    eku: list[ObjectIdentifier] | None = None,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test"), x509.NameAttribute(NameOID.COMMON_NAME, name)]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(constraints, critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return Issued(builder.sign(issuer.key if issuer else key, hashes.SHA256()), key)


def _bundles(*roots: x509.Certificate, domain: TrustDomain = EAST) -> dict[TrustDomain, TrustBundle]:
    return {domain: TrustBundle(domain, roots)}


def _refusal(chain: list[x509.Certificate], bundles: dict[TrustDomain, TrustBundle], at: dt.datetime = NOW) -> str:
    with pytest.raises(UntrustedSvidError) as caught:
        verify_x509_svid(chain, bundles, at)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{WEB} does not verify against the bundle of east.mesh: ")
    return message


def _intermediate(root: Issued, name: str, extension: tuple[x509.ExtensionType, bool]) -> Issued:
    """A CA below ``root`` named CN=``name``, with one extension (and its criticality) beyond a CA's own."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(ca=True), critical=True)
        .add_extension(extension[0], critical=extension[1])
        .sign(root.key, hashes.SHA256())
    )
    return Issued(cert, key)


def test_a_meshfed_svid_and_a_controller_svid_verify_with_or_without_the_root_in_the_chain():
    authority = create_authority(EAST).authority
    bundles = _bundles(authority.root)
    web = authority.issue(WEB)
    controller = authority.issue(EAST.workload("meshfed-system", "controller"), dns_names=["federation.east.mesh"])
    assert verify_x509_svid([web.leaf, *web.intermediates], bundles, _now()) == WEB
    # The peer may send the root too, in any order: the path is built from what is there.
    assert verify_x509_svid([controller.leaf, authority.root, *controller.intermediates], bundles, _now()) == (
        controller.spiffe_id
    )


def test_svids_of_both_generations_verify_while_a_rotation_overlaps_and_the_old_ones_stop_after():
    old = create_authority(EAST).authority
    new = create_authority(EAST, generation=1).authority
    old_svid, new_svid = old.issue(WEB), new.issue(WEB)
    overlapping = _bundles(old.root, new.root)
    assert verify_x509_svid([old_svid.leaf, *old_svid.intermediates], overlapping, _now()) == WEB
    assert verify_x509_svid([new_svid.leaf, *new_svid.intermediates], overlapping, _now()) == WEB
    # A new intermediate under the same root (an intermediate-only rotation) verifies against the same bundle.
    root_key = create_authority(EAST)
    reissued = create_intermediate(EAST, root_key.authority.root, root_key.root_key, generation=1).issue(WEB)
    assert verify_x509_svid([reissued.leaf, *reissued.intermediates], _bundles(root_key.authority.root), _now()) == WEB
    assert "no path from the leaf" in _refusal([old_svid.leaf, *old_svid.intermediates], _bundles(new.root), _now())


def test_an_intermediate_with_path_length_0_cannot_have_a_ca_below_it():
    root = _ca("root")
    capped = _ca("capped", root, path_length=0)
    below = _ca("below", capped)
    leaf = _leaf(below)
    chain = [leaf.cert, below.cert, capped.cert]
    assert "more CAs below it than its basicConstraints path length allows" in _refusal(chain, _bundles(root.cert))
    # The same shape verifies when the middle CA allows one more below it: only the path length was wrong.
    allowing = _ca("allowing", root, path_length=1)
    below_allowing = _ca("below", allowing)
    fine = _leaf(below_allowing)
    assert verify_x509_svid([fine.cert, below_allowing.cert, allowing.cert], _bundles(root.cert), NOW) == WEB


@pytest.mark.parametrize(
    "eku",
    [
        None,
        [ExtendedKeyUsageOID.SERVER_AUTH],
        [ExtendedKeyUsageOID.CLIENT_AUTH],
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        [ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.SERVER_AUTH],
    ],
)
def test_a_leaf_may_have_no_eku_or_one_naming_tls_server_or_client_auth(eku):
    root = _ca("root")
    leaf = _leaf(root, eku=eku)
    assert verify_x509_svid([leaf.cert], _bundles(root.cert), NOW) == WEB


@pytest.mark.parametrize(
    ("eku", "named"),
    [
        ([ExtendedKeyUsageOID.CODE_SIGNING], "CODE_SIGNING"),
        ([ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.TIME_STAMPING], "EMAIL_PROTECTION, TIME_STAMPING"),
        # The spec has a leaf's EKU name serverAuth and clientAuth; "any purpose" is not that.
        ([ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE], "ANY_EXTENDED_KEY_USAGE"),
        ([ObjectIdentifier("1.3.6.1.4.1.99999.1")], "1.3.6.1.4.1.99999.1"),
    ],
)
def test_a_leaf_whose_eku_names_only_another_purpose_is_refused(eku, named):
    root = _ca("root")
    leaf = _leaf(root, eku=eku)
    message = _refusal([leaf.cert], _bundles(root.cert))
    assert message.endswith(f"the leaf's extended key usage ({named}) has neither serverAuth nor clientAuth")


def test_a_ca_whose_eku_allows_no_tls_purpose_cannot_sign_svids():
    root = _ca("root")
    issued = _intermediate(root, "code signing CA", (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False))
    signing_only = issued.cert
    leaf = _leaf(issued)
    assert "CA 'CN=code signing CA' has extended key usage (CODE_SIGNING)" in _refusal(
        [leaf.cert, signing_only], _bundles(root.cert)
    )


def test_an_expired_intermediate_is_refused_though_the_leaf_is_current():
    root = _ca("root")
    expired = _ca("lapsed", root, not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    leaf = _leaf(expired)
    message = _refusal([leaf.cert, expired.cert], _bundles(root.cert))
    assert "signing certificate 'CN=lapsed,O=test' expired at" in message


def test_an_expired_root_is_refused():
    root = _ca("old root", not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    leaf = _leaf(root)
    assert "root 'CN=old root,O=test' of east.mesh expired at" in _refusal([leaf.cert], _bundles(root.cert))


def test_a_leaf_not_yet_valid_is_refused_with_a_hint_about_clocks():
    root = _ca("root")
    leaf = _leaf(root)
    assert "the leaf is not valid before" in _refusal([leaf.cert], _bundles(root.cert), NOW - 2 * HOUR)


def test_an_east_id_signed_under_the_west_root_is_refused_though_west_is_trusted():
    east, west = create_authority(EAST).authority, create_authority(WEST).authority
    intermediate = Issued(west.intermediate, west.intermediate_key)
    forged = _leaf(intermediate)
    bundles = {EAST: TrustBundle(EAST, (east.root,)), WEST: TrustBundle(WEST, (west.root,))}
    # Checked now: west's CA was made just above, after this module's NOW.
    at = _now()
    assert "no path from the leaf" in _refusal([forged.cert, west.intermediate], bundles, at)
    # Even a bundle of east.mesh wrongly holding west's root does not let it vouch for east.mesh IDs: its name
    # constraints permit west.mesh URIs only, and the verifier fails closed on them.
    wrong = {EAST: TrustBundle(EAST, (east.root, west.root))}
    assert "URI name constraints" in _refusal([forged.cert, west.intermediate], wrong, at)


def test_an_intermediate_with_uri_name_constraints_is_refused_as_the_gateway_refuses_it():
    root = _ca("root")
    issued = _intermediate(
        root, "constrained", (x509.NameConstraints([x509.UniformResourceIdentifier("east.mesh")], None), True)
    )
    constrained = issued.cert
    leaf = _leaf(issued)
    assert "URI name constraints" in _refusal([leaf.cert, constrained], _bundles(root.cert))


def test_a_spire_shaped_chain_verifies():
    # SPIRE's self-signed CA: subject C, O, serialNumber; digitalSignature|keyCertSign|cRLSign; no path length.
    # Its SVIDs: O=SPIRE with an x500UniqueIdentifier, keyEncipherment|keyAgreement beside digitalSignature,
    # serverAuth and clientAuth. Built here because no spire-server binary is needed to know their shape.
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, "123456789"),
        ]
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(EAST.id))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE"),
                    x509.NameAttribute(NameOID.X500_UNIQUE_IDENTIFIER, "8a4e9f1d"),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - HOUR)
        .not_valid_after(NOW + HOUR)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, True, False, True, False, False, False, False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(WEB))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    assert verify_x509_svid([leaf], _bundles(ca), NOW) == WEB
