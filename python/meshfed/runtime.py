"""One zone, assembled: the controller with its peering, trust and bundle-endpoint services.

``meshfed up``, the demo and the end-to-end tests all build a running zone
here, so they run the same wiring: exports flow from the controller into the
peering stream, imports and peer bundles flow back into the gateway.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import resource
from dataclasses import dataclass, field

from fastapi import FastAPI

from meshfed import defaults
from meshfed.api import create_app
from meshfed.controller import DEFAULT_HEALTH_CHECK, Controller, FailingPeerPolicy
from meshfed.errors import MeshfedError, PeeringError
from meshfed.federation.link import PEER_HEARTBEAT_BOUNDS, PeerLimits
from meshfed.federation.peer_status import PeerStatus
from meshfed.federation.peering_state import PeerState
from meshfed.federation.service import PeeringService
from meshfed.gateway import HealthCheck
from meshfed.policy.egress import WorkloadTls
from meshfed.trust.ca import Svid
from meshfed.trust.endpoint import BundleEndpointServer, WebCertificate, endpoint_spiffe_id
from meshfed.trust.spiffe import TrustDomain
from meshfed.zone import Zone
from meshfed.zone.bundle_poller import BundlePoller
from meshfed.zone.rotation import RotationService

_ENDPOINT_SVID_TTL = dt.timedelta(hours=24)


@dataclass(frozen=True)
class ZoneSettings:
    """Where a zone listens and how it treats failing peers. Defaults suit one zone per host."""

    gateway_address: str | None = None  # default: zone.toml
    gateway_advertise: tuple[str, ...] = ()  # default: the bound ingress address
    egress_host: str = defaults.EGRESS_HOST  # where egress listeners bind
    egress_advertise_host: str | None = None  # where local clients reach them; default: egress_host
    egress_port_base: int = defaults.EGRESS_PORT_BASE  # 0: ephemeral egress ports
    peering_address: str = defaults.PEERING_ADDRESS
    establish_address: str = defaults.ESTABLISH_ADDRESS
    advertise_host: str | None = None  # host peers dial for peering; default: the listen host
    bundle_endpoint_port: int | None = None  # serve the SPIFFE bundle endpoint on this port (None: not at all)
    bundle_endpoint_host: str = defaults.BUNDLE_ENDPOINT_HOST  # where it binds: consumers in other zones reach it
    # The https_web certificate and key of the bundle endpoint; None: https_spiffe (the controller's SVID).
    bundle_endpoint_web: WebCertificate | None = None
    bundle_refresh_hint: dt.timedelta | None = None  # default: bundle_refresh_hint in zone.toml, else 5 minutes
    heartbeat_interval: float = defaults.HEARTBEAT_INTERVAL.total_seconds()
    failing_peer_grace: dt.timedelta = defaults.FAILING_PEER_GRACE
    failing_peer_policy: FailingPeerPolicy = defaults.FAILING_PEER_POLICY
    health_check: HealthCheck | None = DEFAULT_HEALTH_CHECK  # active checks of local endpoints; None: catalog only
    peer_limits: PeerLimits = field(default_factory=PeerLimits)  # what one peer may make this zone hold
    # A peer's announced heartbeat interval is held within these (seconds): its failure deadline.
    peer_heartbeat_bounds: tuple[float, float] = PEER_HEARTBEAT_BOUNDS
    allow_empty_catalog: bool = False  # an empty catalog at start withdraws earlier exports (else they are held)
    egress_workload_tls: WorkloadTls | None = None  # default: [egress] workload_tls in zone.toml


def check_settings(zone: Zone, settings: ZoneSettings) -> None:
    """Refuse settings that cannot work with this zone's catalog, before anything binds."""
    if zone.config.catalog != "kubernetes":
        return
    published = settings.egress_advertise_host or settings.egress_host
    try:
        address = ipaddress.ip_address(published)
    except ValueError:
        raise MeshfedError(
            f"zone {zone.name} mirrors imports as EndpointSlices, which need an IP address; "
            f"--egress-advertise-host {published!r} is not one (give the pod IP)"
        ) from None
    if address.is_loopback or address.is_unspecified:
        raise MeshfedError(
            f"zone {zone.name} mirrors imports as EndpointSlices at {published}, and the Kubernetes API server "
            "refuses loopback and unspecified addresses there: set --egress-advertise-host to an address pods "
            "reach (the pod IP; the Helm chart sets it)"
        )


def raise_open_file_limit() -> int:
    """Raise this process's open-file limit to its hard limit; returns the new soft limit.

    Every imported service port is an egress listener, one file descriptor each;
    the usual soft limit of 1024 would cap a zone at about a thousand imports.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass(frozen=True)
class ZoneRuntime:
    """A zone ready to start: ``async with runtime.controller`` runs everything."""

    zone: Zone
    controller: Controller
    peering: PeeringService
    bundle_endpoint: BundleEndpointServer | None
    bundle_poller: BundlePoller | None = None

    def app(self) -> FastAPI:
        """The zone's API; its lifespan starts and stops the controller and services."""
        app = create_app(self.controller, peering=self.peering)
        app.state.bundle_poller = self.bundle_poller  # POST /v1/trust/federations polls the new endpoint at once
        app.state.bundle_endpoint = self.bundle_endpoint  # POST /v1/trust/rotate {"finish"} renews its SVID at once
        return app


