"""What a zone's controller is tuned by, in one object handed to it whole.

:class:`~meshfed.controller.Controller` takes a :class:`ControllerSettings`;
``meshfed up`` builds one from its flags and :class:`meshfed.runtime.ZoneSettings`
carries it. Defaults come from :mod:`meshfed.defaults`, or from the constant of
the module that enforces them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from meshfed import defaults
from meshfed.catalog.publisher import DEFAULT_RESYNC
from meshfed.gateway import HealthCheck
from meshfed.policy.egress import WorkloadTls

from .failing_peers import FailingPeerPolicy


def health_check_every(interval: dt.timedelta) -> HealthCheck | None:
    """Local endpoint checks every ``interval`` (none for 0): two failures mark an endpoint down, two passes up."""
    if interval <= dt.timedelta(0):
        return None
    ms = max(int(interval.total_seconds() * 1000), 1)
    return HealthCheck(interval_ms=ms, timeout_ms=min(ms, 1_000), healthy_threshold=2, unhealthy_threshold=2)


_DEFAULT_HEALTH_CHECK = health_check_every(defaults.HEALTH_CHECK_INTERVAL)  # what `--health-check-interval` says


@dataclass(frozen=True, kw_only=True)
class ControllerSettings:
    """Where the zone's gateway listens and is reached, and how it treats failing peers and its catalog."""

    # host:port of the gateway ingress; default: gateway_address in zone.toml.
    gateway_address: str | None = None
    # Where peers reach this zone's ingress (host:port each); default: its bound address.
    gateway_advertise: tuple[str, ...] = ()
    egress_host: str = defaults.EGRESS_HOST  # where the egress listeners of imports bind
    # Where imports are published to the catalog, and local clients reach them; default: egress_host. So a
    # gateway bound to 0.0.0.0 in a pod can be published at the pod's IP.
    egress_advertise_host: str | None = None
    # 0 gives each import an ephemeral port; otherwise ports are kept from this base. No default here:
    # a zone's is meshfed.defaults.EGRESS_PORT_BASE (set by ZoneSettings), and tests choose 0 on purpose.
    egress_port_base: int
    # host:port of one HTTP CONNECT listener for every import (`CONNECT <service>.<namespace>.<peer>:<port>`,
    # or `<service>.<namespace>:<port>` for a failover group); None: none. One socket however many imports.
    egress_connect_address: str | None = None
    # One listening socket per import port and failover group (egress_host, from egress_port_base). Off, an
    # importer of thousands of services binds only the CONNECT listener (imports published to the catalog and
    # mirrors then point at it only once those learn to; see the README).
    per_import_listeners: bool = True
    # A peer that stays FAILING past the grace keeps its imports served under the ``open`` policy (callers'
    # connects fail over or fail fast) and loses them under ``closed`` until it is back.
    failing_peer_grace: dt.timedelta = defaults.FAILING_PEER_GRACE
    failing_peer_policy: FailingPeerPolicy = defaults.FAILING_PEER_POLICY
    # Active TCP checks of local endpoints from the gateway: an endpoint that fails them counts as unhealthy
    # in what peers are told, so their failover groups move on. None leaves health to the catalog alone.
    health_check: HealthCheck | None = _DEFAULT_HEALTH_CHECK
    # Catalog continuity: a zone that starts with an empty catalog although it exported services before (a
    # deleted catalog.db, a Consul or Kubernetes pointed at the wrong place) keeps telling its peers what they
    # last heard, until the catalog has services again or an operator confirms (Controller.confirm_empty_catalog,
    # or this): withdrawing every export would make every peer delete every import.
    allow_empty_catalog: bool = False
    # Overrides [egress] workload_tls of zone.toml (per-import overrides still apply): whether local workloads
    # must present SVIDs to the egress listeners. None: zone.toml's.
    egress_workload_tls: WorkloadTls | None = None
    gateway_svid_ttl: dt.timedelta = dt.timedelta(hours=24)  # the lifetime of each SVID the gateway is issued
    # Imports are published into the catalog (Consul registrations, Kubernetes mirrors) by an ImportPublisher
    # of their own, again every this often: a refusal there never blocks applying config.
    publication_resync: dt.timedelta = DEFAULT_RESYNC


__all__ = ["ControllerSettings", "health_check_every"]
