import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshfed.errors import InvalidSpiffeIdError
from meshfed.trust.spiffe import SpiffeId, TrustDomain


@pytest.mark.parametrize(
    ("text", "domain", "path"),
    [
        ("spiffe://east.mesh", "east.mesh", ""),
        ("spiffe://east.mesh/ns/default/sa/web", "east.mesh", "/ns/default/sa/web"),
        ("spiffe://a-b_c.1/x.y-z_W", "a-b_c.1", "/x.y-z_W"),
    ],
)
def test_valid_ids_parse(text, domain, path):
    parsed = SpiffeId.parse(text)
    assert parsed.trust_domain == TrustDomain(domain)
    assert parsed.path == path
    assert str(parsed) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("http://east.mesh/x", "must start with 'spiffe://'"),
        ("spiffe://", "trust domain is empty"),
        ("spiffe://East.mesh/x", "lowercase"),
        ("spiffe://east.mesh:443/x", "port"),
        ("spiffe://user@east.mesh/x", "user info"),
        ("spiffe://east.mesh/x?y=1", "query"),
        ("spiffe://east.mesh/x#f", "fragment"),
        ("spiffe://east.mesh/", "empty path segment"),
        ("spiffe://east.mesh//x", "empty path segment"),
        ("spiffe://east.mesh/a/../b", "'..'"),
        ("spiffe://east.mesh/a/./b", "'.'"),
        ("spiffe://east.mesh/a b", "path segments"),
        ("spiffe://east.mesh/" + "a" * 2100, "longer than"),
    ],
)
def test_invalid_ids_are_refused_with_a_reason(text, reason):
    with pytest.raises(InvalidSpiffeIdError, match=reason.replace("?", r"\?").replace(".", r"\.")):
        SpiffeId.parse(text)


_segment = st.text(alphabet="abcXYZ019.-_", min_size=1, max_size=8).filter(lambda s: s not in (".", ".."))


@given(
    domain=st.text(alphabet="abcz019.-_", min_size=1, max_size=20),
    segments=st.lists(_segment, max_size=5),
)
def test_parse_round_trips(domain, segments):
    text = "spiffe://" + domain + "".join("/" + s for s in segments)
    assert str(SpiffeId.parse(text)) == text
