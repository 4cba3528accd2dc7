"""Subset splits: a zone divides its peers' traffic to one exported service among subsets.

The service's owner decides, as with a canary: ``[[split]]`` in zone.toml names
the service, the endpoint label that names its subsets, and a weight per label
value. The zone's ingress then routes the service's SNI over one cluster per
subset by weight; a subset with no healthy endpoint drops out, and a split with
nothing left falls back to the whole service.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class SubsetSplit(BaseModel):
    """One ``[[split]]`` entry: ``weights`` maps values of endpoint label ``label`` to shares."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    service: str
    namespace: str = "default"
    label: str
    weights: dict[str, int]

    @field_validator("service", "namespace")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _DNS_LABEL.fullmatch(value):
            raise ValueError(f"split: {value!r} is not a DNS label")
        return value

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, value: dict[str, int]) -> dict[str, int]:
        for subset, weight in value.items():
            if not 0 <= weight <= 10_000:
                raise ValueError(f"split: the weight of subset {subset!r} must be an integer in 0-10000")
        if not any(value.values()):
            raise ValueError("split: give at least one subset a weight above 0")
        return value

    @model_validator(mode="after")
    def _check_label(self) -> SubsetSplit:
        if not self.label:
            raise ValueError('split: name the endpoint label that tells subsets apart (label = "version")')
        return self

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.service
