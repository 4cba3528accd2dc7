"""The gateway feed: the config a zone's leader runs, published beside its state replica for gateway replicas.

With ``meshfed up --gateway-feed`` the leader writes the gateway config it
applied — the whole document, its SVID and key included — to one object of
the replica's store: Secret ``NAME-gateway`` (``--state-secret
NAMESPACE/NAME``) or key ``PREFIX/gateway/manifest`` (``--state-kv PREFIX``).
Gateway replicas (``meshfed gateway``) read that one object, so their identity
needs read access to it and to nothing else of the zone: the state replica
holds the CA's key, the feed only the gateway's own.

The object is a line naming the format, a JSON line describing the
publication (zone, writer, generation, the config's size and SHA-256), and the
config compressed. It is written by compare-and-swap on the version this
process last wrote, as the state replica's manifest is: a deposed leader
cannot overwrite its successor's config.

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
from collections.abc import Callable
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
# The inflated config: far above a zone of 10,000 services, far below what would hurt a replica.
MAX_CONFIG_BYTES = 256 << 20
_Text = Annotated[str, StringConstraints(min_length=1, max_length=253)]


class FeedHeader(BaseModel):
    """What a publication says of itself: whose config, which generation, who wrote it and what it holds."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    zone: _Text
    trust_domain: _Text
    writer: _Text
    generation: int = Field(ge=1)
    written_at: Annotated[str, StringConstraints(max_length=64)]
    size: int = Field(ge=1, le=MAX_CONFIG_BYTES)
    digest: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


@dataclass(frozen=True)
class Feed:
    """One publication as read: its header, the config document (checked against its digest) and its version."""

    header: FeedHeader
    config: bytes
    version: str


def encode_feed(header: FeedHeader, config: bytes) -> bytes:
    return b"".join((_MAGIC, orjson.dumps(header.model_dump()), b"\n", zlib.compress(config, 6)))


def decode_feed(raw: bytes, where: str, *, largest: int) -> tuple[FeedHeader, bytes]:
    """The header and config of a stored feed, refused (:class:`ReplicaError`) unless each check holds."""
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
    inflate = zlib.decompressobj()
    try:
        config = inflate.decompress(body, header.size + 1)
    except zlib.error:
        raise ReplicaError(f"{where}: the feed's config is not zlib data") from None
    if len(config) != header.size or inflate.unconsumed_tail or not inflate.eof:
        raise ReplicaError(f"{where}: the feed's config does not inflate to the {header.size:,} bytes its header says")
    if hashlib.sha256(config).hexdigest() != header.digest:
        raise ReplicaError(f"{where}: the feed's config does not hold the bytes its header's digest says")
    return header, config


class FeedPublisher:
    """The leader's side: publishes each config its gateway applies (``meshfed up --gateway-feed``)."""

    def __init__(
        self, store: ReplicaStore, *, zone: str, trust_domain: str, writer: str, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self._store, self._zone, self._trust_domain, self._writer, self._clock = (
            store,
            zone,
            trust_domain,
            writer,
            clock,
        )
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
            header, _ = decode_feed(raw, self.where, largest=self._store.largest)
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
        raw = await asyncio.to_thread(encode_feed, header, config)
        if len(raw) > self._store.largest:
            raise ReplicaError(
                f"{self.where}: the gateway config takes {len(raw):,} bytes compressed, more than the store holds "
                f"in one object ({self._store.largest:,}): gateway replicas keep serving the previous one"
            )
        version = await self._store.write_manifest(raw, self._version)
        if version is None:
            raise ReplicaConflictError(
                f"{self.where} was written by another process since this one wrote generation {self._generation}: "
                "another process of the zone leads, so this one stops publishing the gateway config"
            )
        self._version, self._generation, self._digest = version, header.generation, digest
        return True

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

    def __init__(self, store: ReplicaStore) -> None:
        self._store = store
        self._version: str | None = None

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
        header, config = await asyncio.to_thread(decode_feed, raw, self.where, largest=self._store.largest)
        self._version = version
        return Feed(header, config, version)


__all__ = [
    "MAX_CONFIG_BYTES",
    "Feed",
    "FeedHeader",
    "FeedPublisher",
    "FeedReader",
    "decode_feed",
    "encode_feed",
]
