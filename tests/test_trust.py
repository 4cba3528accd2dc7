import base64
import datetime as dt
import json
import subprocess

import pytest
from cryptography import x509

from meshfed.errors import InvalidBundleError, TrustError
from meshfed.trust.bundle import TrustBundle, parse_bundle
from meshfed.trust.ca import certificates_to_pem, spiffe_id_of
from meshfed.trust.spiffe import SpiffeId, TrustDomain

WEB = "spiffe://east.mesh/ns/default/sa/web"


def test_issued_svid_verifies_with_openssl_against_the_exported_roots(make_zone, tmp_path):
    east = make_zone("east")
    svid = east.authority.issue_svid(SpiffeId.parse(WEB), dt.timedelta(hours=1))
    (tmp_path / "roots.pem").write_bytes(east.trust.own_bundle().to_pem())
    (tmp_path / "leaf.pem").write_bytes(certificates_to_pem([svid.leaf])[0])
    (tmp_path / "chain.pem").write_bytes(svid.cert_chain_pem())
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            tmp_path / "roots.pem",
            "-untrusted",
            tmp_path / "chain.pem",
            "-purpose",
            "sslclient",
            tmp_path / "leaf.pem",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")


def test_openssl_refuses_the_svid_against_another_zones_roots(make_zone, tmp_path):
    east, west = make_zone("east"), make_zone("west")
    svid = east.authority.issue_svid(SpiffeId.parse(WEB), dt.timedelta(hours=1))
    (tmp_path / "roots.pem").write_bytes(west.trust.own_bundle().to_pem())
    (tmp_path / "chain.pem").write_bytes(svid.cert_chain_pem())
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            tmp_path / "roots.pem",
            "-untrusted",
            tmp_path / "chain.pem",
            tmp_path / "chain.pem",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0


def test_svid_follows_the_x509_svid_rules(make_zone):
    east = make_zone("east")
    svid = east.authority.issue_svid(SpiffeId.parse(WEB), dt.timedelta(minutes=30))
    leaf = svid.leaf
    assert str(spiffe_id_of(leaf)) == WEB
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [WEB]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert not usage.key_cert_sign
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert dt.timedelta(minutes=30) <= lifetime <= dt.timedelta(minutes=32)
    assert svid.intermediates[0].subject == leaf.issuer


@pytest.mark.parametrize(
    ("spiffe_id", "error"),
    [
        ("spiffe://west.mesh/ns/default/sa/web", "outside this zone's trust domain east.mesh"),
        ("spiffe://east.mesh", "needs a path"),
    ],
)
def test_issue_refuses_ids_it_must_not_sign(make_zone, spiffe_id, error):
    with pytest.raises(TrustError, match=error):
        make_zone("east").authority.issue_svid(SpiffeId.parse(spiffe_id), dt.timedelta(hours=1))


def test_bundle_round_trips_through_spiffe_json_and_pem(make_zone):
    east = make_zone("east")
    bundle = east.trust.own_bundle()
    document = json.loads(bundle.to_spiffe_json())
    (key,) = document["keys"]
    assert key["use"] == "x509-svid"
    assert key["kty"] == "EC"
    assert key["crv"] == "P-256"
    assert len(key["x5c"]) == 1
    assert document["spiffe_sequence"] == 1
    assert isinstance(document["spiffe_refresh_hint"], int)
    for wire in (bundle.to_spiffe_json(), bundle.to_pem()):
        parsed = parse_bundle(bundle.trust_domain, wire)
        assert parsed.fingerprints() == bundle.fingerprints()


def test_bundle_parser_skips_keys_of_other_uses(make_zone):
    bundle = make_zone("east").trust.own_bundle()
    document = json.loads(bundle.to_spiffe_json())
    document["keys"].append({"use": "jwt-svid", "kty": "EC", "kid": "k1", "crv": "P-256", "x": "AA", "y": "AA"})
    document["keys"].append({"use": "something-new", "kty": "OKP"})
    parsed = parse_bundle(bundle.trust_domain, json.dumps(document).encode())
    assert parsed.fingerprints() == bundle.fingerprints()


def test_import_then_trust_both_domains_separately(make_zone):
    east, west = make_zone("east"), make_zone("west")
    west.trust.import_bundle(parse_bundle(east.trust_domain, east.trust.own_bundle().to_spiffe_json()))
    trusted = {stored.bundle.trust_domain.name: stored for stored in west.trust.trusted_bundles()}
    assert sorted(trusted) == ["east.mesh", "west.mesh"]
    assert trusted["east.mesh"].source == "import"
    assert trusted["east.mesh"].bundle.fingerprints() == east.trust.own_bundle().fingerprints()
    assert trusted["west.mesh"].bundle.fingerprints() == west.trust.own_bundle().fingerprints()


def _bad_bundles(good: bytes, leaf_pem: bytes) -> list[tuple[bytes, str]]:
    document = json.loads(good)
    wrong_count = json.loads(good)
    wrong_count["keys"][0]["x5c"] = wrong_count["keys"][0]["x5c"] * 2
    garbage_cert = json.loads(good)
    garbage_cert["keys"][0]["x5c"] = [base64.b64encode(b"not a certificate").decode()]
    negative_sequence = dict(document, spiffe_sequence=-1)
    return [
        (b"", "neither PEM nor JSON"),
        (b"{not json", "neither PEM nor JSON"),
        (b"[]", "expected a JSON object"),
        (json.dumps({"keys": []}).encode(), "holds no authorities"),
        (json.dumps(wrong_count).encode(), "exactly one certificate"),
        (json.dumps(garbage_cert).encode(), "is not a certificate"),
        (json.dumps(negative_sequence).encode(), "spiffe_sequence"),
        (good[: len(good) // 2], "neither PEM nor JSON"),
        (leaf_pem, "is not a CA certificate"),
    ]


def test_bad_bundles_are_refused_and_existing_trust_is_unchanged(make_zone):
    east, west = make_zone("east"), make_zone("west")
    west.trust.import_bundle(parse_bundle(east.trust_domain, east.trust.own_bundle().to_spiffe_json()))
    before = [(s.bundle.trust_domain, s.bundle.fingerprints()) for s in west.trust.trusted_bundles()]
    leaf_pem = east.authority.issue_svid(SpiffeId.parse(WEB), dt.timedelta(hours=1)).cert_chain_pem()
    for data, message in _bad_bundles(east.trust.own_bundle().to_spiffe_json(), leaf_pem):
        with pytest.raises(InvalidBundleError, match=message):
            west.trust.import_bundle(parse_bundle(TrustDomain("east.mesh"), data))
    assert [(s.bundle.trust_domain, s.bundle.fingerprints()) for s in west.trust.trusted_bundles()] == before


def test_a_zone_refuses_to_import_its_own_trust_domain(make_zone):
    east, impostor = make_zone("east"), make_zone("impostor")
    with pytest.raises(InvalidBundleError, match="own trust domain"):
        east.trust.import_bundle(TrustBundle(east.trust_domain, impostor.trust.own_bundle().roots))
    assert east.trust.own_bundle().fingerprints() != impostor.trust.own_bundle().fingerprints()
    assert len(east.trust.trusted_bundles()) == 1
