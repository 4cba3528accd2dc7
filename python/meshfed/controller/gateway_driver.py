"""The gateway driver: the one place that builds the zone's gateway config, applies it, and keeps what it applied.

A config is built from a :class:`ZoneView` (what the controller holds in memory:
the catalog as last seen, the settings in force, the peers' trust domains, the
peers whose imports are withheld), taken once per build, and from what the
zone's directory stores (export and authorization rules, imports, trust
bundles, egress ports). The driver owns the Rust gateway and its SVID (issued,
renewed at half-life, and reissued when a rotation retires the CA that signed
it), and keeps the last config the gateway accepted: that, and nothing built
afresh, is what the gateway runs.

A failover group that shrinks to one source keeps its listener and address
(``federation/failover.py``). Which services were groups is not a table of its
own: it is read from state that already has one owner each. With an egress
port base, a group's listener holds a port in ``egress_ports`` from the first
build it appears in, so the group survives restarts with the same port. With
ephemeral ports (base 0) nothing is stored; the groups of the applied config
are the memory, and the gateway keeps a listener whose name and address
(``host:0``) are unchanged on its socket. That memory ends with the process: after
a restart, a group already down to one source is served by its import listener
alone (ephemeral addresses change across restarts anyway).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from meshfed.addresses import HostPort
from meshfed.catalog import CatalogSnapshot
from meshfed.errors import GatewayConfigError, MeshfedError
from meshfed.federation.authz import AuthzIndex, AuthzRules
from meshfed.federation.exchange import ServiceSnapshot
from meshfed.federation.exports import ExportedCatalog, ExportIndex, ExportRules
from meshfed.federation.failover import groups_of_listeners
from meshfed.federation.gateway_config import Fragments, build_gateway_config
from meshfed.federation.imports import (
    EgressPorts,
    Head,
    ImportedService,
    ImportedServices,
    ImportStore,
    ParsedSnapshots,
    egress_listener_name,
    parse_stored,
)
from meshfed.federation.resolver import GatewayResolver
from meshfed.gateway import Gateway, GatewayConfig, GatewayPatch, HealthCheck, Identity
from meshfed.gateway.diff import config_patch
from meshfed.gateway.handle import Compiled, compile_config, validate
from meshfed.heap import release_free_memory
from meshfed.policy.egress import EgressPolicy
from meshfed.telemetry import Telemetry
from meshfed.trust.bundle import bundle_roots_pem
from meshfed.trust.ca import Svid
from meshfed.trust.spiffe import TrustDomain
from meshfed.zone import Zone, ZoneConfig

from .retry import retrying

# The controller's parts log as the controller: operators (and tests) follow one logger.
log = logging.getLogger("meshfed.controller")


@dataclass(frozen=True)
class ZoneView:
    """What the controller holds in memory that a gateway config is built from, as it was at one moment."""

    catalog: CatalogSnapshot
    settings: ZoneConfig
    peer_trust_domains: Mapping[str, TrustDomain]
    withheld: frozenset[str] = frozenset()  # peers whose imports are not served (the failing-peer policy)


@dataclass(frozen=True)
class ConfigExports:
    """What one gateway config was built from: the catalog and export rules, and the imports it serves."""

    catalog: CatalogSnapshot
    index: ExportIndex
    rules_version: int
    authz: AuthzIndex = field(default_factory=AuthzIndex)
    proxy_protocol: frozenset[tuple[str, str]] = frozenset()
    # The peers whose trust domains the config's ingress admits.
    admitted: frozenset[str] = frozenset()
    # The exported services as peers see them, built with the config (off the event loop).
    exported: ExportedCatalog | None = None
    # The imported services the config serves (neither withheld nor rejected by the data plane).
    imports: tuple[ImportedService, ...] = ()
    # Per peer whose imports it serves, the (epoch, version) of the stored snapshot they came from.
    import_heads: Mapping[str, Head] = field(default_factory=dict)


@dataclass(frozen=True)
class _Rules:
    """The export and authorization rules at one version of each, read and indexed once per version.

    Each build used to read and index them again (about 20 ms for 10,000
    rules), and a new index each time made every service's pieces look changed
    to :class:`~meshfed.federation.gateway_config.Fragments`.
    """

    versions: tuple[int, int]  # (export rules, authorization rules): every change bumps one
    index: ExportIndex
    authz: AuthzIndex
    proxy_protocol: frozenset[tuple[str, str]]


@dataclass(frozen=True)
class _Draft:
    """A config built from the zone's state, before the data plane checked it, and what it was built from."""

    config: GatewayConfig
    exports: ConfigExports  # before the imports and exported summaries of the checked config
    served: dict[str, ServiceSnapshot]  # the peers' imports it serves
    problems: dict[str, str]  # per peer, why its imports are not (all) served
    ports: EgressPorts
    rebuild: Callable[[dict[str, ServiceSnapshot]], GatewayConfig]  # the same config, with other imports


