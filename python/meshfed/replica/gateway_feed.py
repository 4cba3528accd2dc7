"""The gateway feed: the config a zone's leader runs, published beside its state replica for gateway replicas.

With ``meshfed up --gateway-feed`` the leader writes the gateway config it
applied — the whole document, its SVID and key included — beside the
replica: Secret ``NAME-gateway`` (``--state-secret NAMESPACE/NAME``) or key
``PREFIX/gateway/manifest`` (``--state-kv PREFIX``), and the further parts
below. Gateway replicas (``meshfed gateway``) read those objects, so their
identity needs read access to them and to nothing else of the zone: the state
replica holds the CA's key, the feed only the gateway's own.

The object is a line naming the format, a JSON line describing the
publication (zone, writer, generation, the config's size and SHA-256, and the
SHA-256 of each further part), and the config compressed; what does not fit
one object of the store goes on in up to :data:`MAX_PARTS` - 1 more, at fixed
names (Secrets ``NAME-gateway-1`` ..., keys ``PREFIX/gateway/1/manifest`` ...)
so that a replica's rights can name each. The parts are written first and the
first object last, by compare-and-swap on the version this process last wrote,
as the state replica's manifest is: a deposed leader cannot overwrite its
successor's config. A reader that meets parts newer than the first object (a
publication under way) waits for the next read before it calls them damaged.

Whoever may write that object could steer every gateway replica, so what a
replica reads is hostile input: bounded as stored and as inflated, the header
parsed strictly, the config checked against its digest before the data plane
compiles it (which checks it whole). A feed that fails any check is refused
and the replica keeps serving what it served.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from meshfed.clock import SYSTEM_CLOCK, Clock
from meshfed.replica.manifest import ReplicaError
from meshfed.replica.replicator import ReplicaConflictError
from meshfed.validation import describe_validation_error

if TYPE_CHECKING:
    from meshfed.gateway.config import GatewayConfig
    from meshfed.replica.stores import ReplicaStore

log = logging.getLogger("meshfed.replica")

_MAGIC = b"meshfed-gateway-feed/1\n"
_MAX_HEADER_BYTES = 4096
_HEADER_ROOM = 8192  # what the first object keeps free for the format line and the header
# The inflated config: far above a zone of 10,000 services, far below what would hurt a replica.
MAX_CONFIG_BYTES = 256 << 20
# Objects a feed may take: the first and 15 more, each named in the chart's Role (templates/rbac.yaml);
# 16 MB in Secrets, 8 MiB in Consul KV, compressed: about 100,000 services (bench/gateway_feed.py).
MAX_PARTS = 16
_Text = Annotated[str, StringConstraints(min_length=1, max_length=253)]
_Digest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class FeedHeader(BaseModel):
    """What a publication says of itself: whose config, which generation, who wrote it and what it holds."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    zone: _Text
    trust_domain: _Text
    writer: _Text
    generation: int = Field(ge=1)
    written_at: Annotated[str, StringConstraints(max_length=64)]
    size: int = Field(ge=1, le=MAX_CONFIG_BYTES)
    digest: _Digest
    parts: list[_Digest] = Field(default_factory=list, max_length=MAX_PARTS - 1)
    """The SHA-256 of each further object's bytes, in order (none when the config fits the first)."""


class PartsNotReadyError(ReplicaError):
    """A further part is missing or is not the one the first object names: a publication under way, or damage."""


@dataclass(frozen=True)
class Feed:
    """One publication as read: its header, the config document (checked against its digest) and its version."""

    header: FeedHeader
    config: bytes
    version: str


def encode_feed(header: FeedHeader, config: bytes, *, largest: int = 512 * 1024) -> list[bytes]:
    """The objects that store ``config`` under ``header`` (its ``parts`` filled in), each of at most ``largest``
    bytes: the first holds the header and the start of the compressed config, the others the rest."""
    compressed = zlib.compress(config, 6)
    first, rest = compressed[: largest - _HEADER_ROOM], compressed[largest - _HEADER_ROOM :]
    parts = [rest[offset : offset + largest] for offset in range(0, len(rest), largest)]
    if len(parts) > MAX_PARTS - 1:
        raise ReplicaError(
            f"the gateway config takes {len(compressed):,} bytes compressed, more than {MAX_PARTS} objects of "
            f"{largest:,} bytes hold: gateway replicas keep serving the previous one"
        )
    header = header.model_copy(update={"parts": [hashlib.sha256(part).hexdigest() for part in parts]})
    return [b"".join((_MAGIC, orjson.dumps(header.model_dump()), b"\n", first)), *parts]


def feed_header(raw: bytes, where: str, *, largest: int) -> FeedHeader:
    """The header of a feed's first object (its checks only: see :func:`decode_feed` for the config)."""
    return _split(raw, where, largest)[0]


