"""What zones tell each other about services: the payload of the peering stream.

A zone sends each peer a versioned :class:`ServiceSnapshot` of the services it
exports *to that peer*: names, ports and health summaries, never the addresses
of its workloads. Peers reach those services through the exporter's gateway,
whose addresses and trust domain ride along.

These models are the edge where a peer's data becomes typed values: a peer is
another organisation's cluster, so every field is bounded and checked here
(DNS-label names, ports 1-65535, ``host:port`` gateway addresses, versions that
fit SQLite's INTEGER, bounded counts). A message that breaks a rule is refused
whole before anything of it is stored or served; the error names the field.
The bounds are generous for honest zones: a sender trims what it cannot send
(see :func:`meshfed.federation.exports.exported_snapshot`) rather than fail.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator
from pydantic.dataclasses import dataclass

from meshfed.addresses import parse_host_port
from meshfed.catalog.model import DnsLabel

# SQLite stores versions as signed 64-bit integers.
MAX_VERSION = 2**63 - 1
# Hard bounds of one snapshot, whatever the peer; operators cap imports per peer lower (PeerLimits).
MAX_SERVICES = 100_000
MAX_GATEWAY_ADDRESSES = 16
MAX_PORTS = 64
MAX_LABELS = 64
MAX_LABEL_KEY = 317  # a Kubernetes label key: a 253-character prefix, '/', a 63-character name
MAX_LABEL_VALUE = 1024
MAX_SUBSET_KEYS = 64
MAX_SUBSET_VALUES = 1024
MAX_COUNT = 2**32 - 1  # endpoint counts travel as uint32


def _gateway_address(text: str) -> str:
    # ip:port or a resolvable host:port (an honest peer may advertise a DNS name); port 1-65535.
    return str(parse_host_port(text, what="gateway address", allow_zero=False))


GatewayAddress = Annotated[str, StringConstraints(max_length=512), AfterValidator(_gateway_address)]
LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_LABEL_KEY)]
LabelValue = Annotated[str, StringConstraints(max_length=MAX_LABEL_VALUE)]
Port = Annotated[int, Field(ge=1, le=65535)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# An importer holds one of these per imported service (10,000 from one busy peer): a validated,
# slotted, frozen dataclass takes a fraction of a model's memory (no per-instance __dict__ or
# fields-set). Change one with dataclasses.replace.
@dataclass(frozen=True, slots=True, kw_only=True, config=ConfigDict(extra="forbid"))
class ExportedService:
    """One service as a peer sees it."""

    name: DnsLabel
    namespace: DnsLabel
    ports: Annotated[dict[DnsLabel, Port], Field(max_length=MAX_PORTS)]
    labels: Annotated[dict[LabelKey, LabelValue], Field(max_length=MAX_LABELS)] = Field(default_factory=dict)
    healthy_endpoints: Count
    total_endpoints: Count
    # Label values present on endpoints, per label key: lets importers offer subsets (version=v2).
    subsets: Annotated[
        dict[LabelKey, Annotated[list[LabelValue], Field(max_length=MAX_SUBSET_VALUES)]],
        Field(max_length=MAX_SUBSET_KEYS),
    ] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _healthy_within_total(self) -> ExportedService:
        if self.healthy_endpoints > self.total_endpoints:
            raise ValueError(
                f"healthy_endpoints {self.healthy_endpoints} exceeds total_endpoints {self.total_endpoints}"
            )
        return self

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name


class ServiceSnapshot(_Model):
    """Everything one zone exports to one peer, at one version. Versions only grow within an epoch."""

    zone: str
    trust_domain: str
    gateway_addresses: Annotated[list[GatewayAddress], Field(max_length=MAX_GATEWAY_ADDRESSES)]
    version: Annotated[int, Field(ge=0, le=MAX_VERSION)]
    services: Annotated[list[ExportedService], Field(max_length=MAX_SERVICES)] = Field(default_factory=list)
    # The sender's export epoch (empty: before epochs existed); see the Snapshot message.
    epoch: Annotated[str, StringConstraints(max_length=64)] = ""

    @field_validator("services")
    @classmethod
    def _unique_services(cls, services: list[ExportedService]) -> list[ExportedService]:
        # A field validator, so the refusal names the field (snapshot.services: ...).
        seen: set[tuple[str, str]] = set()
        for service in services:
            if service.key in seen:
                raise ValueError(f"service {service.namespace}/{service.name} appears twice")
            seen.add(service.key)
        return services

    def service(self, namespace: str, name: str) -> ExportedService | None:
        return next((s for s in self.services if s.key == (namespace, name)), None)

    @property
    def listener_count(self) -> int:
        """Egress listeners the importer binds for this snapshot: one per service port."""
        return sum(len(service.ports) for service in self.services)
