"""Laws of bundles, checked by Hypothesis: wire round trips, unknown keys ignored, set logic, sequence choice."""

from __future__ import annotations

import datetime as dt
from functools import cache

import orjson
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from meshfed.trust.bundle import TrustBundle, fingerprint, newest, parse_bundle
from meshfed.trust.ca import create_authority
from meshfed.trust.spiffe import TrustDomain

DOMAIN = TrustDomain("prop.mesh")


@cache
def _roots() -> tuple[x509.Certificate, ...]:
    # Key generation is the slow part: make a small pool once and let Hypothesis combine it.
    return tuple(create_authority(DOMAIN, generation).authority.root for generation in range(6))


root_sets = st.lists(st.integers(0, 5), min_size=1, max_size=6, unique=True).map(
    lambda indexes: tuple(_roots()[i] for i in indexes)
)
jwt_keys = st.lists(
    st.fixed_dictionaries(
        {
            "use": st.just("jwt-svid"),
            "kty": st.just("EC"),
            "kid": st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=32),
            "crv": st.just("P-256"),
            "x": st.text("ABCDEFabcdef0123456789-_", min_size=1, max_size=43),
            "y": st.text("ABCDEFabcdef0123456789-_", min_size=1, max_size=43),
        }
    ),
    max_size=3,
)
bundles = st.builds(
    TrustBundle,
    trust_domain=st.just(DOMAIN),
    roots=root_sets,
    sequence=st.integers(0, 2**63 - 1),
    refresh_hint_seconds=st.integers(0, 10**9),
    jwt_authorities=jwt_keys.map(tuple),
)
unknown_keys = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {"use": st.text(max_size=10).filter(lambda u: u not in ("x509-svid", "jwt-svid")), "kty": st.just("EC")}
        ),
        st.fixed_dictionaries(
            {
                "use": st.sampled_from(["x509-svid", "jwt-svid"]),
                "kty": st.text(max_size=6).filter(lambda k: k not in ("EC", "RSA", "oct", "OKP")),
            }
        ),
        st.fixed_dictionaries({"use": st.sampled_from(["x509-svid", "jwt-svid"])}),  # no kty at all
    ),
    max_size=4,
)


@settings(max_examples=60, deadline=None)
@given(bundles)
def test_serialize_then_parse_is_the_identity(bundle):
    parsed = parse_bundle(DOMAIN, bundle.to_spiffe_json())
    assert parsed == bundle
    assert parsed.to_spiffe_json() == bundle.to_spiffe_json()


@settings(max_examples=60, deadline=None)
@given(bundles, unknown_keys, st.randoms())
def test_keys_of_unknown_type_or_use_are_ignored_wherever_they_appear(bundle, extra, random):
    document = orjson.loads(bundle.to_spiffe_json())
    keys = document["keys"] + extra
    random.shuffle(keys)
    document["keys"] = keys
    parsed = parse_bundle(DOMAIN, orjson.dumps(document))
    assert sorted(parsed.fingerprints()) == sorted(bundle.fingerprints())
    assert sorted(map(orjson.dumps, parsed.jwt_authorities)) == sorted(map(orjson.dumps, bundle.jwt_authorities))


@settings(max_examples=80, deadline=None)
@given(bundles, root_sets)
def test_adding_roots_is_a_set_union_and_moves_the_sequence_only_on_change(bundle, added):
    grown = bundle.with_roots(added)
    assert set(grown.fingerprints()) == set(bundle.fingerprints()) | {fingerprint(r) for r in added}
    assert len(grown.fingerprints()) == len(set(grown.fingerprints()))  # no duplicates
    assert grown.fingerprints()[: len(bundle.roots)] == bundle.fingerprints()  # existing order kept
    changed = set(grown.fingerprints()) != set(bundle.fingerprints())
    assert grown.sequence == bundle.sequence + (1 if changed else 0)
    assert grown.with_roots(added) == grown  # idempotent


@settings(max_examples=80, deadline=None)
@given(bundles, root_sets)
def test_removing_what_was_added_restores_the_roots(bundle, added):
    new = [r for r in added if fingerprint(r) not in bundle.fingerprints()]
    if not new:
        return
    round_trip = bundle.with_roots(new).without_roots(fingerprint(r) for r in new)
    assert round_trip.fingerprints() == bundle.fingerprints()
    assert round_trip.sequence == bundle.sequence + 2  # each published change is a new revision


@settings(max_examples=100, deadline=None)
@given(bundles, bundles)
def test_newest_keeps_the_highest_sequence_whatever_the_arrival_order(a, b):
    if a.sequence == b.sequence:
        return
    high, low = (a, b) if a.sequence > b.sequence else (b, a)
    assert newest(low, high) is high
    assert newest(high, low) is high
    assert newest(None, low) is low
    assert newest(high, high) is high  # re-fetching the same revision changes nothing


def test_expired_roots_are_kept_and_reported():
    root = _roots()[0]
    bundle = TrustBundle(DOMAIN, (root,))
    later = root.not_valid_after_utc + dt.timedelta(seconds=1)
    assert bundle.expired_roots(later) == [root]
    assert bundle.expired_roots(root.not_valid_before_utc) == []
    assert parse_bundle(DOMAIN, bundle.to_spiffe_json()).roots == (root,)