def decode_feed(raw: bytes, where: str, *, largest: int, parts: Sequence[bytes] = ()) -> tuple[FeedHeader, bytes]:
    """The header and config of a stored feed (its first object, and ``parts``, the bytes of the further ones),
    refused (:class:`ReplicaError`; :class:`PartsNotReadyError` for the parts) unless each check holds."""
    header, body = _split(raw, where, largest)
    if len(parts) != len(header.parts):
        raise PartsNotReadyError(f"{where}: the feed names {len(header.parts)} further parts, {len(parts)} were read")
    for number, (part, digest) in enumerate(zip(parts, header.parts, strict=True), start=1):
        if len(part) > largest or hashlib.sha256(part).hexdigest() != digest:
            raise PartsNotReadyError(f"{where}: part {number} of the feed is not the one its header names")
    return header, _inflated(b"".join((body, *parts)), header, where)


def _split(raw: bytes, where: str, largest: int) -> tuple[FeedHeader, bytes]:
    if len(raw) > largest:
        raise ReplicaError(f"{where}: {len(raw):,} bytes stored, more than the store holds in one object")
    if not raw.startswith(_MAGIC):
        raise ReplicaError(f"{where} does not hold a gateway feed (it does not start with {_MAGIC.strip()!r})")
    line, newline, body = raw[len(_MAGIC) :].partition(b"\n")
    if not newline or len(line) > _MAX_HEADER_BYTES:
        raise ReplicaError(f"{where}: the feed's header is missing or over {_MAX_HEADER_BYTES:,} bytes")
    try:
        header = FeedHeader.model_validate(orjson.loads(line))
    except orjson.JSONDecodeError as err:
        raise ReplicaError(f"{where}: the feed's header is not JSON: {err}") from None
    except ValidationError as err:
        raise ReplicaError(f"{where}: the feed's header is refused: {describe_validation_error(err)}") from None
    return header, body


def _inflated(body: bytes, header: FeedHeader, where: str) -> bytes:
    inflate = zlib.decompressobj()
    try:
        config = inflate.decompress(body, header.size + 1)
    except zlib.error:
        raise ReplicaError(f"{where}: the feed's config is not zlib data") from None
    if len(config) != header.size or inflate.unconsumed_tail or not inflate.eof:
        raise ReplicaError(f"{where}: the feed's config does not inflate to the {header.size:,} bytes its header says")
    if hashlib.sha256(config).hexdigest() != header.digest:
        raise ReplicaError(f"{where}: the feed's config does not hold the bytes its header's digest says")
    return config


