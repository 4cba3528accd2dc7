"""Authorization rules as written: ``[[authz]]`` in zone.toml, the Helm value ``authz`` and the API.

A rule is an ``allow`` or ``deny`` over a SPIFFE ID pattern: ``*``, an exact
ID, or ``<id>/*`` for everything strictly below it. Storing and ordering them
is :mod:`meshfed.federation.authz`; the gateway enforces them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from meshfed.catalog.model import DnsLabel
from meshfed.errors import FederationError, InvalidSpiffeIdError
from meshfed.trust.spiffe import SpiffeId

ANY_ID = "*"

Action = Literal["allow", "deny"]


def check_pattern(text: str) -> str:
    """``*``, a SPIFFE ID, or a SPIFFE ID followed by ``/*`` (everything strictly below it); else an error."""
    if text == ANY_ID:
        return text
    try:
        SpiffeId.parse(text.removesuffix("/*"))
    except InvalidSpiffeIdError as err:
        raise FederationError(
            f"{text[:80]!r} is not a SPIFFE ID pattern ({err}); use '*', spiffe://<td>/<path> or <id>/*"
        ) from None
    return text


def pattern_matches(pattern: str, spiffe_id: str) -> bool:
    """Whether ``pattern`` covers ``spiffe_id`` (the gateway's matching, for ``explain`` and tests)."""
    if pattern == ANY_ID:
        return True
    prefix = pattern.removesuffix("/*")
    if prefix == pattern:
        return spiffe_id == pattern
    return spiffe_id.startswith(prefix + "/")


class RuleSpec(BaseModel):
    """One rule as ``zone.toml``, the Helm chart and the API write it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    service: DnsLabel
    namespace: DnsLabel = "default"
    port: int | None = Field(default=None, ge=1, le=65535, description="Only this service port; all when absent.")
    action: Action
    id: str = Field(max_length=2050, description="SPIFFE ID pattern: '*', an ID, or '<id>/*'.")

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        try:
            return check_pattern(value)
        except FederationError as err:
            raise ValueError(str(err)) from None