def assemble_zone(zone: Zone, settings: ZoneSettings = ZoneSettings()) -> ZoneRuntime:
    """Wire a controller and its services for ``zone``; nothing starts yet."""
    peering: PeeringService | None = None

    def peer_trust_domains() -> dict[str, TrustDomain]:
        assert peering is not None
        try:
            statuses = peering.peers()
        except PeeringError:
            return {}  # not started yet: the controller reconfigures once its services run
        return {
            status.name: TrustDomain.parse(status.peer_trust_domain)
            for status in statuses
            if status.peer_trust_domain and status.state != "TERMINATED"
        }

    controller = Controller(
        zone,
        gateway_address=settings.gateway_address,
        gateway_advertise=settings.gateway_advertise,
        egress_host=settings.egress_host,
        egress_advertise_host=settings.egress_advertise_host,
        egress_port_base=settings.egress_port_base,
        peer_trust_domains=peer_trust_domains,
        failing_peer_grace=settings.failing_peer_grace,
        failing_peer_policy=settings.failing_peer_policy,
        health_check=settings.health_check,
        allow_empty_catalog=settings.allow_empty_catalog,
        egress_workload_tls=settings.egress_workload_tls,
    )
    peering = PeeringService(
        zone,
        exports=controller.exports_for_peer,
        on_imports=controller.import_snapshot,
        on_trust_changed=controller.reconfigure,
        on_peer_state=controller.peer_state_changed,
        import_problem=controller.import_problem,
        limits=settings.peer_limits,
        supervisor=controller.supervisor,
        listen_address=settings.peering_address,
        establish_address=settings.establish_address,
        advertise_host=settings.advertise_host,
        heartbeat_interval=settings.heartbeat_interval,
        peer_heartbeat_bounds=settings.peer_heartbeat_bounds,
    )
    controller.on_exports_changed(peering.notify_exports_changed)
    _observe_peering(controller, peering)
    controller.add_companion(peering)
    controller.add_companion(RotationService(zone, controller.reconfigure, supervisor=controller.supervisor))
    poller = BundlePoller(zone, controller.reconfigure, supervisor=controller.supervisor)
    controller.add_companion(poller)
    # The hint every copy of the bundle carries (endpoint, peering, trust export), and the one a rotation's
    # default overlap is counted in: stored, so the CLI's rotations see it too.
    zone.set_refresh_hint(zone.refresh_hint(settings.bundle_refresh_hint))
    endpoint = None
    if settings.bundle_endpoint_port is not None:
        web = settings.bundle_endpoint_web

        def signs_still(svid: Svid) -> bool:
            return svid.intermediates[0] == zone.authority().intermediate

        endpoint = BundleEndpointServer(
            lambda: zone.own_bundle().to_spiffe_json(),
            profile="https_web" if web is not None else "https_spiffe",
            host=settings.bundle_endpoint_host,
            port=settings.bundle_endpoint_port,
            web_certificate=web,
            issue_svid=lambda: zone.issue_svid(endpoint_spiffe_id(zone.trust_domain), _ENDPOINT_SVID_TTL),
            svid_current=signs_still,
            supervisor=controller.supervisor,
        )
        controller.add_companion(endpoint)
    return ZoneRuntime(zone, controller, peering, endpoint, poller)


def _observe_peering(controller: Controller, peering: PeeringService) -> None:
    """Peering health as metrics: a peering that shows ACTIVE with a stale heartbeat is visible at once."""

    def statuses() -> list[PeerStatus]:
        try:
            return peering.peers()
        except PeeringError:
            return []

    telemetry = controller.telemetry
    telemetry.add_gauge(
        "meshfed.peering.state",
        "1 for the state each peering is in (label state), 0 for the others",
        "1",
        lambda: [
            (1.0 if status.state == state else 0.0, {"peer": status.name, "state": state.value})
            for status in statuses()
            for state in PeerState
        ],
    )
    telemetry.add_gauge(
        "meshfed.peering.heartbeat_age",
        "Seconds since the last message from the peer",
        "s",
        lambda: [
            (status.heartbeat_age_seconds, {"peer": status.name})
            for status in statuses()
            if status.heartbeat_age_seconds is not None
        ],
    )
    telemetry.add_gauge(
        "meshfed.peering.propagation_lag",
        "Seconds the oldest unacknowledged export update has waited for the peer",
        "s",
        lambda: [(status.propagation_lag_seconds, {"peer": status.name}) for status in statuses()],
    )
    telemetry.add_gauge(
        "meshfed.peering.imported_services",
        "Services imported from each peer",
        "{service}",
        lambda: [(float(status.imported_services), {"peer": status.name}) for status in statuses()],
    )
    telemetry.add_gauge(
        "meshfed.catalog.services",
        "Services in the zone's catalog",
        "{service}",
        lambda: [(float(len(controller.catalog_snapshot.services)), {})],
    )
