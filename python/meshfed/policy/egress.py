"""How local workloads reach imported services: the egress listeners' workload TLS.

``plain`` (the default) accepts plain TCP from anything that reaches the
listener, and the peer sees the call as coming from this zone's gateway.
``strict`` makes each egress listener a TLS server that requires an X.509-SVID
of this zone's own trust domain (``meshfed trust issue``, or a SPIRE agent of
the same trust domain), and tells the peer gateway exactly which workload
calls, so the exporting zone authorizes the workload, not the whole zone.
``permissive`` accepts both, for a migration: TLS clients as their SVID, plain
ones as the gateway.

The zone-wide mode comes from ``[egress] workload_tls`` in ``zone.toml`` (or
``meshfed up --egress-workload-tls``); ``[[egress.import]]`` tables override it
per imported service, optionally for one peer only.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from meshfed.catalog.model import DnsLabel

WorkloadTls = Literal["plain", "permissive", "strict"]
DEFAULT_WORKLOAD_TLS: WorkloadTls = "plain"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImportOverride(_Model):
    """``[[egress.import]]``: the workload TLS of one imported service (of one peer, or of all)."""

    service: DnsLabel
    namespace: DnsLabel = "default"
    peer: DnsLabel | None = None
    workload_tls: WorkloadTls


class EgressPolicy(_Model):
    """``[egress]`` in ``zone.toml``."""

    workload_tls: WorkloadTls = DEFAULT_WORKLOAD_TLS
    import_: list[ImportOverride] = Field(default_factory=list, alias="import")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def mode(self, service: str, namespace: str, peer: str | None) -> WorkloadTls:
        """The mode of the egress for ``service.namespace`` from ``peer`` (``None``: a failover group).

        An override naming the peer wins over one for every peer; a failover group, which
        mixes sources, takes only overrides for every peer.
        """
        general: WorkloadTls | None = None
        for override in self.import_:
            if override.service != service or override.namespace != namespace:
                continue
            if override.peer is None:
                general = general or override.workload_tls
            elif peer is not None and override.peer == peer:
                return override.workload_tls
        return general or self.workload_tls
