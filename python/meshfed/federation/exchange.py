"""What zones tell each other about services: the payload of the peering stream.

A zone sends each peer a versioned :class:`ServiceSnapshot` of the services it
exports *to that peer*: names, ports and health summaries, never the addresses
of its workloads. Peers reach those services through the exporter's gateway,
whose addresses and trust domain ride along.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExportedService(_Model):
    """One service as a peer sees it."""

    name: str
    namespace: str
    ports: dict[str, int]
    labels: dict[str, str] = Field(default_factory=dict)
    healthy_endpoints: int = Field(ge=0)
    total_endpoints: int = Field(ge=0)
    # Label values present on endpoints, per label key: lets importers offer subsets (version=v2).
    subsets: dict[str, list[str]] = Field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name


class ServiceSnapshot(_Model):
    """Everything one zone exports to one peer, at one version. Versions only grow."""

    zone: str
    trust_domain: str
    gateway_addresses: list[str]
    version: int = Field(ge=0)
    services: list[ExportedService] = Field(default_factory=list)

    def service(self, namespace: str, name: str) -> ExportedService | None:
        return next((s for s in self.services if s.key == (namespace, name)), None)
