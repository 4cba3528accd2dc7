"""meshfed's bundle parser agrees with the reference SPIFFE library's test vectors.

The vectors and their expected results are in ``tests/data/spiffe/README.md``.
"""

import datetime as dt
import re
from pathlib import Path

import pytest

from meshfed.errors import InvalidBundleError, InvalidSvidError, UntrustedSvidError
from meshfed.trust.bundle import TrustBundle, parse_bundle
from meshfed.trust.spiffe import TrustDomain
from meshfed.trust.svid import load_x509_svid, parse_certificates, verify_x509_svid

BUNDLES = Path(__file__).parent / "data" / "spiffe" / "bundle"
# go-spiffe loads these for domain1.test, but their roots carry the URI SAN spiffe://local: meshfed refuses a
# root that names another trust domain than the one it is taken in for, so they are parsed for the one they name.
DOMAIN = TrustDomain("local")


@pytest.mark.parametrize(
    ("name", "x509_authorities", "jwt_authorities", "refresh_hint", "sequence"),
    [
        ("spiffebundle_valid_1.json", 1, 1, None, None),
        ("spiffebundle_valid_2.json", 1, 6, 60, 1),
        ("spiffebundle_valid_with_wit.json", 1, 2, 60, 1),
    ],
)
def test_valid_reference_bundles_parse(name, x509_authorities, jwt_authorities, refresh_hint, sequence):
    bundle = parse_bundle(DOMAIN, (BUNDLES / name).read_bytes())
    assert len(bundle.roots) == x509_authorities
    assert len(bundle.jwt_authorities) == jwt_authorities
    if refresh_hint is not None:
        assert bundle.refresh_hint_seconds == refresh_hint
        assert bundle.sequence == sequence
    reparsed = parse_bundle(DOMAIN, bundle.to_spiffe_json())
    assert reparsed.fingerprints() == bundle.fingerprints()
    assert reparsed.jwt_authorities == bundle.jwt_authorities


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("spiffebundle_missing_kid.json", "has no 'kid'"),
        ("spiffebundle_no_keys.json", "holds no authorities"),
        ("spiffebundle_multiple_x509.json", "exactly one certificate"),
    ],
)
def test_invalid_reference_bundles_are_refused_with_the_reason(name, reason):
    with pytest.raises(InvalidBundleError, match=reason):
        parse_bundle(DOMAIN, (BUNDLES / name).read_bytes())


SVIDS = Path(__file__).parent / "data" / "spiffe" / "x509svid"
EXAMPLE = "spiffe://example.org/workload-1"


@pytest.mark.parametrize(
    ("certificates", "key", "chain_length"),
    [
        ("good-leaf-only.pem", "key-pkcs8-rsa.pem", 1),
        ("good-leaf-and-intermediate.pem", "key-pkcs8-ecdsa.pem", 2),
        ("good-key-and-cert.pem", "good-key-and-cert.pem", 1),
        ("good-cert-and-key.pem", "good-cert-and-key.pem", 1),
    ],
)
def test_valid_reference_svids_load(certificates, key, chain_length):
    svid = load_x509_svid(SVIDS / certificates, SVIDS / key)
    assert str(svid.spiffe_id) == EXAMPLE
    assert len(svid.chain) == chain_length
    assert "PRIVATE" not in repr(svid)


@pytest.mark.parametrize(
    ("certificates", "key", "reason"),
    [
        ("key-pkcs8-rsa.pem", "key-pkcs8-rsa.pem", "no certificates found"),
        ("good-leaf-only.pem", "good-leaf-only.pem", "no PKCS#8 private key"),
        ("good-leaf-only.pem", "not-pem", "key file is not PEM"),
        ("not-pem", "key-pkcs8-rsa.pem", "certificate file is not PEM"),
        ("good-leaf-only.pem", "corrupt-key.pem", "private key is corrupt"),
        ("corrupt-cert.pem", "key-pkcs8-rsa.pem", "certificate 1 is corrupt"),
        ("good-leaf-and-intermediate.pem", "key-pkcs8-rsa.pem", "does not match the leaf"),
        ("wrong-leaf-empty-id.pem", "key-pkcs8-rsa.pem", "leaf has no URI SAN"),
        ("wrong-leaf-ca-true.pem", "key-pkcs8-rsa.pem", "leaf certificate must not be a CA"),
        ("wrong-leaf-no-digital-signature.pem", "key-pkcs8-rsa.pem", "must have the digitalSignature"),
        ("wrong-leaf-cert-sign.pem", "key-pkcs8-rsa.pem", "must not have the keyCertSign"),
        ("wrong-leaf-crl-sign.pem", "key-pkcs8-rsa.pem", "must not have the cRLSign"),
        ("wrong-intermediate-no-ca.pem", "key-pkcs8-rsa.pem", "signing certificate 1 must be a CA"),
        ("wrong-intermediate-no-key-cert-sign.pem", "key-pkcs8-rsa.pem", "signing certificate 1 must have the keyCert"),
    ],
)
def test_invalid_reference_svids_are_refused_with_the_rule(certificates, key, reason):
    with pytest.raises(InvalidSvidError, match=reason) as caught:
        load_x509_svid(SVIDS / certificates, SVIDS / key)
    assert "\n" not in str(caught.value)


def test_every_reference_vector_row_is_covered():
    # The README is the contract: a new row there without a test here fails this test.
    readme = (SVIDS.parent / "README.md").read_text()
    rows = re.findall(r"^\| (\S+\.pem|not-pem) \| (\S+|\(same file\)) \|", readme, re.M)
    tested = {(c, k) for c, k, _ in _VALID} | {(c, k) for c, k, _ in _INVALID}
    assert {(c, c if k == "(same file)" else k) for c, k in rows} == tested


_VALID = test_valid_reference_svids_load.pytestmark[0].args[1]
_INVALID = test_invalid_reference_svids_are_refused_with_the_rule.pytestmark[0].args[1]


def test_reference_chain_verifies_against_its_own_root_only_inside_its_validity():
    # good-leaf-and-intermediate.pem ends in the self-signed CA that issued the leaf:
    # publish that CA as example.org's bundle and verify the leaf alone against it.
    svid = load_x509_svid(SVIDS / "good-leaf-and-intermediate.pem", SVIDS / "key-pkcs8-ecdsa.pem")
    domain = TrustDomain("example.org")
    bundles = {domain: TrustBundle(domain, (svid.chain[1],))}
    inside = dt.datetime(2020, 3, 24, 14, 30, tzinfo=dt.UTC)
    assert str(verify_x509_svid(svid.chain[:1], bundles, inside)) == EXAMPLE
    with pytest.raises(UntrustedSvidError, match="not valid before"):
        verify_x509_svid(svid.chain[:1], bundles, dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
    with pytest.raises(UntrustedSvidError, match="expired"):
        verify_x509_svid(svid.chain[:1], bundles, dt.datetime(2021, 1, 1, tzinfo=dt.UTC))
    other = TrustDomain("other.org")
    with pytest.raises(UntrustedSvidError, match=r"trusts no X\.509 roots of example\.org"):
        verify_x509_svid(svid.chain[:1], {other: TrustBundle(other, (svid.chain[1],))}, inside)


@pytest.mark.parametrize("name", ["wrong-leaf-ca-true.pem", "wrong-intermediate-no-ca.pem"])
def test_rule_breaking_vectors_are_refused_before_any_chain_walk(name):
    chain = parse_certificates((SVIDS / name).read_bytes())
    with pytest.raises(InvalidSvidError):
        verify_x509_svid(chain, lambda domain: None, dt.datetime(2020, 6, 1, tzinfo=dt.UTC))
