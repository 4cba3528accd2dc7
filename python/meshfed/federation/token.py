"""Peering tokens: how an accepting zone lets one named zone dial it, once.

A token is base64url (unpadded) JSON::

    {"peer_name": "west", "zone": "east", "trust_domain": "east.mesh",
     "addresses": ["10.0.0.5:15441"], "ca_bundle": "<SPIFFE bundle JSON>",
     "secret": "<32 random bytes, base64url>", "expires_at": "2025-01-01T00:00:00Z"}

``addresses`` are the acceptor's establishment addresses (server-only TLS);
``ca_bundle`` is its own bundle, the only roots the dialer trusts for the first
connection. The acceptor keeps only the SHA-256 of the secret, so a stolen
state database yields no usable token; the secret is 256 random bits, so an
unsalted hash is as strong as a salted one.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import secrets

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from meshfed.errors import InvalidTokenError

DEFAULT_TOKEN_TTL = dt.timedelta(minutes=15)
# The longest a token may stay valid, for the CLI and the API alike: a token is a secret in transit.
MAX_TOKEN_TTL = dt.timedelta(days=7)
_SECRET_BYTES = 32


class PeeringToken(BaseModel):
    """The decoded contents of a peering token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    peer_name: str = Field(min_length=1)
    zone: str = Field(min_length=1)
    trust_domain: str = Field(min_length=1)
    addresses: list[str] = Field(min_length=1)
    ca_bundle: str = Field(min_length=1)
    secret: str = Field(min_length=16)
    expires_at: dt.datetime

    def encode(self) -> str:
        """The token as one copy-pasteable line."""
        document = orjson.dumps(self.model_dump(mode="json"))
        return base64.urlsafe_b64encode(document).rstrip(b"=").decode()

    def expired(self, now: dt.datetime | None = None) -> bool:
        return (now or dt.datetime.now(dt.UTC)) >= self.expires_at


def decode_token(text: str) -> PeeringToken:
    """Parse a token, refusing anything that is not exactly what ``encode`` produces.

    Whitespace anywhere is dropped first: base64url has none, and a terminal or
    a mail client that wraps the long line inserts some.
    """
    text = "".join(text.split())
    if not text:
        raise InvalidTokenError("the peering token is empty; paste the whole output of 'meshfed peer token'")
    try:
        # validate=True: the lenient default silently drops characters outside the alphabet.
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise InvalidTokenError(
            "the peering token is not base64url; it was truncated or altered — copy it again from 'meshfed peer token'"
        ) from None
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidTokenError(
            "the peering token does not decode to JSON; it was truncated or altered — copy it again"
        ) from None
    try:
        token = PeeringToken.model_validate(document)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "token"
        raise InvalidTokenError(f"the peering token is malformed ({field}: {first['msg']}); copy it again") from None
    if token.expires_at.tzinfo is None:
        raise InvalidTokenError("the peering token's expires_at has no time zone; it was not made by meshfed")
    return token


def new_secret() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(_SECRET_BYTES)).rstrip(b"=").decode()


def hash_secret(secret: str) -> str:
    """What the acceptor stores and looks up: SHA-256 of the secret, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


__all__ = ["DEFAULT_TOKEN_TTL", "MAX_TOKEN_TTL", "PeeringToken", "decode_token", "hash_secret", "new_secret"]
