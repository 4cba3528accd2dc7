"""The controller: the one long-running process of a zone.

It owns the zone's gateway (the Rust data plane), keeps the gateway's SVID
fresh, watches the catalog, turns the zone's state (trust bundles, catalog,
exports, imports, peers) into one gateway config, and runs the zone's
background services (peering, bundle pollers, rotation). Every change reaches
the data plane through one path, :meth:`Controller.reconfigure`, which builds a
complete config and applies it atomically.

What only the running controller knows is kept where the CLI can read it
(:mod:`meshfed.runstate`): a lease saying it runs, the address of every
listener, and (beside the health version) the local endpoints its gateway's
health checks find failing.

``zone.toml`` is read again whenever it changes (checked with the catalog,
five times a second): ``[failover]``, ``[[split]]`` and ``[[authz]]`` apply
live, each change logged; an edit that does not parse or validate is logged
with its error and the running settings stay. The rest (name, trust domain,
addresses, catalog, egress) applies at the next start, and a change to it is
logged as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

from opentelemetry.sdk.trace.export import SpanExporter
from pydantic import BaseModel, ValidationError

from meshfed.addresses import HostPort
from meshfed.catalog import CatalogSnapshot, CatalogSource, LocalImport, open_catalog
from meshfed.catalog.publisher import DEFAULT_RESYNC, ImportPublisher, PublicationStatus
from meshfed.errors import MeshfedError, PeerInputError
from meshfed.federation.authz import AuthzRules
from meshfed.federation.exchange import ServiceSnapshot
from meshfed.federation.exports import ExportRules, UnhealthyEndpoints, exported_snapshot
from meshfed.federation.failover import FailoverGroup, failover_groups
from meshfed.federation.gateway_config import INGRESS_LISTENER, local_cluster_name
from meshfed.federation.imports import ImportedService, ImportStore, egress_listener_name
from meshfed.federation.peering import PeeringStore, PeerState
from meshfed.gateway import Gateway, GatewayConfig, HealthCheck
from meshfed.policy.egress import EgressPolicy, WorkloadTls
from meshfed.runstate import LEASE_RENEW_SECONDS, RunState
from meshfed.supervisor import Supervisor
from meshfed.telemetry import Telemetry
from meshfed.trust.ca import Svid
from meshfed.trust.spiffe import TrustDomain
from meshfed.validation import describe_validation_error
from meshfed.zone import CONFIG_FILE, STATE_FILE, Zone, ZoneConfig

from .gateway_driver import GatewayDriver, ZoneView
from .retry import retrying

log = logging.getLogger(__name__)

DEFAULT_GATEWAY_SVID_TTL = dt.timedelta(hours=24)
CATALOG_POLL_SECONDS = 0.2
CATALOG_RETRY_SECONDS = 2.0
# How often the gateway's verdict on local endpoints is read; peers hear of a change at once.
LOCAL_HEALTH_POLL_SECONDS = 0.5
# The tables of zone.toml a running zone applies when the file changes; the rest waits for a restart.
LIVE_SETTINGS = ("failover", "split", "authz")
# Endpoints named in one health log line; the rest are counted.
_NAMED_IN_LOG = 10


def health_check_every(interval: dt.timedelta) -> HealthCheck | None:
    """Local endpoint checks every ``interval`` (none for 0): two failures mark an endpoint down, two passes up."""
    if interval <= dt.timedelta(0):
        return None
    ms = max(int(interval.total_seconds() * 1000), 1)
    return HealthCheck(interval_ms=ms, timeout_ms=min(ms, 1_000), healthy_threshold=2, unhealthy_threshold=2)


DEFAULT_HEALTH_CHECK = health_check_every(dt.timedelta(seconds=5))

PeerTrustDomains = Callable[[], Mapping[str, TrustDomain]]
FailingPeerPolicy = Literal["open", "closed"]


class Service(Protocol):
    """A background part of the controller, started after the gateway and stopped before it."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Controller:
    """Runs one zone: gateway, SVID renewal, catalog watch, services. Use ``async with`` or start/stop."""

    def __init__(
        self,
        zone: Zone,
        *,
        gateway_address: str | None = None,
        gateway_advertise: Sequence[str] = (),
        egress_host: str = "127.0.0.1",
        egress_advertise_host: str | None = None,
        egress_port_base: int = 0,
        gateway_svid_ttl: dt.timedelta = DEFAULT_GATEWAY_SVID_TTL,
        peer_trust_domains: PeerTrustDomains = dict,
        services: Sequence[Service] = (),
        span_exporter: SpanExporter | None = None,
        failing_peer_grace: dt.timedelta = dt.timedelta(minutes=5),
        failing_peer_policy: FailingPeerPolicy = "open",
        catalog: CatalogSource | None = None,
        health_check: HealthCheck | None = DEFAULT_HEALTH_CHECK,
        publication_resync: dt.timedelta = DEFAULT_RESYNC,
        allow_empty_catalog: bool = False,
        egress_workload_tls: WorkloadTls | None = None,
    ) -> None:
        """``egress_port_base`` 0 gives each import an ephemeral port; otherwise ports are kept from that base.
        Imports are published to the catalog at ``egress_advertise_host`` (default: the bound host), so a
        gateway bound to 0.0.0.0 in a pod can be published at the pod's IP.

        ``peer_trust_domains`` maps peering names to their trust domains (the
        peering service provides it); ``gateway_advertise`` is where peers reach
        this zone's ingress (default: its bound address). A peer that stays
        FAILING past ``failing_peer_grace`` keeps its imports served under the
        ``open`` policy (callers' connects fail over or fail fast) and loses
        them under ``closed`` until it is back.

        ``health_check`` runs active TCP checks on local endpoints from the
        gateway; an endpoint that fails them counts as unhealthy in what peers
        are told, so their failover groups move on. ``None`` leaves health to
        the catalog alone.

        Imports are published into the catalog (Consul registrations, Kubernetes
        mirrors) by an :class:`ImportPublisher` of their own, again every
        ``publication_resync``: a refusal there never blocks applying config.

        Catalog continuity: a zone that starts with an empty catalog although it
        exported services before (a deleted ``catalog.db``, a Consul or
        Kubernetes pointed at the wrong place) keeps telling its peers what they
        last heard, until the catalog has services again or an operator
        confirms (:meth:`confirm_empty_catalog`, or ``allow_empty_catalog``):
        withdrawing every export would make every peer delete every import.

        ``egress_workload_tls`` overrides ``[egress] workload_tls`` of ``zone.toml``
        (per-import overrides still apply): whether local workloads must present
        SVIDs to the egress listeners.
        """
        self.zone = zone
        # The settings in force: zone.toml as read at start, with live edits of LIVE_SETTINGS applied.
        self._settings: ZoneConfig = zone.config
        # SHA-256 of zone.toml as last read; None: compare the file with the settings at the next check.
        self._config_digest: bytes | None = None
        self._catalog = catalog if catalog is not None else open_catalog(zone)
        # Owns every background loop of the zone, the services' included (see meshfed.supervisor).
        self.supervisor = Supervisor(zone.name)
        self._publisher = ImportPublisher(
            self._catalog,
            self.local_imports,
            describe=f"zone {zone.name}: {self._settings.catalog} catalog",
            state_path=zone.directory / STATE_FILE,
            resync=publication_resync,
            supervisor=self.supervisor,
        )
        self._catalog_snapshot = CatalogSnapshot(version=0, services=[])
        # What each peer was last told, per applied generation: peers ask once per update, and a
        # large catalog makes a snapshot costly to rebuild.
        self._snapshots: dict[str, ServiceSnapshot] = {}
        self.gateway_address = gateway_address or self._settings.gateway_address
        self._advertise = list(gateway_advertise)
        self._egress_advertise_host = egress_advertise_host
        egress = self._settings.egress
        self._egress = (
            egress if egress_workload_tls is None else egress.model_copy(update={"workload_tls": egress_workload_tls})
        )
        self._peer_trust_domains = peer_trust_domains
        self._services = list(services)
        self._exports_listeners: list[Callable[[], None]] = []
        self._stopped = False
        self._failing_peer_grace = failing_peer_grace
        self._failing_peer_policy = failing_peer_policy
        self._failing_since: dict[str, float] = {}
        self._health_check = health_check
        self._unhealthy: UnhealthyEndpoints = frozenset()
        self._health_version = 0
        self._allow_empty_catalog = allow_empty_catalog
        # While the catalog is unexpectedly empty: what each peer was last told, kept as it is.
        self._catalog_hold: dict[str, ServiceSnapshot] | None = None
        self._recorded_listeners: dict[str, tuple[str, int]] | None = None
        self._listeners_applied = asyncio.Event()
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
            egress_host=egress_host,
            egress_port_base=egress_port_base,
            egress=self._egress,
            health_check=health_check,
            svid_ttl=gateway_svid_ttl,
        )
        self._observe_expiry()

    async def __aenter__(self) -> Controller:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def add_service(self, service: Service) -> None:
        """Register a service before :meth:`start` (services usually need :meth:`reconfigure` first)."""
        if self.ready:
            raise MeshfedError("services must be added before the controller starts")
        self._services.append(service)

    def on_exports_changed(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever what this zone exports may have changed (catalog or rules)."""
        self._exports_listeners.append(listener)

    @property
    def ready(self) -> bool:
        """True once the gateway serves and every service has started."""
        return self._driver.running

    @property
    def gateway(self) -> Gateway:
        return self._driver.gateway

    async def start(self) -> None:
        """Start the gateway with the zone's current state, then the services."""
        if self._stopped:
            raise MeshfedError(f"zone {self.zone.name}: a stopped controller cannot restart; make a new one")
        await self._driver.issue_svid()
        self._health_version = await asyncio.to_thread(self._read_health_version)
        # Deletes requested while the zone was down apply before anything is served: a deleted
        # peer's imports must not stop the zone from starting.
        await asyncio.to_thread(self._withdraw_deleted_peers)
        await asyncio.to_thread(self._load_config_rules)
        self._catalog_snapshot = await self._catalog.snapshot()
        if not self._catalog_snapshot.services and not self._allow_empty_catalog:
            await self._hold_exports_if_catalog_lost()
        await self._driver.start()
        self._snapshots = {}
        started: list[Service] = []
        try:
            for service in self._services:
                await service.start()
                started.append(service)
            if started:
                await self.reconfigure()  # services (peering) may add to the config: peers' identities, imports
        except BaseException:
            for service in reversed(started):
                with contextlib.suppress(Exception):
                    await service.stop()
            await self._driver.abandon()
            raise
        await asyncio.to_thread(self._take_lease)
        self._publisher.start()
        self.supervisor.spawn("lease", self._renew_lease)
        self.supervisor.spawn("listener-record", self._keep_listeners_recorded)
        self.supervisor.spawn("svid-renewal", self._driver.renew_svid)
        self.supervisor.spawn("catalog-watch", self._watch_catalog)
        if self._health_check is not None:
            self.supervisor.spawn("local-health", self._watch_local_health)
        log.info("zone %s running: gateway ingress on %s", self.zone.name, self.gateway_address)

    async def stop(self) -> None:
        """Stop background tasks, services (newest first), then the gateway. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        await self.supervisor.stop()
        await self._publisher.stop()
        for service in reversed(self._services):
            try:
                await service.stop()
            except Exception:
                log.exception("zone %s: a service failed to stop cleanly", self.zone.name)
        if self._driver.running:
            with RunState(self.zone.directory) as runstate:
                await asyncio.to_thread(runstate.release_lease)
            await self._driver.close()
        await self._catalog.aclose()
        self.telemetry.shutdown()

    async def reconfigure(self) -> None:
        """Rebuild the gateway config from the zone's state and apply it atomically.

        Serialized: concurrent callers apply one after another, each a complete
        config, so the last state always wins.
        """
        await self._driver.apply()

    def _config_applied(self) -> None:
        """The gateway accepted a config: peers hear of its exports, the CLI and the catalog of its listeners."""
        self._snapshots = {}
        # Recorded for the CLI by a loop of its own: no await may follow a successful apply (see GatewayDriver).
        self._listeners_applied.set()
        # Never awaited here: a catalog that refuses imports must not stop config and exports.
        self._publisher.request()

    def _view(self) -> ZoneView:
        """What the controller holds that the gateway config is built from, now."""
        return ZoneView(
            catalog=self._catalog_snapshot,
            settings=self._settings,
            peer_trust_domains=self._peer_trust_domains(),
            withheld=frozenset(peer for peer in self._failing_since if self._withheld(peer)),
        )

    async def exports_changed(self) -> None:
        """Export rules or the catalog changed: apply the new ingress and tell the peers."""
        await self.reconfigure()
        for listener in self._exports_listeners:
            listener()

    async def import_snapshot(self, peer: str, snapshot: ServiceSnapshot) -> None:
        """A peer sent its exports: keep them and serve them.

        All or nothing: if the data plane rejects them, or applying fails, the
        peer's previous imports are put back and served, and PeerInputError (a
        refusal the peer is told of) or the failure is raised.
        """
        with ImportStore(self.zone.directory) as imports:
            previous = await asyncio.to_thread(imports.get, peer)
            if not await asyncio.to_thread(imports.put, peer, snapshot):
                return
            try:
                await self.reconfigure()
                rejected = self._driver.import_problems.get(peer) if peer in self._driver.rejected else None
            except BaseException:
                await asyncio.to_thread(imports.restore, peer, previous)
                raise
            if rejected is not None:
                await asyncio.to_thread(imports.restore, peer, previous)
                await self.reconfigure()
                raise PeerInputError(rejected)

    async def forget_peer(self, peer: str) -> None:
        """A peering was deleted: drop its imports and their egress listeners."""
        with ImportStore(self.zone.directory) as imports:
            removed = await asyncio.to_thread(imports.remove, peer)
        if removed:
            await self.reconfigure()

    async def peer_state_changed(self, peer: str, state: str) -> None:
        """Follow a peering's state: forget a terminated peer, apply the failing-peer policy."""
        if state == "TERMINATED":
            self._failing_since.pop(peer, None)
            await self.forget_peer(peer)
        elif state == "FAILING":
            self._failing_since.setdefault(peer, time.monotonic())
            if self._failing_peer_policy == "closed" and f"grace-{peer}" not in self._grace_timers():
                self.supervisor.spawn(f"grace-{peer}", lambda: self._close_after_grace(peer))
        elif state == PeerState.DISCONNECTED:
            pass  # the stream dropped; FAILING (and the policy) follows at the heartbeat deadline
        elif self._failing_since.pop(peer, None) is not None and self._failing_peer_policy == "closed":
            await self.reconfigure()  # back from FAILING: serve its imports again

    def _grace_timers(self) -> set[str]:
        return {status.name for status in self.supervisor.statuses() if status.name.startswith("grace-")}

    async def _hold_exports_if_catalog_lost(self) -> None:
        held = await asyncio.to_thread(self._last_sent_exports)
        if not held:
            return
        self._catalog_hold = held
        count = max(len(snapshot.services) for snapshot in held.values())
        log.warning(
            "zone %s: the %s catalog is empty, but this zone exported %d service(s) before; its peers keep what "
            "they last heard until the catalog has services again or an operator confirms "
            "(POST /v1/catalog/confirm-empty, or 'meshfed up --allow-empty-catalog'). Check the catalog's "
            "location (catalog.db in the zone directory, the Consul address, the Kubernetes namespaces).",
            self.zone.name,
            self._settings.catalog,
            count,
        )

    def _last_sent_exports(self) -> dict[str, ServiceSnapshot]:
        with PeeringStore.of(self.zone) as peerings:
            return {
                p.name: p.sent_snapshot
                for p in (peerings.get(light.name, snapshots=True) for light in peerings.peerings())
                if p is not None and p.sent_snapshot is not None and p.sent_snapshot.services
            }

    @property
    def catalog_held(self) -> bool:
        """True while exports are held because the catalog came up empty (see the class docstring)."""
        return self._catalog_hold is not None

    def confirm_empty_catalog(self) -> bool:
        """An operator confirms the empty catalog: peers now hear it. False if nothing was held."""
        return self._release_catalog_hold("an operator confirmed the empty catalog")

    def _release_catalog_hold(self, why: str) -> bool:
        if self._catalog_hold is None:
            return False
        self._catalog_hold = None
        log.warning("zone %s: exports to peers follow the catalog again: %s", self.zone.name, why)
        for listener in self._exports_listeners:
            listener()
        return True

    def import_problem(self, peer: str) -> str | None:
        """Why ``peer``'s imports are not (all) served, if they are not."""
        return self._driver.import_problems.get(peer)

    def problems(self) -> list[str]:
        """What ``/readyz`` reports: one line per thing that is not as it should be."""
        problems = [f"component {problem}" for problem in self.supervisor.problems()]
        if self._catalog_hold is not None:
            problems.append(
                "catalog: empty although this zone exported services before; peers keep what they last heard "
                "until it has services again or an operator confirms (POST /v1/catalog/confirm-empty)"
            )
        if self._catalog.last_error is not None:
            problems.append(f"catalog: {self._catalog.last_error}")
        if not self.publication.ok:
            problems.append(f"import publication: {self.publication.last_error}")
        problems += [
            f"imports of peer {peer}: {problem}" for peer, problem in sorted(self._driver.import_problems.items())
        ]
        return problems

    def exported_snapshot(self, peer: str) -> ServiceSnapshot:
        """What ``peer`` may see of this zone: the exports of the config the gateway runs now."""
        if self._catalog_hold is not None and peer in self._catalog_hold:
            return self._catalog_hold[peer]
        cached = self._snapshots.get(peer)
        if cached is not None:
            return cached
        applied = self._driver.applied_exports
        snapshot = exported_snapshot(
            zone=self.zone.name,
            trust_domain=str(self.zone.trust_domain),
            gateway_addresses=self.advertised_gateway_addresses(),
            peer=peer,
            catalog=applied.catalog,
            index=applied.index,
            rules_version=applied.rules_version,
            health_version=self._health_version,
            unhealthy=self._unhealthy,
        )
        self._snapshots[peer] = snapshot
        return snapshot

    def advertised_gateway_addresses(self) -> list[str]:
        """Where peers reach this zone's ingress."""
        if self._advertise:
            return list(self._advertise)
        host, port = self.gateway.address(INGRESS_LISTENER)
        # A wildcard bind is reachable on loopback at least; real deployments set gateway_advertise.
        return [str(HostPort("127.0.0.1" if host in ("0.0.0.0", "::") else host, port))]  # noqa: S104 -- compares

    def gateway_config(self) -> GatewayConfig:
        """A complete gateway config built now from the zone's state (not applied: see :attr:`applied_gateway_config`).

        Like every build, it keeps the egress ports it gives new imports and updates :meth:`import_problem`.
        """
        return self._driver.build()[0]

    @property
    def applied_gateway_config(self) -> GatewayConfig | None:
        """The config the gateway runs: the last one it accepted; None before the controller started it."""
        return self._driver.applied_config

    def _load_config_rules(self) -> None:
        """Make the stored ``zone.toml`` authorization rules those of the file as it is now."""
        with AuthzRules(self.zone.directory) as authz:
            authz.replace_config_rules(self._settings.authz)

    def _withdraw_deleted_peers(self) -> None:
        """Drop the imports of peerings deleted (or gone) while no controller ran."""
        with PeeringStore.of(self.zone) as peerings, ImportStore(self.zone.directory) as imports:
            live = {
                p.name for p in peerings.peerings() if not p.delete_requested and p.state is not PeerState.TERMINATED
            }
            stored, unreadable = imports.read()
            for peer in sorted((stored.keys() | unreadable.keys()) - live):
                log.info("zone %s: withdrawing the imports of deleted peering %s", self.zone.name, peer)
                imports.remove(peer)

    def _served_imports(self, imports: ImportStore) -> list[ImportedService]:
        return [
            item
            for item in imports.services()
            if not self._withheld(item.peer) and item.peer not in self._driver.rejected
        ]

    def failover_groups(self) -> list[FailoverGroup]:
        """The services this zone's gateway serves as failover groups, sources in failover order."""
        with ImportStore(self.zone.directory) as imports:
            served = self._served_imports(imports)
        return failover_groups(self._catalog_snapshot, served, self._settings.failover)

    def _withheld(self, peer: str) -> bool:
        """Under the closed policy, a peer failing for longer than the grace period is not served."""
        since = self._failing_since.get(peer)
        if since is None or self._failing_peer_policy != "closed":
            return False
        return time.monotonic() - since >= self._failing_peer_grace.total_seconds()

    async def _close_after_grace(self, peer: str) -> None:
        await asyncio.sleep(self._failing_peer_grace.total_seconds())
        if peer in self._failing_since:
            log.warning("zone %s: peer %s failing past the grace period; its imports stop", self.zone.name, peer)
            await retrying(self.zone.name, f"withholding the imports of {peer}", self.reconfigure)

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
        return self._catalog_snapshot

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
        return self._unhealthy

    async def _watch_catalog(self) -> None:
        # The source wakes us on catalog changes; export rules are two integers
        # away in SQLite, so checking them on every wake-up catches CLI writes
        # from other processes within a fraction of a second.
        with ExportRules(self.zone.directory) as exports, AuthzRules(self.zone.directory) as authz:

            def rules_version() -> tuple[int, int]:
                return exports.version(), authz.version()

            seen_rules = rules_version()
            while True:
                since = self._catalog_snapshot.version
                try:
                    snapshot = await self._catalog.watch(since, CATALOG_POLL_SECONDS)
                except MeshfedError as err:
                    log.error("zone %s: catalog watch failed, retrying: %s", self.zone.name, err)
                    await asyncio.sleep(CATALOG_RETRY_SECONDS)
                    continue
                await self.check_zone_toml()
                current = rules_version()
                if snapshot.version != since or current != seen_rules:
                    self._catalog_snapshot, seen_rules = snapshot, current
                    if snapshot.services:
                        self._release_catalog_hold("the catalog has services again")
                    await retrying(self.zone.name, "applying a catalog or export change", self.exports_changed)
                else:
                    await asyncio.sleep(CATALOG_POLL_SECONDS)

    def _read_health_version(self) -> int:
        with ExportRules(self.zone.directory) as rules:
            return rules.health_version()

    async def _watch_local_health(self) -> None:
        # The gateway health-checks local endpoints; when its verdict changes what
        # peers should hear (an exported service lost or regained its last live
        # endpoint, or one of several), tell them without touching the data plane.
        while True:
            await asyncio.sleep(LOCAL_HEALTH_POLL_SECONDS)
            unhealthy = self._unhealthy_local_endpoints()
            if unhealthy == self._unhealthy:
                continue
            with ExportRules(self.zone.directory) as rules:
                version = await asyncio.to_thread(rules.bump_health_version, unhealthy)
            self._log_health_change(self._unhealthy, unhealthy)
            self._unhealthy, self._health_version, self._snapshots = unhealthy, version, {}
            for listener in self._exports_listeners:
                listener()

    def _log_health_change(self, before: UnhealthyEndpoints, after: UnhealthyEndpoints) -> None:
        failing, recovered = sorted(after - before), sorted(before - after)
        if failing:
            log.warning(
                "zone %s: %s failing the gateway's health checks (TCP connects from this zone's gateway); peers now "
                "count them unhealthy. Is each backend running and listening on that address?",
                self.zone.name,
                _endpoint_list(failing),
            )
        if recovered:
            log.info("zone %s: %s passing health checks again", self.zone.name, _endpoint_list(recovered))

    def _unhealthy_local_endpoints(self) -> UnhealthyEndpoints:
        if not self._driver.running:
            return self._unhealthy
        down = self._driver.gateway.unhealthy_endpoints()
        if not down:
            return frozenset()  # the common case: no need to index thousands of services
        catalog = self._driver.applied_exports.catalog
        services = {local_cluster_name(service): service.key for service in catalog.services}
        return frozenset(
            (*services[name], address) for name, addresses in down.items() if name in services for address in addresses
        )

    def egress_addresses(self) -> dict[str, tuple[str, int]]:
        """Where local clients reach each listener (the advertised egress host), by name; none while stopped."""
        if not self._driver.running:
            return {}
        return {
            name: (self._egress_advertise_host or host, port) for name, (host, port) in self.gateway.addresses().items()
        }

    def local_imports(self) -> list[LocalImport]:
        """The imports as local clients reach them: service, peer, and the egress address of each port."""
        bound = self.egress_addresses()
        by_import: dict[tuple[str, str, str], dict[str, tuple[str, int]]] = {}
        with ImportStore(self.zone.directory) as imports:
            for imported in imports.services():
                for port_name in imported.service.ports:
                    address = bound.get(egress_listener_name(imported, port_name))
                    if address is not None:
                        key = (imported.peer, imported.service.namespace, imported.service.name)
                        by_import.setdefault(key, {})[port_name] = address
        return [
            LocalImport(peer=peer, namespace=namespace, service=service, ports=ports)
            for (peer, namespace, service), ports in sorted(by_import.items())
        ]

    @property
    def config(self) -> ZoneConfig:
        """The settings in force: ``zone.toml`` as read at start, with its live tables as last applied."""
        return self._settings

    # -- what the CLI reads of the running zone (meshfed.runstate) --------------------------

    def _take_lease(self) -> None:
        with RunState(self.zone.directory) as runstate, ExportRules(self.zone.directory) as rules:
            runstate.take_lease()
            # A verdict of an earlier run says nothing about this gateway, which has checked nothing yet.
            rules.clear_unhealthy_endpoints()
        self._recorded_listeners = None
        self._record_listeners()

    async def _renew_lease(self) -> None:
        with RunState(self.zone.directory) as runstate:
            while True:
                await asyncio.sleep(LEASE_RENEW_SECONDS)
                await asyncio.to_thread(runstate.renew_lease)

    async def _keep_listeners_recorded(self) -> None:
        while True:
            await self._listeners_applied.wait()
            self._listeners_applied.clear()
            await asyncio.to_thread(self._record_listeners)

    def _record_listeners(self) -> None:
        """Keep where each listener serves for the CLI, when it changed (most applies change no listener)."""
        addresses = self.egress_addresses()
        if addresses == self._recorded_listeners:
            return
        with RunState(self.zone.directory) as runstate:
            runstate.record_listeners(addresses)
        self._recorded_listeners = addresses

    # -- expiry gauges ----------------------------------------------------------------------

    def _observe_expiry(self) -> None:
        """Gauges of when the zone's certificates and the roots it trusts expire (see meshfed.telemetry)."""

        def ca() -> list[tuple[float, dict[str, str]]]:
            try:
                authority = self.zone.authority()
            except MeshfedError:
                return []
            return [
                (authority.root.not_valid_after_utc.timestamp(), {"certificate": "root"}),
                (authority.intermediate.not_valid_after_utc.timestamp(), {"certificate": "intermediate"}),
            ]

        def svid() -> list[tuple[float, dict[str, str]]]:
            current = self._driver.svid
            return [] if current is None else [(current.leaf.not_valid_after_utc.timestamp(), {})]

        def bundles() -> list[tuple[float, dict[str, str]]]:
            try:
                stored = self.zone.trusted_bundles()
            except MeshfedError:
                return []
            return [
                (
                    min(root.not_valid_after_utc for root in item.bundle.roots).timestamp(),
                    {"trust_domain": item.bundle.trust_domain.name},
                )
                for item in stored
                if item.bundle.roots
            ]

        self.telemetry.add_gauge(
            "meshfed.ca.expiry_timestamp",
            "Unix time at which the zone's active CA root or intermediate (label certificate) expires",
            "s",
            ca,
        )
        self.telemetry.add_gauge(
            "meshfed.gateway.svid.expiry_timestamp", "Unix time at which the gateway's current SVID expires", "s", svid
        )
        self.telemetry.add_gauge(
            "meshfed.trust.bundle.expiry_timestamp",
            "Unix time at which the first root of each trusted bundle (this zone's own included) expires",
            "s",
            bundles,
        )

    # -- live zone.toml -----------------------------------------------------------------------

    async def check_zone_toml(self) -> bool:
        """Apply ``zone.toml``'s live tables if the file changed since it was last read. True if applied.

        Called by the catalog watch five times a second: the file is a few hundred
        bytes, so it is read and hashed whole (an mtime misses two edits within
        one clock tick). An edit that does not parse or validate is logged once
        and the running settings stay; so do settings that only apply at start.
        """
        path = self.zone.directory / CONFIG_FILE
        try:
            text = await asyncio.to_thread(path.read_bytes)
        except OSError as err:
            if self._config_digest is not None:
                log.error("zone %s: cannot read %s, the running settings stay: %s", self.zone.name, path, err)
            self._config_digest = None
            return False
        digest = hashlib.sha256(text).digest()
        if digest == self._config_digest:
            return False
        self._config_digest = digest
        try:
            edited = ZoneConfig.model_validate(tomllib.loads(text.decode()))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            log.error("zone %s: %s does not parse, the running settings stay: %s", self.zone.name, path, err)
            return False
        except ValidationError as err:
            log.error(
                "zone %s: %s is invalid, the running settings stay: %s",
                self.zone.name,
                path,
                describe_validation_error(err),
            )
            return False
        return await self._apply_live_settings(edited)

    async def _apply_live_settings(self, edited: ZoneConfig) -> bool:
        current = self._settings
        fixed = [name for name in type(current).model_fields if name not in LIVE_SETTINGS]
        waiting = [name for name in fixed if getattr(edited, name) != getattr(current, name)]
        if waiting:
            log.warning(
                "zone %s: %s in %s changed; a running zone does not apply %s: restart the zone ('meshfed up')",
                self.zone.name,
                ", ".join(waiting),
                CONFIG_FILE,
                "that" if len(waiting) == 1 else "those",
            )
        changed = [name for name in LIVE_SETTINGS if getattr(edited, name) != getattr(current, name)]
        if not changed:
            return False
        self._settings = current.model_copy(update={name: getattr(edited, name) for name in changed})
        try:
            if "authz" in changed:
                await asyncio.to_thread(self._load_config_rules)
            await self.exports_changed()
        except MeshfedError as err:
            self._settings = current
            if "authz" in changed:
                await asyncio.to_thread(self._load_config_rules)
            log.error(
                "zone %s: the edited %s of %s cannot be applied, the running settings stay: %s",
                self.zone.name,
                " and ".join(f"[{name}]" for name in changed),
                CONFIG_FILE,
                err,
            )
            await retrying(self.zone.name, "restoring the running settings", self.exports_changed)
            return False
        for name in changed:
            log.info(
                "zone %s: [%s] of %s applied: %s (was %s)",
                self.zone.name,
                name,
                CONFIG_FILE,
                _describe_setting(getattr(edited, name)),
                _describe_setting(getattr(current, name)),
            )
        return True


def _describe_setting(value: object) -> str:
    """A live setting in one line for the log: tables as JSON."""
    if isinstance(value, list):
        return "[" + ", ".join(_describe_setting(item) for item in value) + "]"
    if isinstance(value, BaseModel):
        return value.model_dump_json(exclude_defaults=True)
    return repr(value)


def _endpoint_list(endpoints: Sequence[tuple[str, str, str]]) -> str:
    shown = endpoints[:_NAMED_IN_LOG]
    named = ", ".join(f"{address} of {service}.{namespace}" for namespace, service, address in shown)
    more = len(endpoints) - _NAMED_IN_LOG
    noun = "endpoint" if len(endpoints) == 1 else "endpoints"
    return f"{noun} {named}" + (f" and {more} more" if more > 0 else "")
