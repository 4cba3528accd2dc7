"""A zone directory: its config, CA, state database and admin token.

Layout (the directory is 0700; private keys and the tokens are 0600)::

    zone.toml              name, trust domain, listen addresses
    state.db               SQLite: trust bundles, peerings, exports, imports
    catalog.db             SQLite: the embedded catalog (zones with catalog = "embedded")
    zone.lock              held by the running ``meshfed up`` (its pid inside): one process per zone
    admin-token            bearer token for mutating API calls (and reads)
    read-token             bearer token for the API's reads only (made on first open for older zones)
    ca/root.pem            the trust domain's root (published in the bundle)
    ca/root.key
    ca/intermediate.pem    signs SVIDs
    ca/intermediate.key
    ca/generations/<n>/    roots made by ``meshfed trust rotate`` (same four files)

Which generation signs is recorded in ``state.db`` (table ``ca_generations``);
a zone that never rotated has no rows there and signs with ``ca/``.

Rotation (``Zone.rotate`` then ``Zone.advance_rotation``, the latter called by
the CLI and by the controller's rotation service) moves through phases whose
deadlines are stored, so a restart resumes where it stopped::

    rotate      new root published in the bundle (sequence + 1); old CA still signs
    activate_at new CA signs; old root stays in the bundle (retiring)
    retire_at   old root leaves the bundle (sequence + 1); its keys are deleted

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
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import tomli_w
from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from meshfed.catalog.settings import CatalogMode, ConsulSettings, KubernetesSettings
from meshfed.errors import InvalidBundleError, RotationError, TrustError, ZoneError
from meshfed.federation.authz import RuleSpec
from meshfed.federation.egress import EgressPolicy
from meshfed.federation.failover import FailoverPolicy
from meshfed.federation.splits import SubsetSplit
from meshfed.store import CaGeneration, Federation, FederationProfile, StateStore, StoredBundle
from meshfed.trust.bundle import TrustBundle, fingerprint
from meshfed.trust.ca import (
    CertificateAuthority,
    Svid,
    certificates_to_pem,
    create_authority,
    load_private_key_pem,
    private_key_to_pem,
)
from meshfed.trust.spiffe import SpiffeId, TrustDomain

CONFIG_FILE = "zone.toml"
STATE_FILE = "state.db"
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
    # [egress]: whether local workloads must present SVIDs to the egress listeners (federation/egress.py).
    egress: EgressPolicy = EgressPolicy()
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
    ) -> Zone:
        """Create a new zone in ``directory``, which must not exist or must be empty."""
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
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.init-", dir=directory.parent))
        try:
            _populate(staging, config)
            staging.rename(directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
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

    def rotate(self, overlap: dt.timedelta | None = None, now: dt.datetime | None = None) -> CaGeneration:
        """Start a CA rotation: make a new root and intermediate and publish the root in the bundle now.

        The current CA keeps signing for ``overlap`` (default: 3x the bundle's
        refresh hint, so every consumer polling at the hint has had three
        chances to fetch the new root before anything it signs appears).
        """
        now = now or dt.datetime.now(dt.UTC)
        if overlap is not None and overlap < dt.timedelta(0):
            raise RotationError(f"the rotation overlap must not be negative, got {overlap}")
        own = self.own_bundle()
        overlap = (
            overlap if overlap is not None else own.refresh_hint_seconds * ROTATION_OVERLAP_REFRESH_HINTS * _SECOND
        )
        with self.store() as store:
            generations = store.ca_generations() or [self._legacy_generation()]
            busy = [generation for generation in generations if generation.state in ("published", "retiring")]
            if busy:
                raise RotationError(
                    f"zone {self.name}: a rotation is in progress (generation {busy[0].generation} is "
                    f"{busy[0].state}); let it finish ('meshfed trust list --dir ...' shows when)"
                )
            number = max(generation.generation for generation in generations) + 1
            directory = f"{_GENERATIONS_DIRECTORY}/{number}"
            new = _write_authority(self.directory / directory, self.trust_domain, number)
            generation = CaGeneration(
                number, directory, fingerprint(new.root), "published", now, activate_at=now + overlap
            )
            with store.atomic():
                for existing in generations:
                    store.put_ca_generation(existing)
                store.put_ca_generation(generation)
                store.put_bundle(own.with_roots([new.root]), source="self")
        return generation

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
                    own = own.without_roots([old.root_fingerprint])
                    steps.append(
                        RotationStep(
                            old.generation,
                            "retired",
                            f"root {old.root_fingerprint[:16]} removed from the bundle (sequence {own.sequence})",
                        )
                    )
            if steps:
                store.put_bundle(own, source="self")
        for old in self.ca_generations():
            if old.state == "retired":
                _delete_keys(self.directory / old.directory)
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

    def store_federated_bundle(self, bundle: TrustBundle) -> None:
        """Store a bundle fetched from a federated endpoint (the poller has already kept the newest)."""
        if bundle.trust_domain == self.trust_domain:
            raise InvalidBundleError(f"{bundle.trust_domain} is this zone's own trust domain; it cannot be federated")
        with self.store() as store:
            store.put_bundle(bundle, source="federation")

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


def _write_authority(directory: Path, trust_domain: TrustDomain, generation: int) -> CertificateAuthority:
    """Create a root + intermediate in ``directory`` (replacing a half-made one left by a crash)."""
    if directory.exists():
        # Only an unrecorded generation can be here: its row is written after its files.
        shutil.rmtree(directory)
    directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        authority = _write_authority_files(staging, trust_domain, generation)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return authority


def _write_authority_files(ca: Path, trust_domain: TrustDomain, generation: int = 0) -> CertificateAuthority:
    ca.chmod(0o700)
    new = create_authority(trust_domain, generation)
    authority = new.authority
    _write(ca / "root.pem", certificates_to_pem([authority.root])[0], 0o644)
    _write(ca / "root.key", private_key_to_pem(new.root_key), 0o600)
    _write(ca / "intermediate.pem", certificates_to_pem([authority.intermediate])[0], 0o644)
    _write(ca / "intermediate.key", private_key_to_pem(authority.intermediate_key), 0o600)
    return authority


def _first_generation(authority: CertificateAuthority, longest_svid_ttl: dt.timedelta) -> CaGeneration:
    return CaGeneration(
        0,
        _LEGACY_CA_DIRECTORY,
        fingerprint(authority.root),
        "active",
        authority.root.not_valid_before_utc,
        longest_svid_ttl_seconds=int(longest_svid_ttl.total_seconds()),
    )


def _delete_keys(ca: Path) -> None:
    # A retired CA verifies nothing and must sign nothing: its private keys go.
    for name in ("root.key", "intermediate.key"):
        (ca / name).unlink(missing_ok=True)


def _populate(directory: Path, config: ZoneConfig) -> None:
    directory.chmod(0o700)
    (directory / "ca").mkdir(mode=0o700)
    authority = _write_authority_files(directory / "ca", TrustDomain(config.trust_domain))
    _write(directory / TOKEN_FILE, (secrets.token_urlsafe(32) + "\n").encode(), 0o600)
    _write(directory / READ_TOKEN_FILE, (secrets.token_urlsafe(32) + "\n").encode(), 0o600)
    _write(directory / CONFIG_FILE, tomli_w.dumps(_config_document(config)).encode(), 0o644)
    with StateStore(directory / STATE_FILE) as store:
        store.put_bundle(TrustBundle(authority.trust_domain, (authority.root,)), source="self")
        # Recorded from birth, so every SVID's TTL is known when this CA is rotated out.
        store.put_ca_generation(_first_generation(authority, longest_svid_ttl=dt.timedelta(0)))
    (directory / STATE_FILE).chmod(0o600)


def _config_document(config: ZoneConfig) -> dict[str, object]:
    """What ``zone init`` writes to ``zone.toml``: the settings, without empty lists and default tables.

    An empty list would be written as ``authz = []``, after which an operator's ``[[authz]]`` table
    is a TOML error; an omitted key is the same default and leaves room to add one.
    """
    document = config.model_dump(exclude_none=True, by_alias=True)
    defaults = ZoneConfig.model_construct().model_dump(exclude_none=True, by_alias=True)
    return {
        key: value
        for key, value in document.items()
        if value != [] and not (key == "egress" and value == defaults.get("egress"))
    }


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


__all__ = ["RotationStep", "Zone", "ZoneConfig", "write_private_file"]
