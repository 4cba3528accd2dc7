"""meshfed agrees with shared test vectors: the reference SPIFFE library's bundles and SVIDs, and the SPIFFE ID
cases the gateway's parser runs too.

The go-spiffe vectors and their expected results are in ``tests/data/spiffe/README.md``; the SPIFFE ID cases are
``tests/vectors/spiffe_ids.json``, read here and by ``rust/meshfed-gateway/tests/spiffe_vectors.rs``.
"""

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import pytest

from meshfed.errors import InvalidBundleError, InvalidSpiffeIdError, InvalidSvidError, UntrustedSvidError
from meshfed.trust.bundle import TrustBundle, parse_bundle
from meshfed.trust.spiffe import SpiffeId, TrustDomain
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


SPIFFE_IDS = Path(__file__).parent / "vectors" / "spiffe_ids.json"
_CASES: list[dict[str, Any]] = json.loads(SPIFFE_IDS.read_text(encoding="ascii"))
# What each reason class in the vector file looks like in meshfed's error messages. The gateway's test maps
# the same classes to its error variants, so both parsers refuse each case for the same reason.
_REASON_TEXT = {
    "scheme": r"must start with 'spiffe://'|is a SPIFFE ID, not a trust domain name",
    "empty trust domain": r"trust domain is empty",
    "bad character": r"may contain only",
    "port": r"must not contain a port",
    "userinfo": r"must not contain user info",
    "query": r"must not contain a query",
    "fragment": r"must not contain a fragment",
    "trailing slash": r"has a trailing '/'",
    "empty path segment": r"has an empty path segment \('//'\)",
    "dot segment": r"has a '\.' or '\.\.' path segment",
    "too long": r"is longer than 2048 bytes|characters long; SPIFFE allows at most 255",
}
_FIELDS = {"input", "kind", "valid", "trust_domain", "path", "reason"}


def _case_id(case: dict[str, Any]) -> str:
    text = case["input"].encode("unicode_escape").decode()
    return f"{case['kind']}:{text[:48]}{'...' if len(text) > 48 else ''}"


def test_the_spiffe_id_vector_file_is_well_formed():
    assert len(_CASES) >= 60
    inputs = [(case["kind"], case["input"]) for case in _CASES]
    assert len(set(inputs)) == len(inputs), "a case appears twice"
    for case in _CASES:
        assert _FIELDS <= case.keys() <= _FIELDS | {"note"}, case
        assert case["kind"] in ("id", "trust_domain"), case
        if case["valid"]:
            assert case["reason"] is None, case
            assert case["trust_domain"] is not None, case
            assert (case["path"] is None) == (case["kind"] == "trust_domain"), case
        else:
            assert case["reason"] in _REASON_TEXT, case
            assert case["trust_domain"] is case["path"] is None, case
    # Every reason class is exercised, and both the 2048-byte ID cap and the 255-byte trust domain cap are
    # tested on both sides of the limit.
    assert {case["reason"] for case in _CASES if not case["valid"]} == _REASON_TEXT.keys()
    lengths = {(c["valid"], len(c["input"].encode("utf-8", "surrogatepass"))) for c in _CASES if c["kind"] == "id"}
    assert {(True, 2048), (False, 2049)} <= lengths
    td_lengths = {(c["valid"], len(c["input"])) for c in _CASES if c["kind"] == "trust_domain"}
    assert {(True, 255), (False, 256)} <= td_lengths


@pytest.mark.parametrize("case", [c for c in _CASES if c["valid"]], ids=_case_id)
def test_valid_spiffe_id_vectors_parse(case):
    if case["kind"] == "trust_domain":
        assert TrustDomain.parse(case["input"]).name == case["trust_domain"]
        return
    parsed = SpiffeId.parse(case["input"])
    assert (parsed.trust_domain.name, parsed.path) == (case["trust_domain"], case["path"])
    assert str(parsed) == case["input"]


@pytest.mark.parametrize("case", [c for c in _CASES if not c["valid"]], ids=_case_id)
def test_invalid_spiffe_id_vectors_are_refused_for_their_reason(case):
    parse = TrustDomain.parse if case["kind"] == "trust_domain" else SpiffeId.parse
    # InvalidSpiffeIdError and nothing else: a lone surrogate once escaped as UnicodeEncodeError.
    with pytest.raises(InvalidSpiffeIdError) as caught:
        parse(case["input"])
    message = str(caught.value)
    assert re.search(_REASON_TEXT[case["reason"]], message), f"{case['reason']!r} expected, got: {message}"
    # One line, and short even for a 2 KiB input: the message quotes the input cut down.
    assert "\n" not in message
    assert len(message) < 400
