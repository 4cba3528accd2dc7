"""One zone directory kept in one replica by its one writer: restored or published at start, then published.

At start, before the zone opens (:meth:`StateReplica.start`): with no replica
yet, the directory is published as generation 1; a replica whose manifest the
directory's marker names is the directory's own (the same pod, restarted), and
whatever this directory wrote since is published; any other replica is the
zone — a successor's later state, or the state of a zone whose pod and volume
are gone — and is restored over the directory. Then, while the zone runs,
:meth:`StateReplica.keep_published` publishes every ``interval`` whatever
changed, and :meth:`StateReplica.publish` once more at a clean stop.

Each publication writes the pieces the replica lacks, then the manifest as a
compare-and-swap on the version this writer last wrote
(:mod:`meshfed.replica.stores`), then deletes the pieces only the previous
manifest named. A swap that fails means another process published: this one
is no longer the zone's writer and stops (:class:`ReplicaConflictError`),
leaving the replica as its successor wrote it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from pathlib import Path

from meshfed.clock import SYSTEM_CLOCK, Clock
from meshfed.replica.files import Marker, read_marker, refuse_unreplicated, restore_files, take_copy, write_marker
from meshfed.replica.manifest import (
    MAX_MANIFEST_BYTES,
    Manifest,
    ReplicaError,
    new_manifest,
    parse_manifest,
    unstored,
)
from meshfed.replica.stores import ReplicaStore

log = logging.getLogger("meshfed.replica")

_RESTORE_TRIES = 3  # a piece deleted while it was read: its manifest was replaced; read the new one
# A large zone's copy takes long (0.5 s for 40 MB): publications are spaced so copies take at most
# 1/_COPY_SHARE of a core, at the price of a longer window of changes a lost pod and volume lose.
_COPY_SHARE = 10


class ReplicaConflictError(ReplicaError):
    """Another process published the replica since this one did: this one must stop writing it."""


class StateReplica:
    """The zone in ``directory`` (named ``zone``, of ``trust_domain``) and its replica in ``store``."""

    def __init__(
        self,
        store: ReplicaStore,
        directory: Path,
        *,
        zone: str,
        trust_domain: str,
        writer: str,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._store = store
        self._directory = directory
        self._zone, self._trust_domain, self._writer = zone, trust_domain, writer
        self._clock = clock
        self._manifest: Manifest | None = None  # as this writer last read or wrote it
        self._version: str | None = None  # its version in the store
        self._stored: set[str] = set()  # digests known to be in the store
        self._last_problem = ""
        self._copy_seconds = 0.0  # how long the last copy of the directory took

    @property
    def where(self) -> str:
        return self._store.where

    @property
    def problem(self) -> str:
        """Why the last publication failed ('' once one succeeds again), for the zone's /readyz."""
        return self._last_problem

    @property
    def generation(self) -> int:
        return 0 if self._manifest is None else self._manifest.generation

    async def start(self) -> str:
        """Restore or publish, as the module says; returns what was done, for the log."""
        for _ in range(_RESTORE_TRIES):
            found = await self._read()
            if found is None:
                await self.publish()
                return f"{self.where}: no replica yet; published this directory as generation {self.generation}"
            manifest, digest, version = found
            marker = read_marker(self._directory)
            if marker is not None and marker.where == self.where and marker.digest == digest:
                self._adopt(manifest, version)
                published = await self.publish()
                return f"{self.where}: the directory holds generation {manifest.generation}" + (
                    f"; published what it wrote since as generation {self.generation}" if published else ""
                )
            if await self._restore(manifest, digest, version):
                return (
                    f"{self.where}: restored generation {manifest.generation} "
                    f"(written by {manifest.writer!r} at {manifest.written_at})"
                )
        raise ReplicaError(
            f"{self.where}: its pieces kept changing while they were read ({_RESTORE_TRIES} tries): "
            "does another process of the zone still write it?"
        )

    async def publish(self) -> bool:
        """Publish what changed since the last publication; False if nothing did."""
        started = time.perf_counter()  # a cost, not a deadline: measured, never waited on
        copy = await asyncio.to_thread(take_copy, self._directory)
        self._copy_seconds = time.perf_counter() - started
        if self._manifest is not None and copy.files == self._manifest.files:
            return False
        for digest, piece in copy.pieces.items():
            if digest not in self._stored:
                await self._store.write_piece(digest, piece.stored())
                self._stored.add(digest)
        manifest = new_manifest(
            self._zone, self._trust_domain, self.generation + 1, self._writer, copy.files, self._clock.now()
        )
        raw = manifest.encode()
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ReplicaError(f"{self.where}: the manifest would take {len(raw):,} bytes, over {MAX_MANIFEST_BYTES:,}")
        version = await self._store.write_manifest(raw, self._version)
        if version is None:
            current = await self._read_quietly()
            raise ReplicaConflictError(
                f"{self.where} was written by {current} since this process wrote generation {self.generation}: "
                "another process of the zone leads and writes it, so this one stops — check that each zone's "
                "processes elect a leader (--leader-lease or --leader-lock)"
            )
        write_marker(self._directory, Marker(self.where, manifest.generation, _digest(raw)))
        previous = self._manifest.digests() if self._manifest is not None else set()
        self._manifest, self._version = manifest, version
        for gone in previous - manifest.digests():
            await self._store.delete_piece(gone)
            self._stored.discard(gone)
        return True

    async def sweep(self) -> int:
        """Delete pieces no manifest names (left by a publication cut short); returns how many."""
        if self._manifest is None:
            return 0
        orphans = await self._store.pieces() - self._manifest.digests()
        for digest in orphans:
            await self._store.delete_piece(digest)
        return len(orphans)

    async def keep_published(self, interval: float) -> None:
        """Publish every ``interval`` seconds (longer when copies are slow), forever; a problem is logged (once
        until it changes) and retried.

        Raises :class:`ReplicaConflictError` when another process published."""
        while True:
            await self._clock.sleep(max(interval, _COPY_SHARE * self._copy_seconds))
            try:
                await self.publish()
            except ReplicaConflictError:
                raise
            except (ReplicaError, OSError) as err:
                problem = str(err)
                if problem != self._last_problem:
                    log.warning("zone %s: cannot publish its state: %s", self._zone, problem)
                self._last_problem = problem
                continue
            if self._last_problem:
                log.info("zone %s: %s: publishing again (generation %d)", self._zone, self.where, self.generation)
                self._last_problem = ""

    # -- reading -----------------------------------------------------------------------------------------

    async def _read(self) -> tuple[Manifest, str, str] | None:
        """The stored manifest, checked to be this zone's, its digest and its version; None if there is none."""
        stored = await self._store.read_manifest()
        if stored is None:
            return None
        raw, version = stored
        manifest = parse_manifest(raw, self.where)
        refuse_unreplicated(manifest.files, self.where)
        if (manifest.zone, manifest.trust_domain) != (self._zone, self._trust_domain):
            raise ReplicaError(
                f"{self.where} holds zone {manifest.zone!r} (trust domain {manifest.trust_domain}), not this zone "
                f"{self._zone!r} ({self._trust_domain}): give each zone a replica of its own"
            )
        return manifest, _digest(raw), version

    async def _read_quietly(self) -> str:
        try:
            found = await self._read()
        except ReplicaError as err:
            return f"another writer (its manifest: {err})"
        if found is None:
            return "another process (it deleted the manifest)"
        return f"{found[0].writer!r} (generation {found[0].generation})"

    async def _restore(self, manifest: Manifest, digest: str, version: str) -> bool:
        """Restore ``manifest``; False if a piece vanished meanwhile (read the manifest again)."""
        pieces: dict[str, bytes] = {}
        for name in sorted(manifest.digests()):
            stored = await self._store.read_piece(name)
            if stored is None:
                return False
            pieces[name] = unstored(name, stored, self.where)
        await asyncio.to_thread(restore_files, self._directory, manifest.files, pieces)
        write_marker(self._directory, Marker(self.where, manifest.generation, digest))
        self._adopt(manifest, version)
        return True

    def _adopt(self, manifest: Manifest, version: str) -> None:
        self._manifest, self._version = manifest, version
        self._stored = set(manifest.digests())


def _digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


__all__ = ["ReplicaConflictError", "StateReplica"]
