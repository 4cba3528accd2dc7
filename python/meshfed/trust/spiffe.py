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
_TRUST_DOMAIN_CHARS = re.compile(r"[a-z0-9._-]+")
_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9._-]+")


MAX_TRUST_DOMAIN_LENGTH = 255


@dataclass(frozen=True, order=True, slots=True)
class TrustDomain:
    """A SPIFFE trust domain name such as ``east.mesh``."""

    name: str

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Parse a bare trust domain name; a ``spiffe://`` prefix is accepted."""
        name = text.removeprefix(_SCHEME)
        if not name:
            raise InvalidSpiffeIdError("trust domain is empty")
        if len(name) > MAX_TRUST_DOMAIN_LENGTH:
            # The SPIFFE limit, which the Rust gateway enforces too: a longer one accepted here would
            # make every gateway config holding it invalid.
            raise InvalidSpiffeIdError(
                f"trust domain {name[:64]!r}... is {len(name)} characters long; SPIFFE allows at most "
                f"{MAX_TRUST_DOMAIN_LENGTH}"
            )
        if not _TRUST_DOMAIN_CHARS.fullmatch(name):
            raise InvalidSpiffeIdError(
                f"trust domain {text!r} may contain only lowercase letters, digits, '.', '-' and '_'"
            )
        return cls(name)

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
        """Parse ``spiffe://<trust-domain>[/<segment>...]`` per the SPIFFE-ID spec."""
        if len(text.encode()) > _MAX_ID_BYTES:
            raise InvalidSpiffeIdError(f"SPIFFE ID is longer than {_MAX_ID_BYTES} bytes")
        if not text.startswith(_SCHEME):
            raise InvalidSpiffeIdError(f"SPIFFE ID {text!r} must start with 'spiffe://'")
        rest = text[len(_SCHEME) :]
        for forbidden, what in (("?", "a query"), ("#", "a fragment"), ("@", "user info"), (":", "a port")):
            if forbidden in rest:
                raise InvalidSpiffeIdError(f"SPIFFE ID {text!r} must not contain {what}")
        domain, slash, path = rest.partition("/")
        try:
            trust_domain = TrustDomain.parse(domain)
        except InvalidSpiffeIdError as err:
            raise InvalidSpiffeIdError(f"SPIFFE ID {text!r}: {err}") from None
        if not slash:
            return cls(trust_domain, "")
        for segment in path.split("/"):
            if not segment:
                raise InvalidSpiffeIdError(f"SPIFFE ID {text!r} has an empty path segment or trailing '/'")
            if segment in (".", ".."):
                raise InvalidSpiffeIdError(f"SPIFFE ID {text!r} has a '.' or '..' path segment")
            if not _SEGMENT_CHARS.fullmatch(segment):
                raise InvalidSpiffeIdError(
                    f"SPIFFE ID {text!r}: path segments may contain only letters, digits, '.', '-' and '_'"
                )
        return cls(trust_domain, "/" + path)

    def __str__(self) -> str:
        return f"{_SCHEME}{self.trust_domain.name}{self.path}"
