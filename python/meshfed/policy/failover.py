"""``[failover]`` in zone.toml: which peers a failover group tries first, and which share its traffic.

The groups themselves are :mod:`meshfed.federation.failover`.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

_PEER_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class FailoverPolicy(BaseModel):
    """``[failover]`` in zone.toml: which peers a group tries first, and which share traffic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    order: list[str] = Field(default_factory=list)
    split: dict[str, int] = Field(default_factory=dict)

    @field_validator("order")
    @classmethod
    def _check_order(cls, value: list[str]) -> list[str]:
        for peer in value:
            _check_peer(peer, "order")
        if len(set(value)) != len(value):
            raise ValueError("failover order names a peer twice")
        return value

    @field_validator("split")
    @classmethod
    def _check_split(cls, value: dict[str, int]) -> dict[str, int]:
        for peer, weight in value.items():
            _check_peer(peer, "split")
            if not 1 <= weight <= 10_000:
                raise ValueError(f"failover split: the weight of {peer!r} must be an integer in 1-10000")
        return value


DEFAULT_POLICY = FailoverPolicy()
"""Peers by name, one tier each."""


def _check_peer(peer: str, where: str) -> None:
    if not _PEER_NAME.fullmatch(peer):
        raise ValueError(f"failover {where}: {peer!r} is not a peering name (a DNS label)")
