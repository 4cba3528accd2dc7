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

A zone is composed of two owners of its trust, each documented in its
module: ``zone.authority`` (:class:`~meshfed.zone.authority.TrustAuthority`:
which CA generation signs, SVID issuance, rotation; recorded in ``state.db``'s
``ca_generations``, a zone that never rotated signs with ``ca/``) and
``zone.trust`` (:class:`~meshfed.zone.trust_store.TrustStore`: its own
bundle, other domains' bundles and federations, read from memory while
``state.db`` does not change).

``Zone.init`` builds the whole directory beside its target and renames it into
place, so a failed init leaves nothing behind and an existing zone is never
touched.

The package, by role: :mod:`~meshfed.zone.config` (``zone.toml``),
:mod:`~meshfed.zone.ca_files` (the CA files of each generation),
:mod:`~meshfed.zone.authority` (which CA signs; rotation phases),
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
from dataclasses import replace
from pathlib import Path

from meshfed.catalog.settings import CatalogMode, ConsulSettings, KubernetesSettings
from meshfed.errors import ZoneError
from meshfed.runstate import STATE_FILE as STATE_FILE  # re-exported: the zone directory's file names live here
from meshfed.store import StateStore
from meshfed.trust.bundle import TrustBundle
from meshfed.trust.spiffe import TrustDomain
from meshfed.zone.authority import RotationStep, TrustAuthority
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
    new_config,
    parse_refresh_hint,
    read_config,
)
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
        self.authority = TrustAuthority(directory, config.name, self.trust_domain, self.store)
        """Its CA generations: which signs, SVID issuance, rotation."""
        configured = parse_refresh_hint(config.bundle_refresh_hint) if config.bundle_refresh_hint else None
        self.trust = TrustStore(config.name, self.trust_domain, self.store, configured_refresh_hint=configured)
        """What it trusts: its own bundle, other domains' bundles, federations."""

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
