"""The zone's state kept in its platform, so that the zone survives the loss of any pod and any volume.

SQLite in the zone directory stays the working copy — every component reads
and writes it as before — and a *replica* in the platform is the durable one:
Kubernetes Secrets (``meshfed up --state-secret NAMESPACE/NAME``) or keys of
Consul's KV store (``--state-kv PREFIX``). The leader publishes what changed
every couple of seconds (:data:`meshfed.defaults.STATE_REPLICA_INTERVAL`);
a process that starts with an empty volume, or that takes over from another
leader, restores the replica before the zone opens, so it keeps the zone's CA,
tokens, peerings, exports and imports, and its peers see the same zone
resume. Embedded zones without either flag keep their state in the directory
alone, as before.

The package, by role: :mod:`~meshfed.replica.manifest` (what a replica holds,
parsed as hostile input), :mod:`~meshfed.replica.files` (the directory's
side), :mod:`~meshfed.replica.stores` (Secrets, Consul KV, both
compare-and-swap), :mod:`~meshfed.replica.replicator` (restore, publish,
fence), :mod:`~meshfed.replica.gateway_feed` (the gateway config the leader
publishes beside the replica, for gateway replicas: ``meshfed up
--gateway-feed`` and ``meshfed gateway``).

A publication is asynchronous: a zone that loses its pod *and* its volume
within :data:`~meshfed.defaults.STATE_REPLICA_INTERVAL` of a change loses that
change: imports come back, as the exporting peers send them again when their
streams resume; a peering established, an export added or a rotation begun in
that window does not.
"""

from __future__ import annotations

from dataclasses import dataclass

# Only the settings here: the CLI parses its flags into them before anything heavy loads.


@dataclass(frozen=True)
class SecretReplica:
    """``--state-secret``: the replica in Secrets ``NAME`` and ``NAME-<digest>`` of ``namespace``."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"Secret {self.namespace}/{self.name}"


@dataclass(frozen=True)
class KvReplica:
    """``--state-kv``: the replica under ``prefix`` in Consul's KV store."""

    prefix: str

    def __str__(self) -> str:
        return f"Consul KV {self.prefix}/"


__all__ = ["KvReplica", "SecretReplica"]
