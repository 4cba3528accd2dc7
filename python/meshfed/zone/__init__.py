"""A zone directory: its config, CA, state database and admin token.

Layout (the directory is 0700; private keys and the tokens are 0600)::

    zone.toml              name, trust domain, listen addresses
    state.db               SQLite: trust bundles, peerings, exports, imports
    catalog.db             SQLite: the embedded catalog (zones with catalog = "embedded")
    zone.lock              held by the running ``meshfed up`` (its pid inside): one process per zone
    admin-token            bearer token for mutating API calls (and reads)
    read-token             bearer token for the API's reads only (made on first open for older zones)
    ca/root.pem            the trust domain's root (published in the bundle)
    ca/root.key            absent if the zone keeps its root key offline (``zone init --offline-root-key``)
    ca/intermediate.pem    signs SVIDs
    ca/intermediate.key
    ca/generations/<n>/    CAs made by ``meshfed trust rotate`` (same four files; root.key only if kept here)

Which generation signs is recorded in ``state.db`` (table ``ca_generations``);
a zone that never rotated has no rows there and signs with ``ca/``.

Rotation (``Zone.rotate`` then ``Zone.advance_rotation``, the latter called by
the CLI and by the controller's rotation service) moves through phases whose
deadlines are stored, so a restart resumes where it stopped::

    rotate      new root published in the bundle (sequence + 1); old CA still signs
    activate_at new CA signs; old root stays in the bundle (retiring)
    retire_at   old root leaves the bundle (sequence + 1); its keys are deleted

``Zone.finish_rotation`` does the remaining phases now (after a key
compromise: the old root stops being trusted at once); ``Zone.abort_rotation``
drops a new CA that does not sign yet. A zone whose root key is offline
rotates its intermediate under the same root (``rotate(root_key=...)``: the
bundle does not change), or to a new root whose key goes offline too.

``Zone.init`` builds the whole directory beside its target and renames it into
place, so a failed init leaves nothing behind and an existing zone is never
touched.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import shutil
import tempfile
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from meshfed.catalog.settings import CatalogMode, ConsulSettings, KubernetesSettings
from meshfed.errors import InvalidBundleError, RotationError, TrustError, ZoneError
from meshfed.policy.authz import RuleSpec
from meshfed.policy.egress import EgressPolicy
from meshfed.policy.failover import FailoverPolicy
from meshfed.policy.splits import SubsetSplit
from meshfed.runstate import STATE_FILE as STATE_FILE  # re-exported: the zone directory's file names live here
from meshfed.store import CaGeneration, Federation, FederationProfile, StateStore, StoredBundle
from meshfed.trust.bundle import DEFAULT_REFRESH_HINT_SECONDS, TrustBundle, fingerprint
from meshfed.trust.ca import (
    CertificateAuthority,
    Svid,
    certificates_to_pem,
    create_authority,
    create_intermediate,
    load_private_key_pem,
    private_key_to_pem,
)
from meshfed.trust.spiffe import SpiffeId, TrustDomain

CONFIG_FILE = "zone.toml"
TOKEN_FILE = "admin-token"  # noqa: S105 -- a file name, not a secret
READ_TOKEN_FILE = "read-token"  # noqa: S105 -- a file name, not a secret
_ZONE_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")

BundleSource = Literal["self", "import", "federation"]
_LEGACY_CA_DIRECTORY = "ca"
_GENERATIONS_DIRECTORY = "ca/generations"
# Zones whose SVIDs were issued before TTLs were recorded: assume the default SVID lifetime.
_ASSUMED_SVID_TTL = dt.timedelta(hours=24)
ROTATION_OVERLAP_REFRESH_HINTS = 3


@dataclass(frozen=True)
class RemovedTrust:
    """What :meth:`Zone.remove_trust` removed."""

    trust_domain: TrustDomain
    bundle: bool
    federation: bool


@dataclass(frozen=True)
class RotationStep:
    """One phase change made by :meth:`Zone.advance_rotation`, for logs and the CLI."""

    generation: int
    state: str
    message: str


class ZoneConfig(BaseModel):
    """The contents of ``zone.toml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    trust_domain: str
    catalog: CatalogMode = "embedded"
    gateway_address: str = "0.0.0.0:15443"
    # [failover]: the order (and any weighted split) in which failover groups try peers after local endpoints.
    failover: FailoverPolicy = FailoverPolicy()
    # [[split]]: exported services whose peers' traffic is divided among subsets by weight.
    split: list[SubsetSplit] = Field(default_factory=list)
    # [[authz]]: ordered allow/deny rules over caller SPIFFE IDs per exported service (federation/authz.py).
    authz: list[RuleSpec] = Field(default_factory=list)
    # [egress]: whether local workloads must present SVIDs to the egress listeners (policy/egress.py).
    egress: EgressPolicy = EgressPolicy()
    # The spiffe_refresh_hint of this zone's bundle, such as "5m" (meshfed up --bundle-refresh-hint overrides it).
    bundle_refresh_hint: str | None = None
    # Settings of the consul / kubernetes catalog sources ([consul], [kubernetes] in zone.toml).
    consul: ConsulSettings | None = None
    kubernetes: KubernetesSettings | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _ZONE_NAME.fullmatch(value):
            raise ValueError("a zone name is a DNS label: lowercase letters, digits and '-', at most 63 characters")
        return value

    @field_validator("trust_domain")
    @classmethod
    def _check_trust_domain(cls, value: str) -> str:
        try:
            return TrustDomain.parse(value).name
        except TrustError as err:
            raise ValueError(str(err)) from None

    @field_validator("bundle_refresh_hint")
    @classmethod
    def _check_refresh_hint(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_refresh_hint(value)
            except TrustError as err:
                raise ValueError(str(err)) from None
        return value


class Zone:
    """An initialised zone directory. Open with :meth:`open`, create with :meth:`init`."""

    def __init__(self, directory: Path, config: ZoneConfig) -> None:
        self.directory = directory
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def trust_domain(self) -> TrustDomain:
        return TrustDomain(self.config.trust_domain)

    @classmethod
    def init(
        cls,
        directory: Path,
        name: str,
        trust_domain: str,
        *,
        catalog: CatalogMode = "embedded",
        consul: ConsulSettings | None = None,
        kubernetes: KubernetesSettings | None = None,
        offline_root_key: Path | None = None,
    ) -> Zone:
        """Create a new zone in ``directory``, which must not exist or must be empty.

        ``offline_root_key`` is a new file (outside the zone) that gets the root's
        private key instead of ``ca/root.key``: the zone then signs with its
        intermediate alone, and only a rotation needs the root key again.
        """
        # zone.toml of a Consul or Kubernetes zone always says where that catalog is.
        if catalog == "consul" and consul is None:
            consul = ConsulSettings()
        if catalog == "kubernetes" and kubernetes is None:
            kubernetes = KubernetesSettings()
        try:
            config = ZoneConfig(
                name=name, trust_domain=trust_domain, catalog=catalog, consul=consul, kubernetes=kubernetes
            )
        except ValidationError as err:
            raise ZoneError(_first_validation_error(err)) from None
        directory = directory.absolute()
        if (directory / CONFIG_FILE).exists():
            raise ZoneError(f"{directory} already holds a zone; refusing to overwrite it")
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise ZoneError(f"{directory} exists and is not an empty directory; choose a new path")
        if offline_root_key is not None:
            offline_root_key = _offline_key_path(offline_root_key, directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.init-", dir=directory.parent))
        try:
            _populate(staging, config, offline_root_key)
            staging.rename(directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if offline_root_key is not None:
                offline_root_key.unlink(missing_ok=True)
            raise
        return cls(directory, config)

    @classmethod
    def open(cls, directory: Path) -> Zone:
        """Open an existing zone, with errors that say which file is wrong."""
        directory = directory.absolute()
        path = directory / CONFIG_FILE
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ZoneError(
                f"{directory} is not a zone directory (no {CONFIG_FILE}); run 'meshfed zone init'"
            ) from None
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ZoneError(f"cannot read {path}: {err}") from None
        try:
            config = ZoneConfig.model_validate(raw)
        except ValidationError as err:
            raise ZoneError(f"{path}: {_first_validation_error(err)}") from None
        _check_identity(directory, config)
        _ensure_read_token(directory, strict=False)
        return cls(directory, config)

    def store(self) -> StateStore:
        """The zone's state database; use as a context manager."""
        return StateStore(self.directory / STATE_FILE)

    def authority(self) -> CertificateAuthority:
        """The zone's signing CA: the active generation's root and intermediate."""
        return self._load_authority(self._active_generation_directory())

    def _active_generation_directory(self) -> str:
        with self.store() as store:
            generations = store.ca_generations()
        active = [generation for generation in generations if generation.state == "active"]
        return active[0].directory if active else _LEGACY_CA_DIRECTORY

    def _load_authority(self, directory: str) -> CertificateAuthority:
        ca = self.directory / directory
        try:
            root = x509.load_pem_x509_certificate((ca / "root.pem").read_bytes())
            intermediate = x509.load_pem_x509_certificate((ca / "intermediate.pem").read_bytes())
            key_pem = (ca / "intermediate.key").read_bytes()
        except (OSError, ValueError) as err:
            raise ZoneError(f"zone CA in {ca} is unreadable: {err}") from None
        key = load_private_key_pem(key_pem, str(ca / "intermediate.key"))
        return CertificateAuthority(self.trust_domain, root, intermediate, key)

    def issue_svid(
        self, spiffe_id: SpiffeId, ttl: dt.timedelta, dns_names: Sequence[str] = (), *, generation: int | None = None
    ) -> Svid:
        """Issue an X.509-SVID from this zone's active CA, remembering its TTL for the CA's retirement.

        ``generation`` names a retiring CA instead: during a rotation, peers that
        have not yet received the new root can verify only what the old one
        signed (see the peering service). Such an SVID never outlives the old
        root's retirement.
        """
        with self.store() as store:
            generations = store.ca_generations()
            active = next((g for g in generations if g.state == "active"), None)
            chosen = active
            if generation is not None and (active is None or generation != active.generation):
                chosen = next((g for g in generations if g.generation == generation and g.state == "retiring"), None)
                if chosen is None or chosen.retire_at is None:
                    raise RotationError(f"zone {self.name}: CA generation {generation} is not retiring; it cannot sign")
                ttl = min(ttl, chosen.retire_at - dt.datetime.now(dt.UTC))
                if ttl <= dt.timedelta(0):
                    raise RotationError(f"zone {self.name}: CA generation {generation} is retired; it cannot sign")
            authority = self._load_authority(chosen.directory if chosen else _LEGACY_CA_DIRECTORY)
            svid = authority.issue(spiffe_id, ttl, dns_names)
            if chosen is not None and chosen is active:
                store.record_svid_ttl(chosen.generation, int(ttl.total_seconds()) + 1)
        return svid

    def ca_generations(self) -> list[CaGeneration]:
        """The zone's CA generations and their phases (empty if the zone never rotated)."""
        with self.store() as store:
            return store.ca_generations()

    def rotate(
        self,
        overlap: dt.timedelta | None = None,
        now: dt.datetime | None = None,
        *,
        root_key: ec.EllipticCurvePrivateKey | None = None,
        offline_root_key: Path | None = None,
    ) -> CaGeneration:
        """Start a CA rotation: make a new CA and publish its root in the bundle now.

        By default the new CA is a new root and intermediate. The current CA
        keeps signing for ``overlap`` (default: 3x the bundle's refresh hint, so
        every consumer polling at the hint has had three chances to fetch the
        new root before anything it signs appears).

        ``root_key`` (the active root's private key, for a zone that keeps it
        offline) makes a new intermediate under the same root instead: the
        bundle does not change, so the overlap defaults to none.
        ``offline_root_key`` makes a new root whose key is written to that new
        file instead of the zone directory.
        """
        now = now or dt.datetime.now(dt.UTC)
        if overlap is not None and overlap < dt.timedelta(0):
            raise RotationError(f"the rotation overlap must not be negative, got {overlap}")
        if root_key is not None and offline_root_key is not None:
            raise RotationError(
                "--root-key makes a new intermediate under the current root, --offline-root-key a new root: give one"
            )
        own = self.own_bundle()
        with self.store() as store:
            generations = store.ca_generations() or [self._legacy_generation()]
            busy = [generation for generation in generations if generation.state in ("published", "retiring")]
            if busy:
                raise RotationError(
                    f"zone {self.name}: a rotation is in progress (generation {busy[0].generation} is "
                    f"{busy[0].state}); let it finish ('meshfed trust list --dir ...' shows when), or end it "
                    "now with 'meshfed trust rotate --finish' (or drop a CA not signing yet with --abort)"
                )
            active = next(generation for generation in generations if generation.state == "active")
            number = max(generation.generation for generation in generations) + 1
            directory = f"{_GENERATIONS_DIRECTORY}/{number}"
            if root_key is not None:
                current = self._load_authority(active.directory)
                # A zone that keeps its root key here keeps it beside the new intermediate too (the old
                # generation's copy goes when it retires).
                new = _write_intermediate(
                    self.directory / directory,
                    self.trust_domain,
                    current.root,
                    root_key,
                    number,
                    keep_root_key=not self.root_key_offline(),
                )
                overlap = overlap if overlap is not None else dt.timedelta(0)
            else:
                if offline_root_key is None and self.root_key_offline():
                    raise RotationError(
                        f"zone {self.name} keeps its root key offline: give it with --root-key FILE to make a new "
                        "intermediate under the current root, or rotate to a new root whose key goes to a new "
                        "file with --offline-root-key FILE"
                    )
                if offline_root_key is not None:
                    offline_root_key = _offline_key_path(offline_root_key, self.directory)
                new = _write_authority(self.directory / directory, self.trust_domain, number, offline_root_key)
                overlap = (
                    overlap
                    if overlap is not None
                    else own.refresh_hint_seconds * ROTATION_OVERLAP_REFRESH_HINTS * _SECOND
                )
            generation = CaGeneration(
                number, directory, fingerprint(new.root), "published", now, activate_at=now + overlap
            )
            with store.atomic():
                for existing in generations:
                    store.put_ca_generation(existing)
                store.put_ca_generation(generation)
                store.put_bundle(own.with_roots([new.root]), source="self")
        return generation

    def root_key_offline(self) -> bool:
        """True if the active CA's root key is not in the zone directory (``zone init --offline-root-key``)."""
        return not (self.directory / self._active_generation_directory() / "root.key").exists()

    def finish_rotation(self, now: dt.datetime | None = None) -> list[RotationStep]:
        """End the rotation in progress now: a published CA signs at once, and every older root leaves the bundle.

        For an emergency (an old key compromised): SVIDs the old CA signed stop
        verifying at once, and consumers that have not fetched the new root
        cannot verify this zone until they do.
        """
        now = now or dt.datetime.now(dt.UTC)
        steps: list[RotationStep] = []
        with self.store() as store, store.atomic():
            generations = store.ca_generations()
            if not any(g.state in ("published", "retiring") for g in generations):
                raise RotationError(f"zone {self.name}: no rotation is in progress; nothing to finish")
            own = _own_bundle(store, self)
            published = next((g for g in generations if g.state == "published"), None)
            for old in generations:
                retire = old.state == "retiring" or (published is not None and old.state == "active")
                if retire:
                    store.put_ca_generation(replace(old, state="retired", retire_at=now))
                    own = _without_root(own, old, generations)
                    steps.append(
                        RotationStep(
                            old.generation,
                            "retired",
                            f"root {old.root_fingerprint[:16]} retired early: it stops signing and verifying now "
                            f"(bundle sequence {own.sequence})",
                        )
                    )
            if published is not None:
                store.put_ca_generation(replace(published, state="active", activate_at=now))
                steps.append(
                    RotationStep(published.generation, "active", f"root {published.root_fingerprint[:16]} now signs")
                )
            store.put_bundle(own, source="self")
        self._delete_retired_keys()
        return steps

    def abort_rotation(self, now: dt.datetime | None = None) -> list[RotationStep]:
        """Drop the CA a rotation published before it signs: its root leaves the bundle and its keys are deleted."""
        now = now or dt.datetime.now(dt.UTC)
        steps: list[RotationStep] = []
        with self.store() as store, store.atomic():
            generations = store.ca_generations()
            published = next((g for g in generations if g.state == "published"), None)
            if published is None:
                retiring = next((g for g in generations if g.state == "retiring"), None)
                if retiring is not None:
                    active = next(g for g in generations if g.state == "active")
                    raise RotationError(
                        f"zone {self.name}: CA generation {active.generation} already signs, so the rotation can no "
                        "longer be aborted; let it finish, or end it now with 'meshfed trust rotate --finish'"
                    )
                raise RotationError(f"zone {self.name}: no rotation is in progress; nothing to abort")
            own = _without_root(_own_bundle(store, self), published, generations)
            store.put_ca_generation(replace(published, state="retired", retire_at=now))
            store.put_bundle(own, source="self")
            steps.append(
                RotationStep(
                    published.generation,
                    "retired",
                    f"aborted: root {published.root_fingerprint[:16]} never signed; removed from the bundle "
                    f"(sequence {own.sequence}) and its keys deleted",
                )
            )
        self._delete_retired_keys()
        return steps

    def _delete_retired_keys(self) -> None:
        for old in self.ca_generations():
            if old.state == "retired":
                _delete_keys(self.directory / old.directory)

    def advance_rotation(self, now: dt.datetime | None = None) -> list[RotationStep]:
        """Move every due phase of a rotation on; idempotent, safe to call at any time from any process."""
        now = now or dt.datetime.now(dt.UTC)
        steps: list[RotationStep] = []
        with self.store() as store, store.atomic():
            generations = store.ca_generations()
            own = _own_bundle(store, self)
            for new in generations:
                if new.state != "published" or new.activate_at is None or new.activate_at > now:
                    continue
                for old in generations:
                    if old.state == "active":
                        lifetime = (old.longest_svid_ttl_seconds or 0) * _SECOND
                        store.put_ca_generation(replace(old, state="retiring", retire_at=now + lifetime))
                        steps.append(
                            RotationStep(
                                old.generation,
                                "retiring",
                                f"root {old.root_fingerprint[:16]} "
                                f"stops signing; stays trusted until {now + lifetime:%Y-%m-%d %H:%M:%S}Z",
                            )
                        )
                store.put_ca_generation(replace(new, state="active"))
                steps.append(RotationStep(new.generation, "active", f"root {new.root_fingerprint[:16]} now signs"))
            for old in store.ca_generations():
                if old.state == "retiring" and old.retire_at is not None and old.retire_at <= now:
                    store.put_ca_generation(replace(old, state="retired"))
                    own = _without_root(own, old, store.ca_generations())
                    steps.append(
                        RotationStep(
                            old.generation,
                            "retired",
                            f"root {old.root_fingerprint[:16]} removed from the bundle (sequence {own.sequence})",
                        )
                    )
            if steps:
                store.put_bundle(own, source="self")
        self._delete_retired_keys()
        return steps

    def next_rotation_deadline(self) -> dt.datetime | None:
        """When :meth:`advance_rotation` next has something to do, if a rotation is in progress."""
        deadlines = [
            generation.activate_at if generation.state == "published" else generation.retire_at
            for generation in self.ca_generations()
            if generation.state in ("published", "retiring")
        ]
        return min((deadline for deadline in deadlines if deadline is not None), default=None)

    def _legacy_generation(self) -> CaGeneration:
        # A zone made before rotation existed: its SVIDs' TTLs were never recorded, so
        # assume the default lifetime as a floor for how long its root must stay trusted.
        authority = self._load_authority(_LEGACY_CA_DIRECTORY)
        return _first_generation(authority, longest_svid_ttl=_ASSUMED_SVID_TTL)

    def own_bundle(self) -> TrustBundle:
        """The bundle this zone publishes for its own trust domain."""
        with self.store() as store:
            stored = store.bundle(self.trust_domain)
        if stored is None:
            raise ZoneError(f"zone {self.name} has no bundle of its own in {STATE_FILE}; the zone is damaged")
        return stored.bundle

    def refresh_hint(self, override: dt.timedelta | None = None) -> int:
        """The refresh hint (seconds) the zone's bundle should carry: ``override``, else zone.toml, else the default."""
        if override is not None:
            return _hint_seconds(override)
        if self.config.bundle_refresh_hint is not None:
            return parse_refresh_hint(self.config.bundle_refresh_hint)
        return DEFAULT_REFRESH_HINT_SECONDS

    def set_refresh_hint(self, seconds: int) -> bool:
        """Publish ``seconds`` as the bundle's refresh hint (the sequence moves on); False if it already is."""
        with self.store() as store, store.atomic():
            own = _own_bundle(store, self)
            if own.refresh_hint_seconds == seconds:
                return False
            # A new hint is new content: consumers that compare sequences must take it.
            store.put_bundle(replace(own, refresh_hint_seconds=seconds, sequence=own.sequence + 1), source="self")
        return True

    def trusted_bundles(self) -> list[StoredBundle]:
        """Every trust domain this zone trusts, its own included, one bundle each."""
        with self.store() as store:
            return store.bundles()

    def import_bundle(self, bundle: TrustBundle, source: Literal["import", "peering"] = "import") -> None:
        """Trust ``bundle``'s roots for its trust domain, replacing that domain's earlier bundle.

        ``source`` says who brought it: an operator (``import``) or a peering,
        whose deletion takes the bundle away again (:meth:`forget_peering_bundle`).
        """
        if bundle.trust_domain == self.trust_domain:
            raise InvalidBundleError(
                f"{bundle.trust_domain} is this zone's own trust domain; import bundles of other zones only"
            )
        with self.store() as store:
            store.put_bundle(bundle, source=source)

    def forget_peering_bundle(self, trust_domain: TrustDomain) -> bool:
        """Stop trusting a trust domain learned from a peering; bundles an operator imported stay. True if gone."""
        with self.store() as store:
            return store.delete_bundle(trust_domain, source="peering")

    def bundle_of(self, trust_domain: TrustDomain) -> TrustBundle | None:
        """The bundle held for ``trust_domain``, if any."""
        with self.store() as store:
            stored = store.bundle(trust_domain)
        return None if stored is None else stored.bundle

    def store_federated_bundle(self, bundle: TrustBundle) -> bool:
        """Store a bundle fetched from a federated endpoint (the poller has already kept the newest).

        False, storing nothing, if the relationship ended meanwhile (``trust
        remove`` while the fetch ran): a removed domain must not come back.
        """
        if bundle.trust_domain == self.trust_domain:
            raise InvalidBundleError(f"{bundle.trust_domain} is this zone's own trust domain; it cannot be federated")
        with self.store() as store, store.atomic():
            if store.federation(bundle.trust_domain) is None:
                return False
            store.put_bundle(bundle, source="federation")
        return True

    def remove_trust(self, trust_domain: TrustDomain, *, federation_only: bool = False) -> RemovedTrust:
        """Stop trusting ``trust_domain``: its bundle (imported or federated) and its federation go.

        ``federation_only`` ends just the federation (and the bundle it
        fetched; an imported bundle stays). Bundles a peering brought are
        refused here (:func:`meshfed.federation.trust_removal.remove_trust` also refuses
        a domain a live peering depends on), as is the zone's own.
        """
        if trust_domain == self.trust_domain:
            raise TrustError(
                f"{trust_domain} is this zone's own trust domain; it cannot be removed (rotate its CA instead: "
                "meshfed trust rotate)"
            )
        with self.store() as store, store.atomic():
            stored = store.bundle(trust_domain)
            if stored is not None and stored.source == "peering":
                raise TrustError(
                    f"{trust_domain} is trusted through a peering; delete the peering (meshfed peer delete) to "
                    "stop trusting it"
                )
            federation = store.delete_federation(trust_domain)
            removable = ("federation",) if federation_only else ("federation", "import")
            bundle = False
            if stored is not None and stored.source in removable:
                bundle = store.delete_bundle(trust_domain, stored.source)
        return RemovedTrust(trust_domain, bundle=bundle, federation=federation)

    def federate(
        self,
        trust_domain: TrustDomain,
        endpoint_url: str,
        profile: FederationProfile,
        *,
        endpoint_spiffe_id: SpiffeId | None = None,
        bootstrap_bundle: TrustBundle | None = None,
        web_ca_pem: str | None = None,
    ) -> Federation:
        """Record a federation relationship (replacing an earlier one with the same trust domain)."""
        if trust_domain == self.trust_domain:
            raise TrustError(f"{trust_domain} is this zone's own trust domain; federate with other zones only")
        if not endpoint_url.startswith("https://"):
            raise TrustError(f"bundle endpoint {endpoint_url!r} must be an https:// URL (SPIFFE bundle spec §5)")
        if profile == "https_spiffe":
            if endpoint_spiffe_id is None:
                raise TrustError("the https_spiffe profile needs --endpoint-spiffe-id, the ID the endpoint presents")
            if bootstrap_bundle is None and self.bundle_of(endpoint_spiffe_id.trust_domain) is None:
                raise TrustError(
                    f"the https_spiffe profile needs a bootstrap bundle of {endpoint_spiffe_id.trust_domain} "
                    "(--bootstrap-bundle) to authenticate the endpoint the first time"
                )
        if bootstrap_bundle is not None and bootstrap_bundle.trust_domain != trust_domain:
            raise TrustError(f"the bootstrap bundle is for {bootstrap_bundle.trust_domain}, not {trust_domain}")
        federation = Federation(
            trust_domain,
            endpoint_url,
            profile,
            str(endpoint_spiffe_id) if endpoint_spiffe_id else None,
            web_ca_pem,
            dt.datetime.now(dt.UTC),
        )
        with self.store() as store, store.atomic():
            store.put_federation(federation)
            if bootstrap_bundle is not None:
                store.put_bundle(bootstrap_bundle, source="federation")
        return federation

    def federations(self) -> list[Federation]:
        """Every federation relationship of this zone."""
        with self.store() as store:
            return store.federations()

    def record_poll(self, trust_domain: TrustDomain, at: dt.datetime, error: str | None) -> None:
        """Note one poll's outcome for ``meshfed trust list``."""
        with self.store() as store:
            store.record_poll(trust_domain, at, error)

    def admin_token(self) -> str:
        """The zone's admin token."""
        try:
            return (self.directory / TOKEN_FILE).read_text().strip()
        except OSError as err:
            raise ZoneError(f"cannot read the admin token: {err}") from None

    def read_token(self) -> str:
        """The zone's read-only API token (``read-token``), made now if this zone predates it."""
        _ensure_read_token(self.directory, strict=True)
        try:
            return (self.directory / READ_TOKEN_FILE).read_text().strip()
        except OSError as err:
            raise ZoneError(f"cannot read the read token: {err}") from None


def _ensure_read_token(directory: Path, *, strict: bool) -> None:
    """Give a zone made before read tokens existed its ``read-token`` (0600), once, race-free.

    The token is written whole to a temporary file and linked into place, so a
    concurrent reader sees either no file or the whole token, and of two
    processes racing, one wins and both read its token. ``strict=False`` (on
    open) leaves a read-only zone directory alone; :meth:`Zone.read_token` then
    says why it has no token.
    """
    path = directory / READ_TOKEN_FILE
    if path.exists():
        return
    try:
        fd, temporary = tempfile.mkstemp(prefix=".read-token-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write((secrets.token_urlsafe(32) + "\n").encode())
                # Root running a command in a zone it does not own: the zone's owner must still read it.
                owner = directory.stat()
                if os.geteuid() == 0 and owner.st_uid != 0:
                    os.fchown(file.fileno(), owner.st_uid, owner.st_gid)
            os.link(temporary, path)
        except FileExistsError:
            pass
        finally:
            Path(temporary).unlink()
    except OSError as err:
        if strict:
            raise ZoneError(
                f"cannot create {path}: {err.strerror or err}; run a meshfed command as the zone's owner once"
            ) from None


_SECOND = dt.timedelta(seconds=1)


def _own_bundle(store: StateStore, zone: Zone) -> TrustBundle:
    stored = store.bundle(zone.trust_domain)
    if stored is None:
        raise ZoneError(f"zone {zone.name} has no bundle of its own in {STATE_FILE}; the zone is damaged")
    return stored.bundle


def _write_authority(
    directory: Path, trust_domain: TrustDomain, generation: int, offline_root_key: Path | None = None
) -> CertificateAuthority:
    """Create a root + intermediate in ``directory`` (replacing a half-made one left by a crash)."""
    try:
        return _staged(
            directory, lambda staging: _write_authority_files(staging, trust_domain, generation, offline_root_key)
        )
    except BaseException:
        if offline_root_key is not None:
            offline_root_key.unlink(missing_ok=True)  # made just now (_offline_key_path refuses existing files)
        raise


def _write_intermediate(
    directory: Path,
    trust_domain: TrustDomain,
    root: x509.Certificate,
    root_key: ec.EllipticCurvePrivateKey,
    generation: int,
    *,
    keep_root_key: bool,
) -> CertificateAuthority:
    """Create a new intermediate under ``root`` in ``directory``; the root key is written beside it only if
    ``keep_root_key`` (else it stays where it was: offline)."""

    def write(ca: Path) -> CertificateAuthority:
        ca.chmod(0o700)
        authority = create_intermediate(trust_domain, root, root_key, generation)
        if keep_root_key:
            _write(ca / "root.key", private_key_to_pem(root_key), 0o600)
        _write_ca_files(ca, authority)
        return authority

    return _staged(directory, write)


def _staged(directory: Path, write: Callable[[Path], CertificateAuthority]) -> CertificateAuthority:
    if directory.exists():
        # Only an unrecorded generation can be here: its row is written after its files.
        shutil.rmtree(directory)
    directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        authority = write(staging)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return authority


def _write_authority_files(
    ca: Path, trust_domain: TrustDomain, generation: int = 0, offline_root_key: Path | None = None
) -> CertificateAuthority:
    ca.chmod(0o700)
    new = create_authority(trust_domain, generation)
    # The offline key is written first and with O_EXCL: a file that exists is never overwritten.
    _write(offline_root_key or ca / "root.key", private_key_to_pem(new.root_key), 0o600)
    _write_ca_files(ca, new.authority)
    return new.authority


def _write_ca_files(ca: Path, authority: CertificateAuthority) -> None:
    _write(ca / "root.pem", certificates_to_pem([authority.root])[0], 0o644)
    _write(ca / "intermediate.pem", certificates_to_pem([authority.intermediate])[0], 0o644)
    _write(ca / "intermediate.key", private_key_to_pem(authority.intermediate_key), 0o600)


def _offline_key_path(path: Path, zone_directory: Path) -> Path:
    """Where an offline root key may go: a new file outside the zone directory, in a directory that exists."""
    path = path.absolute()
    if path.is_relative_to(zone_directory.absolute()):
        raise ZoneError(f"--offline-root-key {path}: keep the root key outside the zone directory (that is the point)")
    if path.exists():
        raise ZoneError(f"--offline-root-key {path}: the file exists; give a new file (a key is never overwritten)")
    if not path.parent.is_dir():
        raise ZoneError(f"--offline-root-key {path}: {path.parent} is not a directory")
    return path


def load_root_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read a root key kept offline (``--root-key FILE``)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ZoneError(f"--root-key {path}: cannot read it: {err.strerror or err}") from None
    return load_private_key_pem(data, f"--root-key {path}")


def _without_root(own: TrustBundle, leaving: CaGeneration, generations: Sequence[CaGeneration]) -> TrustBundle:
    """``own`` without ``leaving``'s root, unless another generation still in use shares it (an intermediate
    rotation keeps the root)."""
    shared = any(
        g.generation != leaving.generation
        and g.root_fingerprint == leaving.root_fingerprint
        and g.state in ("published", "active", "retiring")
        for g in generations
    )
    return own if shared else own.without_roots([leaving.root_fingerprint])


def _hint_seconds(hint: dt.timedelta) -> int:
    seconds = int(hint.total_seconds())
    if not MIN_REFRESH_HINT <= hint <= MAX_REFRESH_HINT or seconds != hint.total_seconds():
        raise TrustError(
            f"a bundle refresh hint of {hint} is out of range; give whole seconds from "
            f"{int(MIN_REFRESH_HINT.total_seconds())}s to {MAX_REFRESH_HINT.days}d"
        )
    return seconds


def parse_refresh_hint(text: str, what: str = "bundle_refresh_hint") -> int:
    """``90s``, ``5m``, ``1h``, ``1d`` or a sum like ``1h30m`` as whole seconds, within the hint's range."""
    parts = _DURATION.findall(text)
    if not text or "".join(number + unit for number, unit in parts) != text:
        raise TrustError(f"{what} {text!r} is not a duration; use forms like 90s, 5m, 1h, 1d")
    try:
        return _hint_seconds(dt.timedelta(seconds=sum(int(number) * _UNITS[unit] for number, unit in parts)))
    except TrustError as err:
        raise TrustError(f"{what} {text!r}: {err}") from None


_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Below a second consumers would poll in a loop; over a week a rotation's overlap (3 hints) gets absurd.
MIN_REFRESH_HINT = dt.timedelta(seconds=1)
MAX_REFRESH_HINT = dt.timedelta(days=7)


def _first_generation(authority: CertificateAuthority, longest_svid_ttl: dt.timedelta) -> CaGeneration:
    return CaGeneration(
        0,
        _LEGACY_CA_DIRECTORY,
        fingerprint(authority.root),
        "active",
        authority.root.not_valid_before_utc,
        longest_svid_ttl_seconds=int(longest_svid_ttl.total_seconds()),
    )


def _check_identity(directory: Path, config: ZoneConfig) -> None:
    """zone.toml's ``name`` and ``trust_domain`` must be the zone's own: its CA, SVIDs and peerings are theirs.

    A renamed zone would present SVIDs its peers pin under the old name, and a
    new trust domain has no CA at all; refuse at open, in one line, rather than
    fail later in every gateway config and peering stream.
    """
    path = directory / CONFIG_FILE
    with StateStore(directory / STATE_FILE) as store:
        recorded = store.identity()
        if recorded is None:  # a zone made before identities were recorded: its own bundle says its domain
            own = {stored.bundle.trust_domain.name for stored in store.bundles() if stored.source == "self"}
            if len(own) != 1:
                return  # not a zone this version can vouch for; the CA checks say what is wrong
            recorded = (config.name, own.pop())
            if recorded[1] == config.trust_domain:
                store.record_identity(*recorded)
    name, trust_domain = recorded
    if config.trust_domain != trust_domain:
        raise ZoneError(
            f"{path}: trust_domain is {config.trust_domain!r}, but this zone's CA, SVIDs and peerings are "
            f"{trust_domain!r}; a zone cannot change its trust domain: put {trust_domain!r} back, or make a new "
            "zone with 'meshfed zone init' (and peer it anew)"
        )
    if config.name != name:
        raise ZoneError(
            f"{path}: name is {config.name!r}, but this zone was created as {name!r} and its peers know it by "
            f"that name; a zone cannot be renamed: put {name!r} back, or make a new zone with 'meshfed zone init'"
        )


def _delete_keys(ca: Path) -> None:
    # A retired CA verifies nothing and must sign nothing: its private keys go.
    for name in ("root.key", "intermediate.key"):
        (ca / name).unlink(missing_ok=True)


def _populate(directory: Path, config: ZoneConfig, offline_root_key: Path | None = None) -> None:
    directory.chmod(0o700)
    (directory / "ca").mkdir(mode=0o700)
    authority = _write_authority_files(directory / "ca", TrustDomain(config.trust_domain), 0, offline_root_key)
    _write(directory / TOKEN_FILE, (secrets.token_urlsafe(32) + "\n").encode(), 0o600)
    _write(directory / READ_TOKEN_FILE, (secrets.token_urlsafe(32) + "\n").encode(), 0o600)
    _write(directory / CONFIG_FILE, _config_document(config).encode(), 0o644)
    with StateStore(directory / STATE_FILE) as store:
        hint = parse_refresh_hint(config.bundle_refresh_hint) if config.bundle_refresh_hint else None
        bundle = TrustBundle(authority.trust_domain, (authority.root,))
        store.put_bundle(bundle if hint is None else replace(bundle, refresh_hint_seconds=hint), source="self")
        # Recorded from birth, so every SVID's TTL is known when this CA is rotated out.
        store.put_ca_generation(_first_generation(authority, longest_svid_ttl=dt.timedelta(0)))
        store.record_identity(config.name, config.trust_domain)
    (directory / STATE_FILE).chmod(0o600)


# Appended to the zone.toml that `zone init` writes: the optional tables, ready to uncomment.
_OPTIONAL_TABLES = """
# Optional tables: uncomment to use. `meshfed up` reads this file at start; a running zone also
# applies changes to [failover], [[split]] and [[authz]]. Top-level keys go above the first table.
#
# [failover]                        # the order in which failover groups try peers after local endpoints
# order = ["east", "north"]
# split = {east = 90, north = 10}   # or: peers sharing one tier by weight
#
# [[split]]                         # divide peers' traffic to an exported service among its subsets
# service = "web"
# label = "version"
# weights = {v1 = 90, v2 = 10}
#
# [[authz]]                         # who may call an exported service; the first matching rule decides
# service = "web"
# action = "allow"
# id = "spiffe://west.mesh/ns/shop/*"
#
# [egress]                          # what local workloads must present to the egress listeners
# workload_tls = "strict"           # plain (default), permissive or strict
"""


def _config_document(config: ZoneConfig) -> str:
    """What ``zone init`` writes to ``zone.toml``: the settings that differ from a default, then examples.

    A table or list at its default is left out rather than written empty: ``[failover]`` or
    ``authz = []`` in the file would make an operator's own ``[failover]`` or ``[[authz]]`` a
    TOML error. The zone's name, trust domain, catalog and gateway address are always written.
    """
    document = config.model_dump(exclude_none=True, by_alias=True)
    defaults = ZoneConfig.model_construct().model_dump(exclude_none=True, by_alias=True)
    always = {"name", "trust_domain", "catalog", "gateway_address"}
    kept = {key: value for key, value in document.items() if key in always or value != defaults.get(key)}
    return tomli_w.dumps(kept) + _OPTIONAL_TABLES


def _write(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL + the final mode at creation: a key is never world-readable, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new or replaced file that only the owner can read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def _first_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "config"
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{field}: {message}"


__all__ = [
    "RemovedTrust",
    "RotationStep",
    "Zone",
    "ZoneConfig",
    "load_root_key",
    "parse_refresh_hint",
    "write_private_file",
]
