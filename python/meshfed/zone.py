"""A zone directory: its config, CA, state database and admin token.

Layout (the directory is 0700; private keys and the token are 0600)::

    zone.toml              name, trust domain, listen addresses
    state.db               SQLite: trust bundles, later peerings and catalogs
    admin-token            bearer token for mutating API calls
    ca/root.pem            the trust domain's root (published in the bundle)
    ca/root.key
    ca/intermediate.pem    signs SVIDs
    ca/intermediate.key

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
from pathlib import Path
from typing import Literal

import tomli_w
from cryptography import x509
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from meshfed.errors import InvalidBundleError, TrustError, ZoneError
from meshfed.store import StateStore, StoredBundle
from meshfed.trust.bundle import TrustBundle
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
_ZONE_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")

BundleSource = Literal["self", "import"]


class ZoneConfig(BaseModel):
    """The contents of ``zone.toml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    trust_domain: str
    catalog: Literal["embedded"] = "embedded"
    gateway_address: str = "0.0.0.0:15443"

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
    def init(cls, directory: Path, name: str, trust_domain: str) -> Zone:
        """Create a new zone in ``directory``, which must not exist or must be empty."""
        try:
            config = ZoneConfig(name=name, trust_domain=trust_domain)
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
        return cls(directory, config)

    def store(self) -> StateStore:
        """The zone's state database; use as a context manager."""
        return StateStore(self.directory / STATE_FILE)

    def authority(self) -> CertificateAuthority:
        """The zone's signing CA, loaded from ``ca/``."""
        ca = self.directory / "ca"
        try:
            root = x509.load_pem_x509_certificate((ca / "root.pem").read_bytes())
            intermediate = x509.load_pem_x509_certificate((ca / "intermediate.pem").read_bytes())
            key_pem = (ca / "intermediate.key").read_bytes()
        except (OSError, ValueError) as err:
            raise ZoneError(f"zone CA in {ca} is unreadable: {err}") from None
        key = load_private_key_pem(key_pem, str(ca / "intermediate.key"))
        return CertificateAuthority(self.trust_domain, root, intermediate, key)

    def issue_svid(self, spiffe_id: SpiffeId, ttl: dt.timedelta) -> Svid:
        """Issue an X.509-SVID from this zone's CA."""
        return self.authority().issue(spiffe_id, ttl)

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

    def import_bundle(self, bundle: TrustBundle) -> None:
        """Trust ``bundle``'s roots for its trust domain, replacing that domain's earlier bundle."""
        if bundle.trust_domain == self.trust_domain:
            raise InvalidBundleError(
                f"{bundle.trust_domain} is this zone's own trust domain; import bundles of other zones only"
            )
        with self.store() as store:
            store.put_bundle(bundle, source="import")

    def admin_token(self) -> str:
        """The zone's admin token."""
        try:
            return (self.directory / TOKEN_FILE).read_text().strip()
        except OSError as err:
            raise ZoneError(f"cannot read the admin token: {err}") from None


def _populate(directory: Path, config: ZoneConfig) -> None:
    directory.chmod(0o700)
    (directory / "ca").mkdir(mode=0o700)
    new = create_authority(TrustDomain(config.trust_domain))
    authority = new.authority
    _write(directory / "ca" / "root.pem", certificates_to_pem([authority.root])[0], 0o644)
    _write(directory / "ca" / "root.key", private_key_to_pem(new.root_key), 0o600)
    _write(directory / "ca" / "intermediate.pem", certificates_to_pem([authority.intermediate])[0], 0o644)
    _write(directory / "ca" / "intermediate.key", private_key_to_pem(authority.intermediate_key), 0o600)
    _write(directory / TOKEN_FILE, (secrets.token_urlsafe(32) + "\n").encode(), 0o600)
    _write(directory / CONFIG_FILE, tomli_w.dumps(config.model_dump()).encode(), 0o644)
    with StateStore(directory / STATE_FILE) as store:
        store.put_bundle(TrustBundle(authority.trust_domain, (authority.root,)), source="self")
    (directory / STATE_FILE).chmod(0o600)


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


__all__ = ["Zone", "ZoneConfig", "write_private_file"]
