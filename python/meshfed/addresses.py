"""``host:port`` and host names, parsed once at the edge.

Every address meshfed binds or hands to others passes through here: the CLI's
flags, and (in the federation layer) the addresses a peer advertises. The
parser is strict because the layers below are not: grpc takes the port modulo
65536 (``:70000`` binds 4464), and a name that is neither an IP literal nor a
DNS name only fails much later, far from where it was typed.

The rules:

* ``host:port``, with an IPv6 literal in brackets (``[::1]:15440``);
* the port is 1-65535 in ASCII digits, or 0 where ``allow_zero`` (an ephemeral
  port for an address to bind; never for one that others dial);
* the host is an IP literal (IPv4 in dotted quads, IPv6 without a scope) or a
  DNS name of RFC 1123 labels, at most 253 characters, whose last label is not
  all digits (``127.0.0.256`` is a bad IP address, not a name).

Hosts are normalized: IP literals to their canonical text, names to lower
case, so two spellings of one address compare equal.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from meshfed.errors import InvalidAddressError

__all__ = ["MAX_HOST_LENGTH", "HostPort", "is_ip_address", "parse_host", "parse_host_port", "parse_port"]

MAX_HOST_LENGTH = 253  # RFC 1035: a name's text form without the root dot
# The longest valid text: a 253-character name (or a bracketed IPv6 literal, shorter) and ":65535".
_MAX_TEXT = MAX_HOST_LENGTH + len(":65535")
_SHOWN = 80  # how much of a refused value an error echoes: it may come from a peer and be megabytes long
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")
_NOT_ASCII = "only ASCII is allowed (IP addresses, or DNS names in their ASCII form)"
_EXAMPLE = "e.g. 127.0.0.1:15440, [::1]:15440 or gateway.example.com:15443"


@dataclass(frozen=True)
class HostPort:
    """A parsed address: ``host`` is an IP literal (no brackets) or a lower-case DNS name."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(text: str, *, what: str, allow_zero: bool) -> HostPort:
    """Parse ``host:port`` (IPv6 in brackets); ``what`` names the value in the error (e.g. ``--api-address``).

    ``allow_zero`` admits port 0 (ephemeral), for addresses to bind. Raises
    :class:`~meshfed.errors.InvalidAddressError` (also a ``ValueError``, so a
    pydantic validator reports it as a validation error) with a one-line message.
    """
    if len(text) > _MAX_TEXT:
        raise _invalid(what, text, f"longer than {_MAX_TEXT} characters")
    if not text.isascii():
        # Before lower(): some non-ASCII letters fold to ASCII ones (the Kelvin sign to 'k').
        raise _invalid(what, text, _NOT_ASCII)
    if text.startswith("["):
        inside, bracket, port_text = text[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise _invalid(what, text, f"write an IPv6 address as [address]:port; {_EXAMPLE}")
        host = _ipv6_literal(what, text, inside)
        port_text = port_text[1:]
    else:
        host_text, colon, port_text = text.rpartition(":")
        if not colon:
            raise _invalid(what, text, f"no port; {_EXAMPLE}")
        if ":" in host_text:
            raise _invalid(what, text, "put an IPv6 address in brackets, e.g. [::1]:15440")
        if not host_text:
            raise _invalid(what, text, "no host; use 0.0.0.0 or [::] for every interface")
        host = _host(what, text, host_text)
    return HostPort(host, _port(what, text, port_text, allow_zero=allow_zero))


def parse_host(text: str, *, what: str) -> str:
    """Parse a host alone (an IP literal, IPv6 with or without brackets, or a DNS name) to its normal form."""
    if len(text) > _MAX_TEXT:
        raise _invalid(what, text, f"longer than {_MAX_TEXT} characters", kind="a host")
    if not text.isascii():
        raise _invalid(
            what, text, "only ASCII is allowed (IP addresses, or DNS names in their ASCII form)", kind="a host"
        )
    if text.startswith("[") and text.endswith("]"):
        return _ipv6_literal(what, text, text[1:-1], kind="a host")
    if ":" in text:
        return _ipv6_literal(what, text, text, kind="a host")
    return _host(what, text, text, kind="a host")


def parse_port(port: int, *, what: str, allow_zero: bool) -> int:
    """Check a port given as a number (a ``--...-port`` flag) against the same rules as in ``host:port``."""
    return _port(what, str(port), str(port), allow_zero=allow_zero, kind="a port")


def is_ip_address(host: str) -> bool:
    """Whether a parsed host is an IP literal (rather than a DNS name)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _host(what: str, text: str, host: str, *, kind: str = "host:port") -> str:
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    name = host.lower()
    if len(name) > MAX_HOST_LENGTH:
        raise _invalid(what, text, f"the host name is longer than {MAX_HOST_LENGTH} characters", kind=kind)
    labels = name.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise _invalid(
            what,
            text,
            "the host is neither an IP address nor a DNS name (labels of letters, digits and '-', at most 63 each)",
            kind=kind,
        )
    if labels[-1].isdigit():
        raise _invalid(what, text, "the host looks like an IPv4 address but is not one", kind=kind)
    return name


def _ipv6_literal(what: str, text: str, inside: str, *, kind: str = "host:port") -> str:
    try:
        address = ipaddress.IPv6Address(inside)
    except ValueError:
        raise _invalid(what, text, f"{inside[:_SHOWN]!r} is not an IPv6 address", kind=kind) from None
    if address.scope_id is not None:
        # Neither grpc nor the gateway's socket addresses take a scope; a zone binds an interface by address.
        raise _invalid(
            what, text, "IPv6 scopes (%interface) are not supported; give the interface's address", kind=kind
        )
    return str(address)


def _port(what: str, text: str, port_text: str, *, allow_zero: bool, kind: str = "host:port") -> int:
    lowest = 0 if allow_zero else 1
    if not _PORT.fullmatch(port_text):
        raise _invalid(what, text, f"the port must be a number in {lowest}-65535", kind=kind)
    port = int(port_text)
    if port > 65535:
        raise _invalid(what, text, f"port {port} is out of range ({lowest}-65535)", kind=kind)
    if port < lowest:
        raise _invalid(what, text, "port 0 is only for binding; give the port others connect to (1-65535)", kind=kind)
    return port


def _invalid(what: str, text: str, reason: str, *, kind: str = "host:port") -> InvalidAddressError:
    shown = text if len(text) <= _SHOWN else f"{text[:_SHOWN]}..."
    return InvalidAddressError(f"{what} {shown!r} is not {kind}: {reason}")
