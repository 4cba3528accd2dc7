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

The package, by role: :mod:`~meshfed.zone.config` (``zone.toml``),
:mod:`~meshfed.zone.ca_files` (the CA files of each generation),
:mod:`~meshfed.zone.generations` (which CA signs; rotation phases),
:mod:`~meshfed.zone.trust_store` (bundles and federations in ``state.db``),
:mod:`~meshfed.zone.tokens` (the API tokens); :class:`Zone`, here, opens or
makes a zone directory and composes them. The zone's own trust jobs build on
it: :mod:`~meshfed.zone.trust_listing`, :mod:`~meshfed.zone.bundle_poller`,
:mod:`~meshfed.zone.rotation`.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric import ec

from meshfed.catalog.settings import CatalogMode, ConsulSettings, KubernetesSettings
from meshfed.errors import ZoneError
from meshfed.runstate import STATE_FILE as STATE_FILE  # re-exported: the zone directory's file names live here
from meshfed.store import CaGeneration, Federation, FederationProfile, StateStore, StoredBundle
from meshfed.trust.bundle import DEFAULT_REFRESH_HINT_SECONDS, TrustBundle
from meshfed.trust.ca import CertificateAuthority, Svid
from meshfed.trust.spiffe import SpiffeId, TrustDomain
from meshfed.zone.ca_files import (
    first_generation,
    load_root_key,
    offline_key_path,
    write_authority_files,
    write_new_file,
    write_private_file,
)
from meshfed.zone.config import (
    CONFIG_FILE,
    ZoneConfig,
    check_identity,
    config_document,
    hint_seconds,
    new_config,
    parse_refresh_hint,
    read_config,
)
from meshfed.zone.generations import CaGenerations, RotationStep
from meshfed.zone.tokens import (
    READ_TOKEN_FILE,
    TOKEN_FILE,
    ensure_read_token,
    load_admin_token,
    load_read_token,
    write_tokens,
)
from meshfed.zone.trust_store import RemovedTrust, TrustStore


