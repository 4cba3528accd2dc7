"""``host:port`` and hosts parsed strictly: what the CLI takes and what a peer may advertise."""

from __future__ import annotations

import ipaddress
from typing import Annotated

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import AfterValidator, BaseModel, ValidationError

from meshfed.addresses import HostPort, is_ip_address, parse_host, parse_host_port, parse_port
from meshfed.errors import InvalidAddressError, MeshfedError


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:15440", "127.0.0.1", 15440),
        ("0.0.0.0:0", "0.0.0.0", 0),
        ("[::1]:8470", "::1", 8470),
        ("[::]:0", "::", 0),
        ("[2001:DB8:0:0::1]:443", "2001:db8::1", 443),  # IPv6 in its canonical form
        ("Gateway.Example.COM:15443", "gateway.example.com", 15443),  # names compare case-insensitively
        ("localhost:65535", "localhost", 65535),
        ("a-b.c1:1", "a-b.c1", 1),
        (f"{'a' * 63}.example:1", f"{'a' * 63}.example", 1),
    ],
)
def test_valid_addresses_parse_to_their_normal_form(text, host, port):
    parsed = parse_host_port(text, what="--x", allow_zero=True)
    assert parsed == HostPort(host, port)
    assert parse_host_port(str(parsed), what="--x", allow_zero=True) == parsed


def test_str_brackets_ipv6_only():
    assert str(HostPort("::1", 80)) == "[::1]:80"
    assert str(HostPort("10.0.0.1", 80)) == "10.0.0.1:80"
    assert str(HostPort("east.example", 80)) == "east.example:80"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("127.0.0.1:70000", "port 70000 is out of range (0-65535)"),  # grpc would bind 4464 (70000 mod 65536)
        ("127.0.0.1:65536", "port 65536 is out of range"),
        ("127.0.0.1:-1", "the port must be a number"),
        ("127.0.0.1:+80", "the port must be a number"),
        ("127.0.0.1:\uff18\uff10", "only ASCII"),  # fullwidth digits: int() would take them
        ("127.0.0.1: 80", "the port must be a number"),
        ("127.0.0.1:", "the port must be a number"),
        ("127.0.0.1", "no port"),
        (":15440", "no host; use 0.0.0.0"),
        ("::1:80", "put an IPv6 address in brackets"),
        ("[::1]", "write an IPv6 address as [address]:port"),
        ("[::1]80", "write an IPv6 address as [address]:port"),
        ("[127.0.0.1]:80", "is not an IPv6 address"),
        ("[fe80::1%eth0]:80", "IPv6 scopes"),
        ("127.0.0.256:80", "looks like an IPv4 address"),
        ("1.2.3:80", "looks like an IPv4 address"),
        ("010.0.0.1:80", "looks like an IPv4 address"),
        ("a..b:80", "neither an IP address nor a DNS name"),
        ("-a.b:80", "neither an IP address nor a DNS name"),
        ("a_b:80", "neither an IP address nor a DNS name"),
        ("host name:80", "neither an IP address nor a DNS name"),
        (f"{'a' * 64}.example:80", "neither an IP address nor a DNS name"),
        (".".join(["a" * 63] * 4) + ":80", "longer than 253"),  # 255 characters
        ("\u212a.example:80", "only ASCII"),  # the Kelvin sign lower-cases to 'k'
        ("x" * 10_000 + ":80", "longer than"),
    ],
)
def test_invalid_addresses_are_one_line_naming_what(text, reason):
    with pytest.raises(InvalidAddressError) as caught:
        parse_host_port(text, what="--peering-address", allow_zero=True)
    message = str(caught.value)
    assert message.startswith("--peering-address ")
    assert reason in message
    assert "\n" not in message
    assert len(message) < 400, "the refused value is echoed cut short"


def test_port_zero_only_where_binding():
    assert parse_host_port("10.0.0.1:0", what="--api-address", allow_zero=True).port == 0
    with pytest.raises(InvalidAddressError, match="port 0 is only for binding"):
        parse_host_port("10.0.0.1:0", what="--gateway-advertise", allow_zero=False)
    with pytest.raises(InvalidAddressError, match=r"out of range \(1-65535\)"):
        parse_host_port("10.0.0.1:99999", what="--gateway-advertise", allow_zero=False)


def test_hosts_alone():
    assert parse_host("[::1]", what="--egress-host") == "::1"
    assert parse_host("::1", what="--egress-host") == "::1"
    assert parse_host("10.1.2.3", what="--egress-host") == "10.1.2.3"
    assert parse_host("Pod.Local", what="--advertise-host") == "pod.local"
    for bad in ("10.1.2.3:80", "", "a..b", "[::1", "999.1.1.1"):
        with pytest.raises(InvalidAddressError, match=r"^--advertise-host .* is not a host"):
            parse_host(bad, what="--advertise-host")
    assert is_ip_address("::1")
    assert is_ip_address("10.0.0.1")
    assert not is_ip_address("localhost")


def test_ports_alone():
    assert parse_port(0, what="--bundle-endpoint-port", allow_zero=True) == 0
    assert parse_port(65535, what="--bundle-endpoint-port", allow_zero=True) == 65535
    for bad in (-1, 65536, 70000):
        with pytest.raises(InvalidAddressError, match=r"^--bundle-endpoint-port .* is not a port"):
            parse_port(bad, what="--bundle-endpoint-port", allow_zero=True)


def test_the_error_is_a_meshfed_error_and_a_value_error_for_pydantic():
    """The federation layer parses peers' addresses in pydantic validators: they must see a validation error."""

    class Advertised(BaseModel):
        address: Annotated[
            str, AfterValidator(lambda text: str(parse_host_port(text, what="address", allow_zero=False)))
        ]

    assert Advertised(address="[::1]:15443").address == "[::1]:15443"
    with pytest.raises(ValidationError, match="port 70000 is out of range"):
        Advertised(address="10.0.0.1:70000")
    assert issubclass(InvalidAddressError, MeshfedError)
    assert issubclass(InvalidAddressError, ValueError)


_labels = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?\Z")
_names = st.lists(_labels, min_size=1, max_size=4).map(".".join).filter(lambda name: not name.split(".")[-1].isdigit())
_hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    _names,
)


@given(host=_hosts, port=st.integers(min_value=0, max_value=65535))
def test_every_valid_address_round_trips(host, port):
    parsed = parse_host_port(str(HostPort(host, port)), what="--x", allow_zero=True)
    assert parsed == HostPort(host, port)
    if is_ip_address(host):
        assert ipaddress.ip_address(parsed.host) == ipaddress.ip_address(host)


@given(text=st.text(max_size=300))
def test_any_text_parses_or_is_refused_with_one_line(text):
    try:
        parsed = parse_host_port(text, what="--x", allow_zero=True)
    except InvalidAddressError as err:
        message = str(err)
    else:
        assert 0 <= parsed.port <= 65535
        assert parse_host_port(str(parsed), what="--x", allow_zero=True) == parsed
        return
    assert "\n" not in message
