"""meshfed's bundle parser agrees with the reference SPIFFE library's test vectors.

The vectors and their expected results are in ``tests/data/spiffe/README.md``.
"""

from pathlib import Path

import pytest

from meshfed.errors import InvalidBundleError
from meshfed.trust.bundle import parse_bundle
from meshfed.trust.spiffe import TrustDomain

BUNDLES = Path(__file__).parent / "data" / "spiffe" / "bundle"
DOMAIN = TrustDomain("domain1.test")


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