class Zone:
    """An initialised zone directory. Open with :meth:`open`, create with :meth:`init`."""

    def __init__(self, directory: Path, config: ZoneConfig) -> None:
        self.directory = directory
        self.config = config
        self._generations = CaGenerations(directory, config.name, self.trust_domain, self.store)
        self._trust = TrustStore(config.name, self.trust_domain, self.store)

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
        config = new_config(name, trust_domain, catalog, consul, kubernetes)
        directory = directory.absolute()
        if (directory / CONFIG_FILE).exists():
            raise ZoneError(f"{directory} already holds a zone; refusing to overwrite it")
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise ZoneError(f"{directory} exists and is not an empty directory; choose a new path")
        if offline_root_key is not None:
            offline_root_key = offline_key_path(offline_root_key, directory)
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
        config = read_config(directory)
        check_identity(directory, config)
        ensure_read_token(directory, strict=False)
        return cls(directory, config)

    def store(self) -> StateStore:
        """The zone's state database; use as a context manager."""
        return StateStore(self.directory / STATE_FILE)

    def authority(self) -> CertificateAuthority:
        """The zone's signing CA: the active generation's root and intermediate."""
        return self._generations.authority()

    def issue_svid(
        self, spiffe_id: SpiffeId, ttl: dt.timedelta, dns_names: Sequence[str] = (), *, generation: int | None = None
    ) -> Svid:
        """Issue an X.509-SVID from this zone's active CA, remembering its TTL for the CA's retirement.

        ``generation`` names a retiring CA instead: during a rotation, peers that
        have not yet received the new root can verify only what the old one
        signed (see the peering service). Such an SVID never outlives the old
        root's retirement.
        """
        return self._generations.issue_svid(spiffe_id, ttl, dns_names, generation)

    def ca_generations(self) -> list[CaGeneration]:
        """The zone's CA generations and their phases (empty if the zone never rotated)."""
        return self._generations.all()

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
        return self._generations.rotate(overlap, now, root_key=root_key, offline_root_key=offline_root_key)

    def root_key_offline(self) -> bool:
        """True if the active CA's root key is not in the zone directory (``zone init --offline-root-key``)."""
        return self._generations.root_key_offline()

    def finish_rotation(self, now: dt.datetime | None = None) -> list[RotationStep]:
        """End the rotation in progress now: a published CA signs at once, and every older root leaves the bundle.

        For an emergency (an old key compromised): SVIDs the old CA signed stop
        verifying at once, and consumers that have not fetched the new root
        cannot verify this zone until they do.
        """
        return self._generations.finish(now or dt.datetime.now(dt.UTC))

    def abort_rotation(self, now: dt.datetime | None = None) -> list[RotationStep]:
        """Drop the CA a rotation published before it signs: its root leaves the bundle and its keys are deleted."""
        return self._generations.abort(now or dt.datetime.now(dt.UTC))

    def advance_rotation(self, now: dt.datetime | None = None) -> list[RotationStep]:
        """Move every due phase of a rotation on; idempotent, safe to call at any time from any process."""
        return self._generations.advance(now or dt.datetime.now(dt.UTC))

    def next_rotation_deadline(self) -> dt.datetime | None:
        """When :meth:`advance_rotation` next has something to do, if a rotation is in progress."""
        return self._generations.next_deadline()

    def own_bundle(self) -> TrustBundle:
        """The bundle this zone publishes for its own trust domain."""
        return self._trust.own_bundle()

    def refresh_hint(self, override: dt.timedelta | None = None) -> int:
        """The refresh hint (seconds) the zone's bundle should carry: ``override``, else zone.toml, else the default."""
        if override is not None:
            return hint_seconds(override)
        if self.config.bundle_refresh_hint is not None:
            return parse_refresh_hint(self.config.bundle_refresh_hint)
        return DEFAULT_REFRESH_HINT_SECONDS

    def set_refresh_hint(self, seconds: int) -> bool:
        """Publish ``seconds`` as the bundle's refresh hint (the sequence moves on); False if it already is."""
        return self._trust.set_refresh_hint(seconds)

    def trusted_bundles(self) -> list[StoredBundle]:
        """Every trust domain this zone trusts, its own included, one bundle each."""
        return self._trust.trusted_bundles()

    def import_bundle(self, bundle: TrustBundle, source: Literal["import", "peering"] = "import") -> None:
        """Trust ``bundle``'s roots for its trust domain, replacing that domain's earlier bundle.

        ``source`` says who brought it: an operator (``import``) or a peering,
        whose deletion takes the bundle away again (:meth:`forget_peering_bundle`).
        """
        self._trust.import_bundle(bundle, source)

    def forget_peering_bundle(self, trust_domain: TrustDomain) -> bool:
        """Stop trusting a trust domain learned from a peering; bundles an operator imported stay. True if gone."""
        return self._trust.forget_peering_bundle(trust_domain)

    def bundle_of(self, trust_domain: TrustDomain) -> TrustBundle | None:
        """The bundle held for ``trust_domain``, if any."""
        return self._trust.bundle_of(trust_domain)

    def store_federated_bundle(self, bundle: TrustBundle) -> bool:
        """Store a bundle fetched from a federated endpoint (the poller has already kept the newest).

        False, storing nothing, if the relationship ended meanwhile (``trust
        remove`` while the fetch ran): a removed domain must not come back.
        """
        return self._trust.store_federated_bundle(bundle)

    def remove_trust(self, trust_domain: TrustDomain, *, federation_only: bool = False) -> RemovedTrust:
        """Stop trusting ``trust_domain``: its bundle (imported or federated) and its federation go.

        ``federation_only`` ends just the federation (and the bundle it
        fetched; an imported bundle stays). Bundles a peering brought are
        refused here (:func:`meshfed.federation.trust_removal.remove_trust` also refuses
        a domain a live peering depends on), as is the zone's own.
        """
        return self._trust.remove_trust(trust_domain, federation_only=federation_only)

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
        return self._trust.federate(
            trust_domain,
            endpoint_url,
            profile,
            endpoint_spiffe_id=endpoint_spiffe_id,
            bootstrap_bundle=bootstrap_bundle,
            web_ca_pem=web_ca_pem,
        )

    def federations(self) -> list[Federation]:
        """Every federation relationship of this zone."""
        return self._trust.federations()

    def record_poll(self, trust_domain: TrustDomain, at: dt.datetime, error: str | None) -> None:
        """Note one poll's outcome for ``meshfed trust list``."""
        self._trust.record_poll(trust_domain, at, error)

    def admin_token(self) -> str:
        """The zone's admin token."""
        return load_admin_token(self.directory)

    def read_token(self) -> str:
        """The zone's read-only API token (``read-token``), made now if this zone predates it."""
        return load_read_token(self.directory)


def _populate(directory: Path, config: ZoneConfig, offline_root_key: Path | None = None) -> None:
    directory.chmod(0o700)
    (directory / "ca").mkdir(mode=0o700)
    authority = write_authority_files(directory / "ca", TrustDomain(config.trust_domain), 0, offline_root_key)
    write_tokens(directory)
    write_new_file(directory / CONFIG_FILE, config_document(config).encode(), 0o644)
    with StateStore(directory / STATE_FILE) as store:
        hint = parse_refresh_hint(config.bundle_refresh_hint) if config.bundle_refresh_hint else None
        bundle = TrustBundle(authority.trust_domain, (authority.root,))
        store.put_bundle(bundle if hint is None else replace(bundle, refresh_hint_seconds=hint), source="self")
        # Recorded from birth, so every SVID's TTL is known when this CA is rotated out.
        store.put_ca_generation(first_generation(authority, longest_svid_ttl=dt.timedelta(0)))
        store.record_identity(config.name, config.trust_domain)
    (directory / STATE_FILE).chmod(0o600)


__all__ = [
    "CONFIG_FILE",
    "READ_TOKEN_FILE",
    "STATE_FILE",
    "TOKEN_FILE",
    "RemovedTrust",
    "RotationStep",
    "Zone",
    "ZoneConfig",
    "load_root_key",
    "parse_refresh_hint",
    "write_private_file",
]
