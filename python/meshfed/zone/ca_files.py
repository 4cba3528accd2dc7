"""A zone's CAs on disk: the files of each CA generation under ``ca/``, written whole and read back.

The first CA lives in ``ca/``, each rotation's in ``ca/generations/<n>/``:
``root.pem``, ``intermediate.pem`` (0644), ``intermediate.key`` and, unless the
root key is kept offline, ``root.key`` (0600, created with ``O_EXCL`` and that
mode, never widened). A generation's directory is built beside its place and
renamed into it, so a crash leaves no half-made CA that could be loaded. Also
here: where an offline root key may be written, reading one back
(``--root-key FILE``), deleting a retired CA's keys, and the
:class:`~meshfed.store.CaGeneration` record of a zone's first CA. Which
generation signs, and when it changes, is :mod:`meshfed.zone.generations`.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from meshfed.errors import ZoneError
from meshfed.store import CaGeneration
from meshfed.trust.bundle import fingerprint
from meshfed.trust.ca import (
    CertificateAuthority,
    certificates_to_pem,
    create_authority,
    create_intermediate,
    load_private_key_pem,
    private_key_to_pem,
)
from meshfed.trust.spiffe import TrustDomain

LEGACY_CA_DIRECTORY = "ca"
GENERATIONS_DIRECTORY = "ca/generations"


def load_authority(ca: Path, trust_domain: TrustDomain) -> CertificateAuthority:
    """The root and intermediate (with its key) in the CA directory ``ca``."""
    try:
        root = x509.load_pem_x509_certificate((ca / "root.pem").read_bytes())
        intermediate = x509.load_pem_x509_certificate((ca / "intermediate.pem").read_bytes())
        key_pem = (ca / "intermediate.key").read_bytes()
    except (OSError, ValueError) as err:
        raise ZoneError(f"zone CA in {ca} is unreadable: {err}") from None
    key = load_private_key_pem(key_pem, str(ca / "intermediate.key"))
    return CertificateAuthority(trust_domain, root, intermediate, key)


def write_authority(
    directory: Path, trust_domain: TrustDomain, generation: int, offline_root_key: Path | None = None
) -> CertificateAuthority:
    """Create a root + intermediate in ``directory`` (replacing a half-made one left by a crash)."""
    try:
        return _staged(
            directory, lambda staging: write_authority_files(staging, trust_domain, generation, offline_root_key)
        )
    except BaseException:
        if offline_root_key is not None:
            offline_root_key.unlink(missing_ok=True)  # made just now (offline_key_path refuses existing files)
        raise


def write_intermediate(
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
            write_new_file(ca / "root.key", private_key_to_pem(root_key), 0o600)
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


def write_authority_files(
    ca: Path, trust_domain: TrustDomain, generation: int = 0, offline_root_key: Path | None = None
) -> CertificateAuthority:
    """Make a new root + intermediate and write them into the (new, empty) CA directory ``ca``."""
    ca.chmod(0o700)
    new = create_authority(trust_domain, generation)
    # The offline key is written first and with O_EXCL: a file that exists is never overwritten.
    write_new_file(offline_root_key or ca / "root.key", private_key_to_pem(new.root_key), 0o600)
    _write_ca_files(ca, new.authority)
    return new.authority


def _write_ca_files(ca: Path, authority: CertificateAuthority) -> None:
    write_new_file(ca / "root.pem", certificates_to_pem([authority.root])[0], 0o644)
    write_new_file(ca / "intermediate.pem", certificates_to_pem([authority.intermediate])[0], 0o644)
    write_new_file(ca / "intermediate.key", private_key_to_pem(authority.intermediate_key), 0o600)


def offline_key_path(path: Path, zone_directory: Path) -> Path:
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


def first_generation(authority: CertificateAuthority, longest_svid_ttl: dt.timedelta) -> CaGeneration:
    """The record of a zone's first CA (``ca/``), active since its root was made."""
    return CaGeneration(
        0,
        LEGACY_CA_DIRECTORY,
        fingerprint(authority.root),
        "active",
        authority.root.not_valid_before_utc,
        longest_svid_ttl_seconds=int(longest_svid_ttl.total_seconds()),
    )


def delete_keys(ca: Path) -> None:
    """Delete the private keys in the CA directory ``ca``."""
    # A retired CA verifies nothing and must sign nothing: its private keys go.
    for name in ("root.key", "intermediate.key"):
        (ca / name).unlink(missing_ok=True)


def write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path``, which must not exist, created with ``mode``."""
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
