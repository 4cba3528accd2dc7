"""What a state replica holds: a manifest naming the zone's files, each a list of content-addressed pieces.

A file is cut into pieces of :data:`PIECE_SIZE` bytes at fixed offsets; a
piece is named by the SHA-256 of its bytes and stored compressed. SQLite
copies a database page for page, so a change that touches a few pages
changes the pieces holding them and no other: a publication uploads what
changed, whatever the zone's size.

Whoever may write the platform's objects may write a replica, so a manifest
and its pieces are hostile input here: bounded before they are parsed, every
path checked to stay inside the zone directory, every piece checked against
its name. A replica that fails any check is refused whole and nothing local
is touched.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import zlib
from dataclasses import dataclass
from typing import Annotated

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from meshfed.errors import MeshfedError

FORMAT = 1
PIECE_SIZE = 256 * 1024  # raw bytes per piece: compressed, it fits a Secret (1 MiB) and a Consul KV value (512 KiB)
MAX_MANIFEST_BYTES = 256 * 1024  # the encoded manifest, as stored
MAX_FILES = 512
MAX_ZONE_BYTES = 1 << 30  # the zone's replicated files together: 4,096 pieces
_STORED_PIECE_BYTES = PIECE_SIZE + PIECE_SIZE // 8 + 64  # zlib's worst case for incompressible bytes, with room

# A path inside the zone directory: relative, "/"-separated, of plain names (no "..", no dot files).
_PATH = re.compile(r"(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}/){0,6}[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
Digest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class ReplicaError(MeshfedError):
    """A state replica that cannot be read, written or trusted."""


class FileEntry(BaseModel):
    """One replicated file: where it goes in the zone directory, its mode and its pieces in order."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    path: Annotated[str, StringConstraints(max_length=455)]
    mode: int = Field(ge=0, le=0o777)
    size: int = Field(ge=0, le=MAX_ZONE_BYTES)
    pieces: tuple[Digest, ...]


class Manifest(BaseModel):
    """A publication of the zone's state: which zone, which generation, who wrote it, and its files."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    format: int
    zone: Annotated[str, StringConstraints(min_length=1, max_length=253)]
    trust_domain: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    generation: int = Field(ge=1)
    writer: Annotated[str, StringConstraints(max_length=256)]
    written_at: Annotated[str, StringConstraints(max_length=64)]
    files: tuple[FileEntry, ...] = Field(max_length=MAX_FILES)

    def encode(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))

    def digests(self) -> set[str]:
        return {digest for entry in self.files for digest in entry.pieces}


def new_manifest(
    zone: str, trust_domain: str, generation: int, writer: str, files: tuple[FileEntry, ...], now: dt.datetime
) -> Manifest:
    return Manifest(
        format=FORMAT,
        zone=zone,
        trust_domain=trust_domain,
        generation=generation,
        writer=writer,
        written_at=now.isoformat(timespec="seconds"),
        files=files,
    )


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """The manifest stored at ``where``, refused in one line unless it is one this format can restore safely."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ReplicaError(f"{where}: the manifest is {len(raw):,} bytes, over the {MAX_MANIFEST_BYTES:,} allowed")
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            raise ReplicaError(f"{where}: the manifest is not JSON; was it written by meshfed?") from None
        place = ".".join(str(part) for part in first["loc"]) or "the document"
        raise ReplicaError(f"{where}: the manifest is malformed at {place}: {first['msg']}") from None
    if manifest.format != FORMAT:
        raise ReplicaError(
            f"{where}: the manifest is of format {manifest.format}; this meshfed reads format {FORMAT} "
            "(was it written by a newer meshfed? upgrade this one)"
        )
    seen: set[str] = set()
    total = 0
    for entry in manifest.files:
        if not _PATH.fullmatch(entry.path):
            raise ReplicaError(f"{where}: the manifest names {entry.path[:80]!r}, not a file inside a zone directory")
        if entry.path in seen:
            raise ReplicaError(f"{where}: the manifest names {entry.path!r} twice")
        seen.add(entry.path)
        if len(entry.pieces) != -(-entry.size // PIECE_SIZE):
            raise ReplicaError(
                f"{where}: {entry.path}: {len(entry.pieces)} pieces cannot hold {entry.size:,} bytes "
                f"({PIECE_SIZE:,} per piece)"
            )
        total += entry.size
    if total > MAX_ZONE_BYTES:
        raise ReplicaError(f"{where}: the manifest's files hold {total:,} bytes, over the {MAX_ZONE_BYTES:,} allowed")
    return manifest


@dataclass(frozen=True)
class Piece:
    """One piece: its name (the SHA-256 of its bytes) and its bytes."""

    digest: str
    data: bytes

    @classmethod
    def of(cls, data: bytes) -> Piece:
        return cls(hashlib.sha256(data).hexdigest(), data)

    def stored(self) -> bytes:
        """As kept in the platform: compressed (SQLite's free and sparse pages shrink to little)."""
        return zlib.compress(self.data, 6)


def unstored(digest: str, stored: bytes, where: str) -> bytes:
    """A piece's bytes from what the platform kept, refused unless they are the bytes its name says."""
    if len(stored) > _STORED_PIECE_BYTES:
        raise ReplicaError(f"{where}: piece {digest[:12]} is {len(stored):,} bytes stored, more than any piece takes")
    inflate = zlib.decompressobj()
    try:
        data = inflate.decompress(stored, PIECE_SIZE + 1)
    except zlib.error:
        raise ReplicaError(f"{where}: piece {digest[:12]} is not zlib data; the replica is damaged") from None
    if len(data) > PIECE_SIZE or inflate.unconsumed_tail or not inflate.eof:
        raise ReplicaError(f"{where}: piece {digest[:12]} does not inflate to one piece; the replica is damaged")
    if hashlib.sha256(data).hexdigest() != digest:
        raise ReplicaError(
            f"{where}: piece {digest[:12]} does not hold the bytes its name says; the replica is damaged"
        )
    return data


__all__ = [
    "MAX_MANIFEST_BYTES",
    "PIECE_SIZE",
    "FileEntry",
    "Manifest",
    "Piece",
    "ReplicaError",
    "new_manifest",
    "parse_manifest",
    "unstored",
]
