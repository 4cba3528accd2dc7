"""SPIFFE trust domains and IDs, parsed once (SPIFFE-ID spec §2).

Parse, don't validate: code that holds a :class:`SpiffeId` knows it is well
formed, so nothing downstream re-checks strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshfed.errors import InvalidSpiffeIdError

_SCHEME = "spiffe://"
SYSTEM_NAMESPACE = "meshfed-system"
_MAX_ID_BYTES = 2048
# ASCII classes written out: str.isalnum() or \w would let non-ASCII letters and digits through.
_TRUST_DOMAIN_CHARS = re.compile(r"[a-z0-9._-]+")
_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9._-]+")
# Error messages quote what they refuse, cut to this many characters (a refused ID may be 2 KiB long).
_SHOWN = 96


MAX_TRUST_DOMAIN_LENGTH = 255


@dataclass(frozen=True, order=True, slots=True)
class TrustDomain:
    """A SPIFFE trust domain name such as ``east.mesh``."""

    name: str

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Parse a bare trust domain name such as ``east.mesh``.

        ``spiffe://east.mesh`` is refused: it is a SPIFFE ID, not a trust domain
        name (SPIFFE-ID §2.1), and the gateway refuses it too; accepting it here
        would give one domain two spellings. The cases, shared with the gateway's
        parser, are in ``tests/vectors/spiffe_ids.json``.
        """
        if not text:
            raise InvalidSpiffeIdError("trust domain is empty")
        if text.startswith(_SCHEME):
            raise InvalidSpiffeIdError(
                f"{_shown(text)} is a SPIFFE ID, not a trust domain name; give the name alone "
                f"(such as {_shown(text.removeprefix(_SCHEME).partition('/')[0])}), without 'spiffe://'"
            )
        if len(text) > MAX_TRUST_DOMAIN_LENGTH:
            # The SPIFFE limit, which the Rust gateway enforces too: a longer one accepted here would
            # make every gateway config holding it invalid.
            raise InvalidSpiffeIdError(
                f"trust domain {_shown(text)} is {len(text)} characters long; SPIFFE allows at most "
                f"{MAX_TRUST_DOMAIN_LENGTH}"
            )
        if "@" in text:
            raise InvalidSpiffeIdError(f"trust domain {_shown(text)} must not contain user info ('@')")
        _, colon, port = text.rpartition(":")
        if colon and port.isascii() and (not port or port.isdigit()):
            raise InvalidSpiffeIdError(f"trust domain {_shown(text)} must not contain a port (':{port}')")
        if not _TRUST_DOMAIN_CHARS.fullmatch(text):
            raise InvalidSpiffeIdError(
                f"trust domain {_shown(text)} may contain only lowercase letters, digits, '.', '-' and '_'"
            )
        return cls(text)

    @property
    def id(self) -> SpiffeId:
        """The SPIFFE ID of the trust domain itself (``spiffe://<td>``)."""
        return SpiffeId(self, "")

    def workload(self, namespace: str, service_account: str) -> SpiffeId:
        """The ID of a workload: ``spiffe://<td>/ns/<namespace>/sa/<service-account>``."""
        return SpiffeId.parse(f"{_SCHEME}{self.name}/ns/{namespace}/sa/{service_account}")

    @property
    def gateway_id(self) -> SpiffeId:
        """The ID of this trust domain's east-west gateway."""
        return self.workload(SYSTEM_NAMESPACE, "gateway")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, order=True, slots=True)
class SpiffeId:
    """A SPIFFE ID: a trust domain and a path (empty for the trust domain's own ID)."""

    trust_domain: TrustDomain
    path: str

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse ``spiffe://<trust-domain>[/<segment>...]`` per the SPIFFE-ID spec.

        The gateway's parser takes the same inputs and refuses the same ones for
        the same reasons: ``tests/vectors/spiffe_ids.json`` holds the cases both run.
        """
        # Bytes, as the URI cap is counted; "surrogatepass" so that a lone surrogate (which a JSON
        # or Python string may hold) is measured and then refused as a character, not an encode crash.
        if len(text.encode("utf-8", "surrogatepass")) > _MAX_ID_BYTES:
            raise InvalidSpiffeIdError(f"SPIFFE ID {_shown(text)} is longer than {_MAX_ID_BYTES} bytes")
        if not text.startswith(_SCHEME):
            raise InvalidSpiffeIdError(f"SPIFFE ID {_shown(text)} must start with 'spiffe://'")
        rest = text[len(_SCHEME) :]
        # Anywhere after the scheme, '?' opens a query and '#' a fragment (RFC 3986 §3).
        for forbidden, what in (("?", "a query"), ("#", "a fragment")):
            if forbidden in rest:
                raise InvalidSpiffeIdError(f"SPIFFE ID {_shown(text)} must not contain {what}")
        domain, slash, path = rest.partition("/")
        if not domain:
            raise InvalidSpiffeIdError(f"SPIFFE ID {_shown(text)}: trust domain is empty")
        try:
            trust_domain = TrustDomain.parse(domain)
        except InvalidSpiffeIdError as err:
            raise InvalidSpiffeIdError(f"SPIFFE ID {_shown(text)}: {err}") from None
        if not slash:
            return cls(trust_domain, "")
        segments = path.split("/")
        for position, segment in enumerate(segments, start=1):
            if not segment:
                if position == len(segments):
                    raise InvalidSpiffeIdError(f"SPIFFE ID {_shown(text)} has a trailing '/' (an empty path segment)")
                raise InvalidSpiffeIdError(f"SPIFFE ID {_shown(text)} has an empty path segment ('//')")
            if segment in (".", ".."):
                raise InvalidSpiffeIdError(f"SPIFFE ID {_shown(text)} has a '.' or '..' path segment")
            # ':' and '@' here are only characters outside the segment alphabet: a port or user info
            # exists only in the trust domain part. Percent-encoding is refused the same way.
            if not _SEGMENT_CHARS.fullmatch(segment):
                raise InvalidSpiffeIdError(
                    f"SPIFFE ID {_shown(text)}: path segments may contain only letters, digits, '.', '-' and '_'"
                )
        return cls(trust_domain, "/" + path)

    def __str__(self) -> str:
        return f"{_SCHEME}{self.trust_domain.name}{self.path}"


def _shown(text: str) -> str:
    """``text`` quoted for an error message: repr (so control characters and lone surrogates print), cut short."""
    if len(text) <= _SHOWN:
        return repr(text)
    return f"{text[:_SHOWN]!r}... ({len(text)} characters)"