class GatewayDriver:
    """Builds and applies the zone's gateway config; owns the gateway and its SVID; keeps the last applied config.

    ``view`` is called once per build (in a worker thread: it may read the
    peering store). ``on_applied`` runs right after the gateway accepted a
    config, before any await: a cancel landing after a successful apply must not
    make a caller roll back what the gateway serves.
    """

    def __init__(
        self,
        zone: Zone,
        *,
        view: Callable[[], ZoneView],
        on_applied: Callable[[], None],
        telemetry: Telemetry,
        address: str,
        egress_host: str,
        egress_port_base: int,
        egress_connect_address: str | None,
        per_import_listeners: bool,
        egress: EgressPolicy,
        health_check: HealthCheck | None,
        svid_ttl: dt.timedelta,
    ) -> None:
        self._zone = zone
        self._view = view
        self._on_applied = on_applied
        self._telemetry = telemetry
        self.address = address
        self._egress_host = egress_host
        self._egress_port_base = egress_port_base
        self._egress_connect_address = egress_connect_address
        self._per_import_listeners = per_import_listeners
        self._egress = egress
        self._health_check = health_check
        self._svid_ttl = svid_ttl
        self._gateway: Gateway | None = None
        self._svid: Svid | None = None
        self._resolver = GatewayResolver()
        self._lock = asyncio.Lock()
        self._applied: GatewayConfig | None = None
        self._applied_exports = ConfigExports(CatalogSnapshot(version=0, services=[]), ExportIndex([]), 0)
        # Per peer, why its imports are not (all) served: unreadable, rejected by the data plane, or
        # gateway addresses that do not resolve. Recomputed by every config build.
        self._import_problems: dict[str, str] = {}
        # Peers whose imports the last build left out because the data plane rejected them.
        self._rejected: frozenset[str] = frozenset()
        # The pieces of the last build, per service and import, reused by the next (see Fragments).
        self._fragments = Fragments()
        # The stored imports as the last build parsed them. A build for the API may run beside the
        # driver's: each entry is a consistent (head, snapshot) pair, and one lost costs a parse.
        self._parsed_imports: ParsedSnapshots = {}
        # The imported services of the last build, reused for the snapshots (and services) it shares.
        self._imported = ImportedServices()
        # The rules as the last build read them (a build beside the driver's may replace them: each is whole).
        self._rules: _Rules | None = None

    # -- what it runs -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._gateway is not None

    @property
    def gateway(self) -> Gateway:
        if self._gateway is None:
            raise MeshfedError(f"zone {self._zone.name}: the controller is not running")
        return self._gateway

    @property
    def applied_config(self) -> GatewayConfig | None:
        """The config the gateway runs: the last one it accepted (None before the first)."""
        return self._applied

    @property
    def applied_exports(self) -> ConfigExports:
        """The exports of the config the gateway runs, which is all that peers may be told about."""
        return self._applied_exports

    @property
    def sticky_groups(self) -> frozenset[tuple[str, str]]:
        """The (namespace, service) whose failover listener the applied config has: groups, even with one source."""
        applied = self._applied
        return groups_of_listeners(item.name for item in applied.listeners) if applied else frozenset()

    @property
    def svid(self) -> Svid | None:
        return self._svid

    @property
    def import_problems(self) -> Mapping[str, str]:
        """Per peer, why its imports are not (all) served, as the last build found."""
        return self._import_problems

    @property
    def rejected(self) -> frozenset[str]:
        """Peers whose imports the last build left out because the data plane rejected them."""
        return self._rejected

    def stored_import(self, peer: str) -> ServiceSnapshot | None:
        """The snapshot of ``peer``'s imports the driver holds as the stored one, if any."""
        held = self._parsed_imports.get(peer)
        return None if held is None else held[1]

    def stored(self, peer: str, snapshot: ServiceSnapshot) -> None:
        """``peer``'s imports were just stored from ``snapshot``: the next build takes that very snapshot
        (which the peer's link holds too) instead of reading and parsing a second copy."""
        self._parsed_imports[peer] = ((snapshot.epoch, snapshot.version), snapshot)

    # -- lifecycle --------------------------------------------------------------------------

    async def issue_svid(self) -> None:
        """Issue the gateway's first SVID (before the first build)."""
        self._svid = await asyncio.to_thread(self._issue_svid)

    async def start(self) -> None:
        """Build the config and start the gateway with it."""
        config, exports, compiled = await asyncio.to_thread(self.build)
        gateway = await asyncio.to_thread(Gateway, compiled)  # checked by the build: not compiled again
        self._applied, self._applied_exports = config, exports
        self._gateway = gateway

    async def abandon(self) -> None:
        """A start failed after the gateway started: forget it, then close it."""
        gateway, self._gateway = self._gateway, None
        if gateway is not None:
            await asyncio.to_thread(gateway.close)

    async def close(self) -> None:
        """Close the gateway; it runs until it is closed."""
        if self._gateway is not None:
            await asyncio.to_thread(self._gateway.close)
            self._gateway = None

    async def apply(self) -> None:
        """Rebuild the gateway config from the zone's state and apply it atomically.

        Serialized: concurrent callers apply one after another, each a complete
        config, so the last state always wins.
        """
        async with self._lock:
            with self._telemetry.span("meshfed.gateway.apply", **{"meshfed.zone": self._zone.name}) as span:
                if await asyncio.to_thread(self._svid_signer_retired):
                    # A rotation switched the signing CA: present an SVID from the new one now.
                    self._svid = await asyncio.to_thread(self._issue_svid)
                draft = await asyncio.to_thread(self._draft)
                config = draft.config
                span.set_attribute("meshfed.gateway.listeners", len(config.listeners))
                span.set_attribute("meshfed.gateway.clusters", len(config.clusters))
                # What changed, as a patch of the running config: work for the change only. A whole
                # config when the patch cannot say it (a new SVID, new bundles) or the core refuses it.
                running = self._applied
                patch = await asyncio.to_thread(config_patch, running, config) if running is not None else None
                span.set_attribute("meshfed.gateway.patch", patch is not None)
                patched = await asyncio.to_thread(self._patched, draft, patch) if patch is not None else None
                if patched is not None:
                    exports = patched
                else:
                    config, exports, compiled = await asyncio.to_thread(self._checked, draft)
                    await asyncio.to_thread(self._apply, compiled)
                # Only now may peers hear of these exports: the ingress already admits them.
                self._applied, self._applied_exports = config, exports
                # No await may follow a successful apply here, or a cancel landing on it would make
                # import_snapshot roll back what the gateway serves.
                self._on_applied()
                # The previous generation (Python objects, the document, the core's compiled config) was just
                # freed: give it back, or the process grows by a config's worth per change (meshfed/heap.py).
                # Not awaited: nothing may be awaited after a successful apply (see above).
                asyncio.get_running_loop().run_in_executor(None, release_free_memory)
                log.debug("zone %s: gateway config applied", self._zone.name)

    async def renew_svid(self) -> None:
        """Renew the gateway's SVID at half-life, forever, applying each renewal."""
        # Renew at half-life, as SPIRE agents do: a failed renewal leaves half the
        # lifetime to retry before peers start refusing the gateway.
        while True:
            svid = self._svid
            assert svid is not None
            lifetime = svid.leaf.not_valid_after_utc - svid.leaf.not_valid_before_utc
            renew_at = svid.leaf.not_valid_before_utc + lifetime / 2
            await asyncio.sleep(max((renew_at - dt.datetime.now(dt.UTC)).total_seconds(), 1.0))
            self._svid = await asyncio.to_thread(self._issue_svid)
            await retrying(self._zone.name, "applying the renewed gateway SVID", self.apply)
            log.info("zone %s: gateway SVID renewed until %s", self._zone.name, self._svid.leaf.not_valid_after_utc)

    def _apply(self, compiled: Compiled) -> None:
        self.gateway.apply(compiled)

    def _svid_signer_retired(self) -> bool:
        return self._svid is not None and self._svid.intermediates[0] != self._zone.authority.signing_ca().intermediate

    def _issue_svid(self) -> Svid:
        return self._zone.authority.issue_svid(self._zone.trust_domain.gateway_id, self._svid_ttl)

    # -- building ---------------------------------------------------------------------------

    def build(self) -> tuple[GatewayConfig, ConfigExports, Compiled]:
        """The config for the zone's state now, the exports it admits (all that peers may be told about),
        and the config as the data plane compiled it (checked, to apply without compiling it again).

        One peer's imports can never fail the build: a stored snapshot that does
        not parse, or imports the data plane rejects, are left out (that peer
        alone) and reported in :attr:`import_problems`; if even the config
        without any import is rejected, the fault is this zone's own and is raised.
        Egress ports given to new imports are kept.
        """
        return self._checked(self._draft())

    def _draft(self) -> _Draft:
        """The config for the zone's state now, not yet checked by the data plane."""
        if self._svid is None:
            raise MeshfedError(f"zone {self._zone.name}: no gateway SVID yet; start the controller first")
        view = self._view()
        directory = self._zone.directory
        snapshots: dict[str, ServiceSnapshot] = {}

        def live() -> set[str]:
            # Every stored import's listeners: asked of the ports only once their range is full.
            return {
                egress_listener_name(item, port) for item in self._imported.of(snapshots) for port in item.service.ports
            }

        # Read in one short block: in the zone process it holds the one connection to state.db, and
        # what follows (DNS, building and validating thousands of listeners) must not hold it.
        with ExportRules(directory) as rules, AuthzRules(directory) as authz, ImportStore(directory) as imports:
            current = self._rules_of(rules, authz)
            exports = ConfigExports(
                view.catalog,
                current.index,
                current.versions[0],
                current.authz,
                current.proxy_protocol,
                frozenset(view.peer_trust_domains),
            )
            held = {peer: head for peer, (head, _) in self._parsed_imports.items()}
            heads, documents = imports.documents_unless(held)
            ports = imports.egress_ports(self._egress_port_base, live)
        parsed, problems = parse_stored(heads, documents, self._parsed_imports)  # outside the block
        snapshots.update(parsed)
        trust_bundles = bundle_roots_pem([stored.bundle for stored in self._zone.trust.trusted_bundles()])
        served = {peer: snapshot for peer, snapshot in snapshots.items() if peer not in view.withheld}
        served = self._resolved(served, problems)

        # The services that were failover groups keep their listener with one source: those holding an
        # egress port (kept across restarts), and those of the applied config (ephemeral ports hold none).
        sticky = groups_of_listeners(ports.listeners()) | self.sticky_groups

        def build(peers: dict[str, ServiceSnapshot]) -> GatewayConfig:
            return self._config(view, exports, trust_bundles, self._imported.of(peers), ports, sticky)

        return _Draft(build(served), exports, served, problems, ports, build)

    def _rules_of(self, rules: ExportRules, authz: AuthzRules) -> _Rules:
        """The rules now: those of the last build when neither version moved, else read again."""
        versions = (rules.version(), authz.version())
        held = self._rules
        if held is None or held.versions != versions:
            held = self._rules = _Rules(
                versions, ExportIndex(rules.rules()), AuthzIndex(authz.rules()), rules.proxy_protocol_services()
            )
        return held

    def _checked(self, draft: _Draft) -> tuple[GatewayConfig, ConfigExports, Compiled]:
        """The draft compiled, with the imports of any peer the data plane rejects left out."""
        config = draft.config
        rejected: set[str] = set()
        try:
            compiled = compile_config(config)
        except GatewayConfigError as err:
            config, rejected = self._without_rejected_peers(draft.rebuild, draft.served, err, draft.problems)
            compiled = compile_config(config)
        return (config, self._finish(draft, rejected), compiled)

    def _patched(self, draft: _Draft, patch: GatewayPatch) -> ConfigExports | None:
        """Apply the draft as ``patch`` to the running config; its exports, or None if the core refused it.

        The exports are settled first, as for a whole config: once the gateway serves the patch, the
        caller must resume at once (a cancel landing in between would roll back what it serves).
        """
        exports = self._finish(draft, set())
        try:
            self.gateway.apply_patch(patch)
        except GatewayConfigError as err:
            # A peer's imports the data plane rejects, say: the whole path below finds out whose.
            log.info(
                "zone %s: the gateway refused the config change as a patch (%s); applying it whole",
                self._zone.name,
                err,
            )
            return None
        return exports

    def _finish(self, draft: _Draft, rejected: set[str]) -> ConfigExports:
        """Keep what a checked draft settled (egress ports, problems); the exports of its config."""
        with ImportStore(self._zone.directory) as imports:
            imports.save_ports(draft.ports)
        kept = {peer: snapshot for peer, snapshot in draft.served.items() if peer not in rejected}
        exports = dataclasses.replace(
            draft.exports,
            exported=ExportedCatalog(draft.exports.catalog, draft.exports.index, self._applied_exports.exported),
            imports=tuple(self._imported.of(kept)),
            import_heads={peer: (snapshot.epoch, snapshot.version) for peer, snapshot in kept.items()},
        )
        self._import_problems, self._rejected = draft.problems, frozenset(rejected)
        return exports

    def _without_rejected_peers(
        self,
        build: Callable[[dict[str, ServiceSnapshot]], GatewayConfig],
        served: dict[str, ServiceSnapshot],
        error: GatewayConfigError,
        problems: dict[str, str],
    ) -> tuple[GatewayConfig, set[str]]:
        """The config with the imports of every peer the data plane rejects left out, one peer at a time."""
        base = build({})
        try:
            validate(base)
        except GatewayConfigError:
            raise error from None  # not a peer's fault: the zone's own config is rejected
        kept: dict[str, ServiceSnapshot] = {}
        rejected: set[str] = set()
        for peer, snapshot in served.items():
            try:
                validate(build({**kept, peer: snapshot}))
            except GatewayConfigError as err:
                log.error(
                    "zone %s: imports of peer %s left out, the data plane rejects them: %s", self._zone.name, peer, err
                )
                problems[peer] = f"left out: the data plane rejects them ({err})"
                rejected.add(peer)
            else:
                kept[peer] = snapshot
        return build(kept), rejected

    def _resolved(self, snapshots: dict[str, ServiceSnapshot], problems: dict[str, str]) -> dict[str, ServiceSnapshot]:
        """The snapshots with gateway addresses as the data plane dials them (DNS names resolved)."""
        resolved: dict[str, ServiceSnapshot] = {}
        for peer, snapshot in snapshots.items():
            addresses, failures = self._resolver.resolve(snapshot.gateway_addresses)
            if failures:
                problems.setdefault(peer, "; ".join(failures))
            if addresses != snapshot.gateway_addresses:
                snapshot = snapshot.model_copy(update={"gateway_addresses": addresses})
            resolved[peer] = snapshot
        return resolved

    def _config(
        self,
        view: ZoneView,
        exports: ConfigExports,
        trust_bundles: dict[str, str],
        imported: list[ImportedService],
        ports: EgressPorts,
        sticky: frozenset[tuple[str, str]],
    ) -> GatewayConfig:
        assert self._svid is not None

        def egress_address(listener: str) -> str:
            port = ports(listener) if self._egress_port_base else 0
            return str(HostPort(self._egress_host, port))

        return build_gateway_config(
            identity=Identity(
                cert_chain_pem=self._svid.cert_chain_pem().decode(),
                private_key_pem=self._svid.private_key_pem().decode(),
            ),
            trust_bundles=trust_bundles,
            trust_domain=self._zone.trust_domain,
            ingress_address=self.address,
            catalog=exports.catalog,
            exports=exports.index,
            peer_trust_domains=view.peer_trust_domains,
            imports=imported,
            egress_address=egress_address,
            failover=view.settings.failover,
            splits=view.settings.split,
            health_check=self._health_check,
            authz=exports.authz,
            egress=self._egress,
            proxy_protocol=exports.proxy_protocol,
            sticky=sticky,
            connect_address=self._egress_connect_address,
            per_import_listeners=self._per_import_listeners,
            fragments=self._fragments,
        )
