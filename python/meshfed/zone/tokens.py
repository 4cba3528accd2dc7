"""A zone's API tokens: ``admin-token`` (every call) and ``read-token`` (reads only), 0600 files in its directory.

``zone init`` writes both; a zone made before read tokens existed gets its
``read-token`` on first open, written whole and linked into place so that
concurrent readers and racing processes all see one token. Reading a token
that cannot be read is a :class:`~meshfed.errors.ZoneError` saying so.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from meshfed.errors import ZoneError
from meshfed.zone.ca_files import write_new_file

TOKEN_FILE = "admin-token"  # noqa: S105 -- a file name, not a secret
READ_TOKEN_FILE = "read-token"  # noqa: S105 -- a file name, not a secret


# What a token given in a file may be: one line of printable ASCII (a bearer token), of a sane length.
_TOKEN = re.compile(r"[\x21-\x7e]{16,512}")


@dataclass(frozen=True)
class TokenFiles:
    """Where the deployer keeps the API's tokens (``--admin-token-file``, ``--read-token-file``: mounted
    Secrets, say): at start they replace the zone directory's, after its replica is restored, so the
    deployer's token wins over the one an older pod published."""

    admin: Path | None = None
    read: Path | None = None


def install_token_files(directory: Path, files: TokenFiles) -> list[str]:
    """Make the zone's tokens those of ``files``; returns the names of the tokens that changed."""
    changed = []
    for source, name in ((files.admin, TOKEN_FILE), (files.read, READ_TOKEN_FILE)):
        if source is None:
            continue
        try:
            token = source.read_bytes()[:1024].decode("ascii").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ZoneError(f"cannot read the {name} to use from {source}: {err}") from None
        if not _TOKEN.fullmatch(token):
            raise ZoneError(f"{source} does not hold a token: give one line of 16-512 printable ASCII characters")
        target = directory / name
        with contextlib.suppress(OSError):
            if target.read_text().strip() == token:
                continue
        staged = target.with_name(f".{name}.new")
        staged.unlink(missing_ok=True)
        write_new_file(staged, (token + "\n").encode(), 0o600)
        staged.replace(target)
        changed.append(name)
    return changed


def write_tokens(directory: Path) -> None:
    """Write a new zone's admin and read tokens (0600; neither file may exist)."""
    write_new_file(directory / TOKEN_FILE, (secrets.token_urlsafe(32) + "\n").encode(), 0o600)
    write_new_file(directory / READ_TOKEN_FILE, (secrets.token_urlsafe(32) + "\n").encode(), 0o600)


def load_admin_token(directory: Path) -> str:
    """The zone's admin token."""
    try:
        return (directory / TOKEN_FILE).read_text().strip()
    except OSError as err:
        raise ZoneError(f"cannot read the admin token: {err}") from None


def load_read_token(directory: Path) -> str:
    """The zone's read-only API token, made now if this zone predates it."""
    ensure_read_token(directory, strict=True)
    try:
        return (directory / READ_TOKEN_FILE).read_text().strip()
    except OSError as err:
        raise ZoneError(f"cannot read the read token: {err}") from None


def ensure_read_token(directory: Path, *, strict: bool) -> None:
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
