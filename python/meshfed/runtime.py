"""One zone, assembled: the controller with its peering, trust and bundle-endpoint services.

``meshfed up``, the demo and the end-to-end tests all build a running zone
here, so they run the same wiring: exports flow from the controller into the
peering stream, imports and peer bundles flow back into the gateway.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import ipaddress
import resource
from dataclasses import dataclass

from fastapi import FastAPI

from meshfed import defaults
from meshfed.api import create_app
from meshfed.controller import Controller, ControllerSettings
from meshfed.errors import MeshfedError, PeeringError
from meshfed.federation.peer_status import PeerStatus
from meshfed.federation.peering_state import PeerState
from meshfed.federation.service import PeeringService
from meshfed.federation.settings import PeeringSettings
from meshfed.leadership import LeaseSettings, LockSettings
from meshfed.leadership.pod_label import LeaderPod
from meshfed.replica import KvReplica, SecretReplica
from meshfed.trust.ca import Svid
from meshfed.trust.endpoint import BundleEndpointServer, WebCertificate, endpoint_spiffe_id
from meshfed.trust.spiffe import TrustDomain
from meshfed.zone import Zone
from meshfed.zone.bundle_poller import BundlePoller
from meshfed.zone.rotation import RotationService
from meshfed.zone.tokens import TokenFiles

_ENDPOINT_SVID_TTL = dt.timedelta(hours=24)


@dataclass(frozen=True, kw_only=True)
class ZoneSettings:
    """Everything a zone is tuned by: each component's settings, whole, and the zone's own.

    Defaults suit one zone per host. To vary one nested field, replace the part:
    ``replace(settings, peering=replace(settings.peering, heartbeat_interval=0.2))``.
    """

    controller: ControllerSettings = ControllerSettings(egress_port_base=defaults.EGRESS_PORT_BASE)
    peering: PeeringSettings = PeeringSettings()
    bundle_endpoint_port: int | None = None  # serve the SPIFFE bundle endpoint on this port (None: not at all)
    bundle_endpoint_host: str = defaults.BUNDLE_ENDPOINT_HOST  # where it binds: consumers in other zones reach it
    # The https_web certificate and key of the bundle endpoint; None: https_spiffe (the controller's SVID).
    bundle_endpoint_web: WebCertificate | None = None
    bundle_refresh_hint: dt.timedelta | None = None  # default: bundle_refresh_hint in zone.toml, else 5 minutes
    # Serve only while leading (meshfed.leadership): holding this Kubernetes Lease or Consul lock; None: no
    # election, the process serves.
    leader: LeaseSettings | LockSettings | None = None
    # Keep the zone's state in the platform too (meshfed.replica): restored at start when the directory does
    # not hold it, published while the zone runs; None: the directory alone.
    replica: SecretReplica | KvReplica | None = None
    # Publish the applied gateway config beside the replica, for gateway replicas (meshfed.replica.gateway_feed).
    gateway_feed: bool = False
    # Label this pod as the leader or not, for Services to select it (meshfed.leadership.pod_label); None: no label.
    leader_pod: LeaderPod | None = None
    # The deployer's API tokens, which replace the directory's (and a restored replica's) at start.
    token_files: TokenFiles = TokenFiles()


def check_settings(zone: Zone, settings: ZoneSettings) -> None:
    """Refuse settings that cannot work with this zone's catalog, before anything binds."""
    if zone.config.catalog != "kubernetes":
        return
    if zone.config.kubernetes is not None and zone.config.kubernetes.mirror_selector is not None:
        return  # the mirrors select the gateway's pods: no EndpointSlice holds an egress address
    published = settings.controller.egress_advertise_host or settings.controller.egress_host
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


# The cyclic garbage collector's thresholds in a zone process (the interpreter's: 700, 10, 10). A
# zone holding thousands of services has millions of objects, which each full collection walks
# while every thread, the event loop's included, waits: at 10,000 services the interpreter's
# thresholds spent 3.1 s of a 6.5 s sync collecting, in pauses of up to 0.5 s. Almost everything
# meshfed allocates is freed by reference counting; cycles are still collected, less often.
GC_THRESHOLDS = (100_000, 50, 100)


def tune_garbage_collector() -> None:
    """Collect reference cycles at :data:`GC_THRESHOLDS` (see there): for the zone process, once at start."""
    gc.set_threshold(*GC_THRESHOLDS)


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

    controller = Controller(zone, settings.controller, peer_trust_domains=peer_trust_domains)
    peering = PeeringService(
        zone,
        settings.peering,
        exports=controller.exports_for_peer,
        on_imports=controller.import_snapshot,
        on_trust_changed=controller.reconfigure,
        on_peer_state=controller.peer_state_changed,
        import_problem=controller.import_problem,
        supervisor=controller.supervisor,
    )
    controller.on_exports_changed(peering.notify_exports_changed)
    _observe_peering(controller, peering)
    controller.add_companion(peering)
    controller.add_companion(RotationService(zone, controller.reconfigure, supervisor=controller.supervisor))
    poller = BundlePoller(zone, controller.reconfigure, supervisor=controller.supervisor)
    controller.add_companion(poller)
    # The hint every copy of the bundle carries (endpoint, peering, trust export), and the one a rotation's
    # default overlap is counted in: stored, so the CLI's rotations see it too.
    zone.trust.set_refresh_hint(zone.trust.refresh_hint(settings.bundle_refresh_hint))
    endpoint = None
    if settings.bundle_endpoint_port is not None:
        web = settings.bundle_endpoint_web

        def signs_still(svid: Svid) -> bool:
            return svid.intermediates[0] == zone.authority.signing_ca().intermediate

        endpoint = BundleEndpointServer(
            lambda: zone.trust.own_bundle().to_spiffe_json(),
            profile="https_web" if web is not None else "https_spiffe",
            host=settings.bundle_endpoint_host,
            port=settings.bundle_endpoint_port,
            web_certificate=web,
            issue_svid=lambda: zone.authority.issue_svid(endpoint_spiffe_id(zone.trust_domain), _ENDPOINT_SVID_TTL),
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
