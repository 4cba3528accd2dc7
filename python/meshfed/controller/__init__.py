"""The controller: the one long-running process of a zone, composed of one part per role.

It owns the zone's gateway (the Rust data plane) and runs the zone's background
companions (peering, bundle pollers, rotation). Every change reaches the data
plane through one path, :meth:`Controller.reconfigure`: the gateway driver
builds a complete config from the zone's state and applies it atomically.

The parts, each a module of this package:

* ``gateway_driver``: builds the gateway config from an immutable view of the
  zone, applies it, renews the gateway's SVID, keeps the last applied config;
* ``catalog_watch``: the catalog and export rules as last seen (``zone.toml``
  checked on the same beat), and catalog continuity (exports held while the
  catalog is unexpectedly empty);
* ``live_settings``: ``zone.toml``'s ``[failover]``, ``[[split]]`` and
  ``[[authz]]`` applied live; the rest applies at the next start;
* ``peer_exports``: what each peer is told (one snapshot per peer per applied
  config) and where peers reach the ingress;
* ``peer_imports``: peers' imports, stored and served all or nothing;
* ``failing_peers``: failing peers and the grace timers of the ``closed`` policy;
* ``local_health``: the gateway's health checks of local endpoints, told to peers;
* ``run_record``: what the CLI reads of the running zone (:mod:`meshfed.runstate`):
  a lease saying it runs and the address of every listener;
* ``expiry``: gauges of when certificates and trusted roots expire.

This module puts them together: the order in which they start and stop, and
the members the API, :mod:`meshfed.diagnose`, :mod:`meshfed.runtime` and the
tests use (most of them one line handing over to a part). Every part logs as
``meshfed.controller``. Its tunables are one :class:`ControllerSettings`
(``settings``), handed over whole. It runs past 400 lines because that
interface is kept as it was: some thirty public members, each small, with no
role of its own left here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from opentelemetry.sdk.trace.export import SpanExporter

from meshfed.catalog import CatalogSnapshot, CatalogSource, LocalImport, open_catalog
from meshfed.catalog.publisher import ImportPublisher, PublicationStatus
from meshfed.clock import SYSTEM_CLOCK, Clock
from meshfed.database import Database
from meshfed.errors import MeshfedError
from meshfed.federation.exchange import ServiceSnapshot
from meshfed.federation.exports import UnhealthyEndpoints
from meshfed.federation.failover import FailoverGroup, failover_groups
from meshfed.federation.imports import ImportedService
from meshfed.gateway import Gateway, GatewayConfig
from meshfed.policy.egress import EgressPolicy
from meshfed.supervisor import Supervisor
from meshfed.telemetry import Telemetry
from meshfed.trust.ca import Svid
from meshfed.trust.spiffe import TrustDomain
from meshfed.zone import STATE_FILE, Zone, ZoneConfig

from .catalog_watch import CatalogWatch
from .expiry import observe_expiry
from .failing_peers import FailingPeerPolicy as FailingPeerPolicy
from .failing_peers import FailingPeers
from .gateway_driver import GatewayDriver, ZoneView
from .live_settings import LiveSettings
from .local_health import LocalHealth
from .peer_exports import PeerExports
from .peer_imports import PeerImports
from .run_record import RunRecord
from .settings import ControllerSettings as ControllerSettings
from .settings import health_check_every as health_check_every

log = logging.getLogger(__name__)

PeerTrustDomains = Callable[[], Mapping[str, TrustDomain]]


class Companion(Protocol):
    """A long-running companion of the controller (peering, rotation), started after the gateway, stopped before it."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Controller:
    """Runs one zone: gateway, SVID renewal, catalog watch, companions. Use ``async with`` or start/stop."""

    def __init__(
        self,
        zone: Zone,
        settings: ControllerSettings,
        *,
        catalog: CatalogSource | None = None,
        peer_trust_domains: PeerTrustDomains = dict,
        companions: Sequence[Companion] = (),
        span_exporter: SpanExporter | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """``settings`` holds every tunable (see :class:`ControllerSettings` for each one's meaning).

        ``catalog`` is the zone's catalog source (default: the one ``zone.toml`` names);
        ``peer_trust_domains`` maps peering names to their trust domains (the
        peering service provides it); ``clock`` runs failing peers' grace timers.
        Catalog continuity (:meth:`confirm_empty_catalog`) is explained on
        :attr:`ControllerSettings.allow_empty_catalog`.
        """
        self.zone = zone
        self.settings = settings
        # The process's one connection to state.db, and its change feed (see meshfed.database).
        self._state = Database(zone.directory / STATE_FILE)
        # The settings in force: zone.toml as read at start, with live edits of its live tables applied.
        self._live = LiveSettings(zone, self._state, exports_changed=self.exports_changed)
        config = self._live.settings
        self._catalog = catalog if catalog is not None else open_catalog(zone)
        # Owns every background loop of the zone, the companions' included (see meshfed.supervisor).
        self.supervisor = Supervisor(zone.name)
        self._publisher = ImportPublisher(
            self._catalog,
            self.local_imports,
            describe=f"zone {zone.name}: {config.catalog} catalog",
            state_path=zone.directory / STATE_FILE,
            resync=settings.publication_resync,
            supervisor=self.supervisor,
        )
        self._catalog_watch = CatalogWatch(
            zone,
            self._state,
            self._catalog,
            kind=config.catalog,
            check_zone_toml=self.check_zone_toml,
            exports_changed=self.exports_changed,
            notify_peers=self._notify_exports_listeners,
        )
        self.gateway_address = settings.gateway_address or config.gateway_address
        egress, workload_tls = config.egress, settings.egress_workload_tls
        self._egress = egress if workload_tls is None else egress.model_copy(update={"workload_tls": workload_tls})
        self._peer_trust_domains = peer_trust_domains
        self._companions = list(companions)
        self._exports_listeners: list[Callable[[], None]] = []
        self._problem_sources: list[Callable[[], str]] = []
        self._stopped = False
        self._failing = FailingPeers(
            zone.name,
            self.supervisor,
            grace=settings.failing_peer_grace,
            policy=settings.failing_peer_policy,
            reconfigure=self.reconfigure,
            clock=clock,  # failing peers' grace timers
        )
        self.telemetry = Telemetry(
            zone.name,
            self.gateway_stats,
            span_exporter=span_exporter,
            peer_trust_domains=lambda: {peer: str(domain) for peer, domain in self._peer_trust_domains().items()},
        )
        # The one place that builds and applies gateway config, and keeps what it applied.
        self._driver = GatewayDriver(
            zone,
            view=self._view,
            on_applied=self._config_applied,
            telemetry=self.telemetry,
            address=self.gateway_address,
            egress_host=settings.egress_host,
            egress_port_base=settings.egress_port_base,
            egress_connect_address=settings.egress_connect_address,
            per_import_listeners=settings.per_import_listeners,
            egress=self._egress,
            health_check=settings.health_check,
            svid_ttl=settings.gateway_svid_ttl,
        )
        self._health = LocalHealth(zone, self._state, self._driver, on_change=self._local_health_changed)
        self._imports = PeerImports(zone, self._state, self._driver, reconfigure=self.reconfigure)
        self._exports = PeerExports(
            zone, self._driver, self._health, self._catalog_watch, advertise=settings.gateway_advertise
        )
        self._run_record = RunRecord(self._state, self.egress_addresses)
        self._observe_expiry()

    async def __aenter__(self) -> Controller:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def add_companion(self, companion: Companion) -> None:
        """Register a companion before :meth:`start` (companions usually need :meth:`reconfigure` first)."""
        if self.ready:
            raise MeshfedError("companions must be added before the controller starts")
        self._companions.append(companion)

    def on_exports_changed(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever what this zone exports may have changed (catalog or rules)."""
        self._exports_listeners.append(listener)

    def _notify_exports_listeners(self) -> None:
        for listener in self._exports_listeners:
            listener()

    @property
    def ready(self) -> bool:
        """True once the gateway serves and every service has started."""
        return self._driver.running

    @property
    def gateway(self) -> Gateway:
        return self._driver.gateway

    async def start(self) -> None:
        """Start the gateway with the zone's current state, then the companions."""
        if self._stopped:
            raise MeshfedError(f"zone {self.zone.name}: a stopped controller cannot restart; make a new one")
        await self._driver.issue_svid()
        await self._health.load()
        # Deletes requested while the zone was down apply before anything is served: a deleted
        # peer's imports must not stop the zone from starting.
        await asyncio.to_thread(self._imports.withdraw_deleted_peers)
        await self._live.load_config_rules()
        await self._catalog_watch.load(allow_empty=self.settings.allow_empty_catalog)
        await self._driver.start()
        self._exports.changed()
        started: list[Companion] = []
        try:
            for companion in self._companions:
                await companion.start()
                started.append(companion)
            if started:
                await self.reconfigure()  # companions (peering) may add to the config: peers' identities, imports
        except BaseException:
            for companion in reversed(started):
                with contextlib.suppress(Exception):
                    await companion.stop()
            await self._driver.abandon()
            raise
        await self._run_record.take_lease()
        self._publisher.start()
        self.supervisor.spawn("lease", self._run_record.renew_lease)
        self.supervisor.spawn("listener-record", self._run_record.keep_listeners_recorded)
        self.supervisor.spawn("svid-renewal", self._driver.renew_svid)
        self.supervisor.spawn("catalog-watch", self._catalog_watch.watch, ready=lambda: self._catalog.last_error)
        if self.settings.health_check is not None:
            self.supervisor.spawn("local-health", self._health.watch)
        log.info("zone %s running: gateway ingress on %s", self.zone.name, self.gateway_address)

    async def stop(self) -> None:
        """Stop background tasks, companions (newest first), then the gateway. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        await self.supervisor.stop()
        await self._publisher.stop()
        for companion in reversed(self._companions):
            try:
                await companion.stop()
            except Exception:
                log.exception("zone %s: %s failed to stop cleanly", self.zone.name, type(companion).__name__)
        if self._driver.running:
            await self._run_record.release_lease()
            await self._driver.close()
        await self._catalog.aclose()
        await asyncio.to_thread(self._state.close)  # after the units already submitted
        self.telemetry.shutdown()

    async def reconfigure(self) -> None:
        """Rebuild the gateway config from the zone's state and apply it atomically.

        Serialized: concurrent callers apply one after another, each a complete
        config, so the last state always wins.
        """
        await self._driver.apply()

    def _config_applied(self) -> None:
        """The gateway accepted a config: peers hear of its exports, the CLI and the catalog of its listeners."""
        if self._exports.changed():
            self._notify_exports_listeners()  # a newly admitted peer may now hear of the exports
        # Recorded for the CLI by a loop of its own: no await may follow a successful apply (see GatewayDriver).
        self._run_record.listeners_applied()
        # Never awaited here: a catalog that refuses imports must not stop config and exports.
        self._publisher.request()

    def _view(self) -> ZoneView:
        """What the controller holds that the gateway config is built from, now."""
        return ZoneView(
            catalog=self._catalog_watch.snapshot,
            settings=self._live.settings,
            peer_trust_domains=self._peer_trust_domains(),
            withheld=self._failing.withheld_now(),
        )

    def _local_health_changed(self) -> None:
        """The gateway's verdict on local endpoints changed what peers should hear: tell them."""
        self._exports.changed()
        self._notify_exports_listeners()

    async def exports_changed(self) -> None:
        """Export rules or the catalog changed: apply the new ingress and tell the peers."""
        await self.reconfigure()
        self._notify_exports_listeners()

    async def import_snapshot(self, peer: str, snapshot: ServiceSnapshot) -> None:
        """A peer sent its exports: keep them and serve them.

        All or nothing: if the data plane rejects them, or applying fails, the
        peer's previous imports are put back and served, and PeerInputError (a
        refusal the peer is told of) or the failure is raised.
        """
        await self._imports.put(peer, snapshot)

    async def forget_peer(self, peer: str) -> None:
        """A peering was deleted: drop its imports and their egress listeners."""
        await self._imports.forget(peer)

    async def peer_state_changed(self, peer: str, state: str) -> None:
        """Follow a peering's state: forget a terminated peer, apply the failing-peer policy."""
        if state == "TERMINATED":
            self._failing.forget(peer)
            await self.forget_peer(peer)
        else:
            await self._failing.follow(peer, state)

    async def check_zone_toml(self) -> bool:
        """Apply ``zone.toml``'s live tables if the file changed since it was last read. True if applied."""
        return await self._live.check()

    @property
    def catalog_held(self) -> bool:
        """True while exports are held because the catalog came up empty (ControllerSettings.allow_empty_catalog)."""
        return self._catalog_watch.held

    def confirm_empty_catalog(self) -> bool:
        """An operator confirms the empty catalog: peers now hear it. False if nothing was held."""
        return self._catalog_watch.release("an operator confirmed the empty catalog")

    def import_problem(self, peer: str) -> str | None:
        """Why ``peer``'s imports are not (all) served, if they are not."""
        return self._driver.import_problems.get(peer)

    def problems(self) -> list[str]:
        """What ``/readyz`` reports: one line per thing that is not as it should be."""
        problems = [f"component {problem}" for problem in self.supervisor.problems()]
        if self._catalog_watch.held:
            problems.append(
                "catalog: empty although this zone exported services before; peers keep what they last heard "
                "until it has services again or an operator confirms (POST /v1/catalog/confirm-empty)"
            )
        if not self.publication.ok:
            problems.append(f"import publication: {self.publication.last_error}")
        problems += [
            f"imports of peer {peer}: {problem}" for peer, problem in sorted(self._driver.import_problems.items())
        ]
        problems += [problem for source in self._problem_sources if (problem := source())]
        return problems

    def add_problem_source(self, source: Callable[[], str]) -> None:
        """Also report what ``source()`` says is wrong ('' for nothing): parts of the zone outside the controller
        (its state replica, its gateway feed) whose failures must not leave /readyz saying "ready"."""
        self._problem_sources.append(source)

    def exported_snapshot(self, peer: str) -> ServiceSnapshot:
        """What ``peer`` may see of this zone: the exports of the config the gateway runs now."""
        return self._exports.snapshot(peer)

    def exports_for_peer(self, peer: str) -> ServiceSnapshot | None:
        """What the peering stream sends ``peer``: None until the running config's ingress admits it."""
        return self._exports.for_peer(peer)

    def advertised_gateway_addresses(self) -> list[str]:
        """Where peers reach this zone's ingress."""
        return self._exports.advertised_gateway_addresses()

    def egress_addresses(self) -> dict[str, tuple[str, int]]:
        """Where local clients reach each listener (the advertised egress host), by name; none while stopped."""
        if not self._driver.running:
            return {}
        return {
            name: (self.settings.egress_advertise_host or host, port)
            for name, (host, port) in self.gateway.addresses().items()
        }

    def local_imports(self) -> list[LocalImport]:
        """The imports as local clients reach them: service, peer, and the egress address of each port."""
        return self._imports.local(self.egress_addresses())

    def gateway_config(self) -> GatewayConfig:
        """A complete gateway config built now from the zone's state (not applied: see :attr:`applied_gateway_config`).

        Like every build, it keeps the egress ports it gives new imports and updates :meth:`import_problem`.
        """
        return self._driver.build()[0]

    def served_imports(self) -> list[ImportedService]:
        """The imported services the gateway serves now (neither withheld nor rejected by the data plane)."""
        return self._imports.served()

    @property
    def applied_gateway_config(self) -> GatewayConfig | None:
        """The config the gateway runs: the last one it accepted; None before the controller started it."""
        return self._driver.applied_config

    def failover_groups(self) -> list[FailoverGroup]:
        """The services this zone's gateway serves as failover groups, sources in failover order.

        A group down to one source is listed while its listener runs (``GatewayDriver.sticky_groups``).
        """
        return failover_groups(
            self._catalog_watch.snapshot,
            self._imports.served(),
            self._live.settings.failover,
            self._driver.sticky_groups,
        )

    def gateway_stats(self) -> dict[str, Any]:
        """The gateway's counters, or none while it is not running."""
        return self._driver.gateway.stats() if self._driver.running else {"listeners": {}}

    @property
    def publication(self) -> PublicationStatus:
        """How publishing imports into the zone's catalog went last."""
        return self._publisher.status

    @property
    def publisher(self) -> ImportPublisher:
        return self._publisher

    @property
    def catalog_error(self) -> str | None:
        """What the catalog source last failed with, or None while it answers ."""
        return self._catalog.last_error

    @property
    def catalog_snapshot(self) -> CatalogSnapshot:
        """The catalog as the controller last saw it."""
        return self._catalog_watch.snapshot

    @property
    def gateway_svid(self) -> Svid | None:
        return self._driver.svid

    @property
    def egress_policy(self) -> EgressPolicy:
        """What the egress listeners ask of local clients (zone.toml's [egress], with ``meshfed up``'s override)."""
        return self._egress

    @property
    def unhealthy_endpoints(self) -> UnhealthyEndpoints:
        """Local endpoints the gateway's health checks find failing, whatever the catalog says."""
        return self._health.unhealthy

    @property
    def config(self) -> ZoneConfig:
        """The settings in force: ``zone.toml`` as read at start, with its live tables as last applied."""
        return self._live.settings

    def _observe_expiry(self) -> None:
        """Gauges of when the zone's certificates and the roots it trusts expire (see meshfed.telemetry)."""
        observe_expiry(self.telemetry, self.zone, lambda: self._driver.svid)
