"""A zone's trust authority: its CA generations, which one signs, issuing SVIDs, and a rotation's phases.

:class:`TrustAuthority` (``zone.authority``) owns the ``ca_generations``
table of ``state.db`` and the CA directories it names (their files are
:mod:`meshfed.zone.ca_files`). A rotation (``rotate`` then ``advance``, or
``finish`` / ``abort``) moves generations through ``published`` -> ``active``
-> ``retiring`` -> ``retired`` at stored deadlines, so a restart resumes where
it stopped; each phase that adds or drops a root changes the zone's own bundle
in the same transaction. A zone that never rotated has no rows and signs with
``ca/``.

Rotation, by phase::

    rotate      new root published in the bundle (sequence + 1); old CA still signs
    activate_at new CA signs; old root stays in the bundle (retiring)
    retire_at   old root leaves the bundle (sequence + 1); its keys are deleted

``advance`` is called by the CLI and by the controller's rotation service;
``finish`` does the remaining phases now (after a key compromise: the old root
stops being trusted at once); ``abort`` drops a new CA that does not sign yet.
A zone whose root key is offline rotates its intermediate under the same root
(``rotate(root_key=...)``: the bundle does not change), or to a new root whose
key goes offline too.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from meshfed.errors import RotationError
from meshfed.store import CaGeneration, StateStore
from meshfed.trust.bundle import TrustBundle, fingerprint
from meshfed.trust.ca import CertificateAuthority, Svid
from meshfed.trust.spiffe import SpiffeId, TrustDomain
from meshfed.zone.ca_files import (
    GENERATIONS_DIRECTORY,
    LEGACY_CA_DIRECTORY,
    delete_keys,
    first_generation,
    load_authority,
    offline_key_path,
    write_authority,
    write_intermediate,
)
from meshfed.zone.trust_store import own_bundle

# Zones whose SVIDs were issued before TTLs were recorded: assume the default SVID lifetime.
_ASSUMED_SVID_TTL = dt.timedelta(hours=24)
ROTATION_OVERLAP_REFRESH_HINTS = 3
_SECOND = dt.timedelta(seconds=1)


@dataclass(frozen=True)
class RotationStep:
    """One phase change made by :meth:`TrustAuthority.advance` (or ``finish``/``abort``), for logs and the CLI."""

    generation: int
    state: str
    message: str


class TrustAuthority:
    """The CA generations of zone ``name`` in ``directory``; see the module."""

    def __init__(self, directory: Path, name: str, trust_domain: TrustDomain, store: Callable[[], StateStore]) -> None:
        self._directory = directory
        self._name = name
        self._trust_domain = trust_domain
        self._store = store
        # A generation's directory never changes once written (retirement only deletes its keys, and a
        # retired generation never signs), so each is read from disk once per process, not per SVID.
        self._loaded: dict[str, CertificateAuthority] = {}

    def generations(self) -> list[CaGeneration]:
        """The zone's CA generations and their phases, oldest first (none if the zone never rotated)."""
        with self._store() as store:
            return store.ca_generations()

    def signing_ca(self) -> CertificateAuthority:
        """The zone's signing CA: the active generation's root and intermediate."""
        return self._load(self._active_directory())

    def _active_directory(self) -> str:
        active = [generation for generation in self.generations() if generation.state == "active"]
        return active[0].directory if active else LEGACY_CA_DIRECTORY

    def _load(self, directory: str) -> CertificateAuthority:
        loaded = self._loaded.get(directory)
        if loaded is None:
            loaded = self._loaded[directory] = load_authority(self._directory / directory, self._trust_domain)
        return loaded

    def root_key_offline(self) -> bool:
        """True if the active CA's root key is not in the zone directory (``zone init --offline-root-key``)."""
        return not (self._directory / self._active_directory() / "root.key").exists()

    def issue_svid(
        self, spiffe_id: SpiffeId, ttl: dt.timedelta, dns_names: Sequence[str] = (), *, generation: int | None = None
    ) -> Svid:
        """Issue an X.509-SVID from the active CA, remembering its TTL for the CA's retirement.

        ``generation`` names a retiring CA instead: during a rotation, peers that
        have not yet received the new root can verify only what the old one
        signed (see the peering service). Such an SVID never outlives the old
        root's retirement.
        """
        with self._store() as store:
            generations = store.ca_generations()
            active = next((g for g in generations if g.state == "active"), None)
            chosen = active
            if generation is not None and (active is None or generation != active.generation):
                chosen = next((g for g in generations if g.generation == generation and g.state == "retiring"), None)
                if chosen is None or chosen.retire_at is None:
                    raise RotationError(
                        f"zone {self._name}: CA generation {generation} is not retiring; it cannot sign"
                    )
                ttl = min(ttl, chosen.retire_at - dt.datetime.now(dt.UTC))
                if ttl <= dt.timedelta(0):
                    raise RotationError(f"zone {self._name}: CA generation {generation} is retired; it cannot sign")
            authority = self._load(chosen.directory if chosen else LEGACY_CA_DIRECTORY)
            svid = authority.issue(spiffe_id, ttl, dns_names)
            if chosen is not None and chosen is active:
                store.record_svid_ttl(chosen.generation, int(ttl.total_seconds()) + 1)
        return svid

    def rotate(
        self,
        overlap: dt.timedelta | None = None,
        now: dt.datetime | None = None,
        *,
        root_key: ec.EllipticCurvePrivateKey | None = None,
        offline_root_key: Path | None = None,
    ) -> CaGeneration:
        """Start a rotation: make a new CA and publish its root in the bundle now; it signs after ``overlap``.

        By default the new CA is a new root and intermediate, and the current CA
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
        if overlap is not None and overlap < dt.timedelta(0):
            raise RotationError(f"the rotation overlap must not be negative, got {overlap}")
        if root_key is not None and offline_root_key is not None:
            raise RotationError(
                "--root-key makes a new intermediate under the current root, --offline-root-key a new root: give one"
            )
        with self._store() as store:
            own = own_bundle(store, self._name, self._trust_domain)
        with self._store() as store:
            generations = store.ca_generations() or [self._legacy_generation()]
            busy = [generation for generation in generations if generation.state in ("published", "retiring")]
            if busy:
                raise RotationError(
                    f"zone {self._name}: a rotation is in progress (generation {busy[0].generation} is "
                    f"{busy[0].state}); let it finish ('meshfed trust list --dir ...' shows when), or end it "
                    "now with 'meshfed trust rotate --finish' (or drop a CA not signing yet with --abort)"
                )
            active = next(generation for generation in generations if generation.state == "active")
            number = max(generation.generation for generation in generations) + 1
            directory = f"{GENERATIONS_DIRECTORY}/{number}"
            if root_key is not None:
                current = self._load(active.directory)
                # A zone that keeps its root key here keeps it beside the new intermediate too (the old
                # generation's copy goes when it retires).
                new = write_intermediate(
                    self._directory / directory,
                    self._trust_domain,
                    current.root,
                    root_key,
                    number,
                    keep_root_key=not self.root_key_offline(),
                )
                overlap = overlap if overlap is not None else dt.timedelta(0)
            else:
                if offline_root_key is None and self.root_key_offline():
                    raise RotationError(
                        f"zone {self._name} keeps its root key offline: give it with --root-key FILE to make a new "
                        "intermediate under the current root, or rotate to a new root whose key goes to a new "
                        "file with --offline-root-key FILE"
                    )
                if offline_root_key is not None:
                    offline_root_key = offline_key_path(offline_root_key, self._directory)
                new = write_authority(self._directory / directory, self._trust_domain, number, offline_root_key)
                overlap = (
                    overlap
                    if overlap is not None
                    else own.refresh_hint_seconds * ROTATION_OVERLAP_REFRESH_HINTS * _SECOND
                )
            generation = CaGeneration(
                number, directory, fingerprint(new.root), "published", now, activate_at=now + overlap
            )
            with store.atomic():
                for existing in generations:
                    store.put_ca_generation(existing)
                store.put_ca_generation(generation)
                store.put_bundle(own.with_roots([new.root]), source="self")
        return generation

    def finish(self, now: dt.datetime | None = None) -> list[RotationStep]:
        """End the rotation in progress now: the published CA signs at once, every older root leaves the bundle.

        For an emergency (an old key compromised): SVIDs the old CA signed stop
        verifying at once, and consumers that have not fetched the new root
        cannot verify this zone until they do.
        """
        now = now or dt.datetime.now(dt.UTC)
        steps: list[RotationStep] = []
        with self._store() as store, store.atomic():
            generations = store.ca_generations()
            if not any(g.state in ("published", "retiring") for g in generations):
                raise RotationError(f"zone {self._name}: no rotation is in progress; nothing to finish")
            own = own_bundle(store, self._name, self._trust_domain)
            published = next((g for g in generations if g.state == "published"), None)
            for old in generations:
                retire = old.state == "retiring" or (published is not None and old.state == "active")
                if retire:
                    store.put_ca_generation(replace(old, state="retired", retire_at=now))
                    own = _without_root(own, old, generations)
                    steps.append(
                        RotationStep(
                            old.generation,
                            "retired",
                            f"root {old.root_fingerprint[:16]} retired early: it stops signing and verifying now "
                            f"(bundle sequence {own.sequence})",
                        )
                    )
            if published is not None:
                store.put_ca_generation(replace(published, state="active", activate_at=now))
                steps.append(
                    RotationStep(published.generation, "active", f"root {published.root_fingerprint[:16]} now signs")
                )
            store.put_bundle(own, source="self")
        self._delete_retired_keys()
        return steps

    def abort(self, now: dt.datetime | None = None) -> list[RotationStep]:
        """Drop the CA a rotation published before it signs: its root leaves the bundle, its keys go."""
        now = now or dt.datetime.now(dt.UTC)
        steps: list[RotationStep] = []
        with self._store() as store, store.atomic():
            generations = store.ca_generations()
            published = next((g for g in generations if g.state == "published"), None)
            if published is None:
                retiring = next((g for g in generations if g.state == "retiring"), None)
                if retiring is not None:
                    active = next(g for g in generations if g.state == "active")
                    raise RotationError(
                        f"zone {self._name}: CA generation {active.generation} already signs, so the rotation can no "
                        "longer be aborted; let it finish, or end it now with 'meshfed trust rotate --finish'"
                    )
                raise RotationError(f"zone {self._name}: no rotation is in progress; nothing to abort")
            own = _without_root(own_bundle(store, self._name, self._trust_domain), published, generations)
            store.put_ca_generation(replace(published, state="retired", retire_at=now))
            store.put_bundle(own, source="self")
            steps.append(
                RotationStep(
                    published.generation,
                    "retired",
                    f"aborted: root {published.root_fingerprint[:16]} never signed; removed from the bundle "
                    f"(sequence {own.sequence}) and its keys deleted",
                )
            )
        self._delete_retired_keys()
        return steps

    def _delete_retired_keys(self) -> None:
        for old in self.generations():
            if old.state == "retired":
                delete_keys(self._directory / old.directory)

    def advance(self, now: dt.datetime | None = None) -> list[RotationStep]:
        """Move every due phase of a rotation on; idempotent, safe to call at any time from any process."""
        now = now or dt.datetime.now(dt.UTC)
        steps: list[RotationStep] = []
        with self._store() as store, store.atomic():
            generations = store.ca_generations()
            own = own_bundle(store, self._name, self._trust_domain)
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
                    own = _without_root(own, old, store.ca_generations())
                    steps.append(
                        RotationStep(
                            old.generation,
                            "retired",
                            f"root {old.root_fingerprint[:16]} removed from the bundle (sequence {own.sequence})",
                        )
                    )
            if steps:
                store.put_bundle(own, source="self")
        self._delete_retired_keys()
        return steps

    def next_deadline(self) -> dt.datetime | None:
        """When :meth:`advance` next has something to do, if a rotation is in progress."""
        deadlines = [
            generation.activate_at if generation.state == "published" else generation.retire_at
            for generation in self.generations()
            if generation.state in ("published", "retiring")
        ]
        return min((deadline for deadline in deadlines if deadline is not None), default=None)

    def _legacy_generation(self) -> CaGeneration:
        # A zone made before rotation existed: its SVIDs' TTLs were never recorded, so
        # assume the default lifetime as a floor for how long its root must stay trusted.
        authority = self._load(LEGACY_CA_DIRECTORY)
        return first_generation(authority, longest_svid_ttl=_ASSUMED_SVID_TTL)


def _without_root(own: TrustBundle, leaving: CaGeneration, generations: Sequence[CaGeneration]) -> TrustBundle:
    """``own`` without ``leaving``'s root, unless another generation still in use shares it (an intermediate
    rotation keeps the root)."""
    shared = any(
        g.generation != leaving.generation
        and g.root_fingerprint == leaving.root_fingerprint
        and g.state in ("published", "active", "retiring")
        for g in generations
    )
    return own if shared else own.without_roots([leaving.root_fingerprint])