class FeedPublisher:
    """The leader's side: publishes each config its gateway applies (``meshfed up --gateway-feed``)."""

    def __init__(
        self,
        store: ReplicaStore,
        *,
        zone: str,
        trust_domain: str,
        writer: str,
        clock: Clock = SYSTEM_CLOCK,
        parts: int = MAX_PARTS,
    ) -> None:
        """``store`` holds the first object; ``parts`` is how many objects a publication may take."""
        self._store, self._zone, self._trust_domain, self._writer, self._clock = (
            store,
            zone,
            trust_domain,
            writer,
            clock,
        )
        self._parts = [store.sibling(str(number)) for number in range(1, parts)]
        self._part_versions: dict[int, str | None] = {}
        self._part_digests: dict[int, str] = {}
        self._version: str | None = None
        self._generation = 0
        self._digest = ""
        self._last_problem = ""

    @property
    def where(self) -> str:
        return self._store.where

    @property
    def problem(self) -> str:
        """Why the last publication failed ('' once one succeeds again), for the zone's /readyz."""
        return self._last_problem

    @property
    def generation(self) -> int:
        """The generation this process last published (that of its predecessor before that)."""
        return self._generation

    async def start(self) -> None:
        """Take up the feed where the previous leader left it: its version is what the first write replaces."""
        found = await self._store.read_manifest()
        if found is None:
            return
        raw, self._version = found
        try:
            header = feed_header(raw, self.where, largest=self._store.largest)
        except ReplicaError as err:
            log.warning("zone %s: replacing a gateway feed that does not read: %s", self._zone, err)
            return
        self._generation, self._digest = header.generation, header.digest

    async def publish(self, config: bytes) -> bool:
        """Publish ``config`` (a gateway config document) unless it is the one published; False if it was."""
        digest = hashlib.sha256(config).hexdigest()
        if digest == self._digest:
            return False
        header = FeedHeader(
            zone=self._zone,
            trust_domain=self._trust_domain,
            writer=self._writer,
            generation=self._generation + 1,
            written_at=self._clock.now().isoformat(timespec="milliseconds"),
            size=len(config),
            digest=digest,
        )
        if header.size > MAX_CONFIG_BYTES:
            raise ReplicaError(f"{self.where}: the gateway config is {header.size:,} bytes, over {MAX_CONFIG_BYTES:,}")
        try:
            first, *parts = await asyncio.to_thread(encode_feed, header, config, largest=self._store.largest)
        except ReplicaError as err:
            raise ReplicaError(f"{self.where}: {err}") from None
        if len(parts) > len(self._parts):
            raise ReplicaError(
                f"{self.where}: the gateway config takes {1 + len(parts)} objects, more than the "
                f"{1 + len(self._parts)} a feed may: gateway replicas keep serving the previous one"
            )
        # The parts first: a replica that reads the new first object finds its parts already there. A part is
        # written when it changed, or when it is not what this process wrote (someone else rewrote it).
        for number, part in enumerate(parts):
            digest = hashlib.sha256(part).hexdigest()
            if self._part_digests.get(number) != digest or not await self._unchanged(number):
                await self._put(number, part)
                self._part_digests[number] = digest
        version = await self._store.write_manifest(first, self._version)
        if version is None:
            raise ReplicaConflictError(
                f"{self.where} was written by another process since this one wrote generation {self._generation}: "
                "another process of the zone leads, so this one stops publishing the gateway config"
            )
        self._version, self._generation, self._digest = version, header.generation, digest
        return True

    async def _unchanged(self, number: int) -> bool:
        found = await self._parts[number].read_manifest()
        return found is not None and found[1] == self._part_versions.get(number)

    async def _put(self, number: int, data: bytes) -> None:
        """Write part ``number`` whatever it held (the first object's compare-and-swap is the fence)."""
        store = self._parts[number]
        for _ in range(2):
            if number not in self._part_versions:
                found = await store.read_manifest()
                self._part_versions[number] = None if found is None else found[1]
            written = await store.write_manifest(data, self._part_versions[number])
            if written is not None:
                self._part_versions[number] = written
                return
            del self._part_versions[number]  # written since: read its version again
        raise ReplicaError(f"{store.where} keeps changing while this process writes it: does another process lead?")

    async def keep_published(self, applied: Callable[[], GatewayConfig | None], interval: dt.timedelta) -> None:
        """Publish each config ``applied()`` returns, looking every ``interval``, forever; a problem is logged
        (once until it changes) and retried. Raises :class:`ReplicaConflictError` when another process publishes."""
        published: GatewayConfig | None = None
        while True:
            config = applied()
            if config is not None and config is not published:
                try:
                    if await self.publish(await asyncio.to_thread(config.to_json)):
                        log.debug("zone %s: %s: gateway config %d published", self._zone, self.where, self._generation)
                except ReplicaConflictError:
                    raise
                except ReplicaError as err:
                    if str(err) != self._last_problem:
                        log.warning("zone %s: cannot publish the gateway config: %s", self._zone, err)
                    self._last_problem = str(err)
                else:
                    published = config
                    if self._last_problem:
                        log.info("zone %s: %s: gateway config published again", self._zone, self.where)
                        self._last_problem = ""
            await self._clock.sleep(interval.total_seconds())


class FeedReader:
    """A gateway replica's side: reads the feed, and only what changed since it last read."""

    def __init__(self, store: ReplicaStore, parts: int = MAX_PARTS) -> None:
        self._store = store
        self._parts = [store.sibling(str(number)) for number in range(1, parts)]
        self._version: str | None = None
        self._waited: str | None = None  # the first object's version whose parts were not ready at the last read

    @property
    def where(self) -> str:
        return self._store.where

    async def read(self) -> Feed | None:
        """The publication written since the last read; None if there is none new (or none at all).

        A publication that fails a check raises :class:`ReplicaError` each time it is read, until it is replaced.
        """
        found = await self._store.read_manifest()
        if found is None or found[1] == self._version:
            return None
        raw, version = found
        largest = self._store.largest
        header = feed_header(raw, self.where, largest=largest)
        if len(header.parts) > len(self._parts):
            raise ReplicaError(
                f"{self.where}: the feed names {len(header.parts)} further parts, over {len(self._parts)}"
            )
        parts = []
        for store in self._parts[: len(header.parts)]:
            part = await store.read_manifest()
            parts.append(b"" if part is None else part[0])
        try:
            header, config = await asyncio.to_thread(decode_feed, raw, self.where, largest=largest, parts=parts)
        except PartsNotReadyError:
            if self._waited != version:  # a publication under way: its first object comes last
                self._waited = version
                return None
            raise
        self._version, self._waited = version, None
        return Feed(header, config, version)


__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_PARTS",
    "Feed",
    "FeedHeader",
    "FeedPublisher",
    "FeedReader",
    "PartsNotReadyError",
    "decode_feed",
    "encode_feed",
    "feed_header",
]
