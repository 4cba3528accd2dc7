"""What a zone trusts, as held in ``state.db``: its own bundle, other domains' bundles, and its federations.

:class:`TrustStore` (``zone.trust``) owns the ``trust_bundles`` and
``federations`` tables of one zone: the bundle it publishes for its own trust
domain (whose refresh hint it sets; its roots are the CA generations',
:mod:`meshfed.zone.authority`), bundles an operator imported or a peering
brought, bundles fetched from federated endpoints, and the federation
relationships with their polls. It refuses what must not happen to a zone's
trust: importing, federating or removing the zone's own domain, or removing
what a peering brought.

Reads are served from memory: the store keeps the bundles it read last with
the table's revision (``trust_revision``, moved by a trigger on every change
in any process), so a read costs one one-row query while nothing changed —
and a write by another process or another ``Zone`` object is seen by the
next read, never a stale copy.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from meshfed.errors import InvalidBundleError, TrustError, ZoneError
from meshfed.runstate import STATE_FILE
from meshfed.store import Federation, FederationProfile, StateStore, StoredBundle
from meshfed.trust.bundle import DEFAULT_REFRESH_HINT_SECONDS, TrustBundle
from meshfed.trust.spiffe import SpiffeId, TrustDomain
from meshfed.zone.config import hint_seconds


@dataclass(frozen=True)
class RemovedTrust:
    """What :meth:`TrustStore.remove_trust` removed."""

    trust_domain: TrustDomain
    bundle: bool
    federation: bool


def own_bundle(store: StateStore, name: str, trust_domain: TrustDomain) -> TrustBundle:
    """The bundle zone ``name`` publishes for its own ``trust_domain``, read from an open ``store``."""
    stored = store.bundle(trust_domain)
    if stored is None:
        raise ZoneError(f"zone {name} has no bundle of its own in {STATE_FILE}; the zone is damaged")
    return stored.bundle


class TrustStore:
    """The trust bundles and federations of zone ``name`` (trust domain ``trust_domain``); see the module."""

    def __init__(
        self,
        name: str,
        trust_domain: TrustDomain,
        store: Callable[[], StateStore],
        *,
        configured_refresh_hint: int | None = None,
    ) -> None:
        self._name = name
        self._trust_domain = trust_domain
        self._store = store
        self._configured_refresh_hint = configured_refresh_hint
        # (revision, bundles by domain): replaced whole, never mutated, so threads share it without a lock.
        self._held: tuple[int, dict[TrustDomain, StoredBundle]] = (-1, {})

    def _bundles(self) -> dict[TrustDomain, StoredBundle]:
        with self._store() as store:
            revision = store.trust_revision()
            held_revision, held = self._held
            if revision == held_revision:
                return held
            # Read after the revision: a write in between makes the next read reread, never keeps a stale copy.
            bundles = {stored.bundle.trust_domain: stored for stored in store.bundles()}
        self._held = (revision, bundles)
        return bundles

    def own_bundle(self) -> TrustBundle:
        """The bundle this zone publishes for its own trust domain."""
        stored = self._bundles().get(self._trust_domain)
        if stored is None:
            raise ZoneError(f"zone {self._name} has no bundle of its own in {STATE_FILE}; the zone is damaged")
        return stored.bundle

    def refresh_hint(self, override: dt.timedelta | None = None) -> int:
        """The refresh hint (seconds) the zone's bundle should carry: ``override``, else zone.toml, else the default."""
        if override is not None:
            return hint_seconds(override)
        if self._configured_refresh_hint is not None:
            return self._configured_refresh_hint
        return DEFAULT_REFRESH_HINT_SECONDS

    def set_refresh_hint(self, seconds: int) -> bool:
        """Publish ``seconds`` as the bundle's refresh hint (the sequence moves on); False if it already is."""
        with self._store() as store, store.atomic():
            own = own_bundle(store, self._name, self._trust_domain)
            if own.refresh_hint_seconds == seconds:
                return False
            # A new hint is new content: consumers that compare sequences must take it.
            store.put_bundle(replace(own, refresh_hint_seconds=seconds, sequence=own.sequence + 1), source="self")
        return True

    def trusted_bundles(self) -> list[StoredBundle]:
        """Every trust domain this zone trusts, its own included, one bundle each, ordered by trust domain."""
        return sorted(self._bundles().values(), key=lambda stored: stored.bundle.trust_domain.name)

    def import_bundle(self, bundle: TrustBundle, source: Literal["import", "peering"] = "import") -> None:
        """Trust ``bundle``'s roots for its trust domain, replacing that domain's earlier bundle.

        ``source`` says who brought it: an operator (``import``) or a peering,
        whose deletion takes the bundle away again (:meth:`forget_peering_bundle`).
        """
        if bundle.trust_domain == self._trust_domain:
            raise InvalidBundleError(
                f"{bundle.trust_domain} is this zone's own trust domain; import bundles of other zones only"
            )
        with self._store() as store:
            store.put_bundle(bundle, source=source)

    def forget_peering_bundle(self, trust_domain: TrustDomain) -> bool:
        """Stop trusting a trust domain learned from a peering; bundles an operator imported stay. True if gone."""
        with self._store() as store:
            return store.delete_bundle(trust_domain, source="peering")

    def bundle_of(self, trust_domain: TrustDomain) -> TrustBundle | None:
        """The bundle held for ``trust_domain``, if any."""
        stored = self._bundles().get(trust_domain)
        return None if stored is None else stored.bundle

    def store_federated_bundle(self, bundle: TrustBundle) -> bool:
        """Store a bundle fetched from a federated endpoint (the poller has already kept the newest).

        False, storing nothing, if the relationship ended meanwhile (``trust
        remove`` while the fetch ran): a removed domain must not come back.
        """
        if bundle.trust_domain == self._trust_domain:
            raise InvalidBundleError(f"{bundle.trust_domain} is this zone's own trust domain; it cannot be federated")
        with self._store() as store, store.atomic():
            if store.federation(bundle.trust_domain) is None:
                return False
            store.put_bundle(bundle, source="federation")
        return True

    def remove_trust(self, trust_domain: TrustDomain, *, federation_only: bool = False) -> RemovedTrust:
        """Stop trusting ``trust_domain``: its bundle (imported or federated) and its federation go.

        ``federation_only`` ends just the federation (and the bundle it
        fetched; an imported bundle stays). Bundles a peering brought are
        refused here (:func:`meshfed.federation.trust_removal.remove_trust` also refuses
        a domain a live peering depends on), as is the zone's own.
        """
        if trust_domain == self._trust_domain:
            raise TrustError(
                f"{trust_domain} is this zone's own trust domain; it cannot be removed (rotate its CA instead: "
                "meshfed trust rotate)"
            )
        with self._store() as store, store.atomic():
            stored = store.bundle(trust_domain)
            if stored is not None and stored.source == "peering":
                raise TrustError(
                    f"{trust_domain} is trusted through a peering; delete the peering (meshfed peer delete) to "
                    "stop trusting it"
                )
            federation = store.delete_federation(trust_domain)
            removable = ("federation",) if federation_only else ("federation", "import")
            bundle = False
            if stored is not None and stored.source in removable:
                bundle = store.delete_bundle(trust_domain, stored.source)
        return RemovedTrust(trust_domain, bundle=bundle, federation=federation)

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
        if trust_domain == self._trust_domain:
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
        with self._store() as store, store.atomic():
            store.put_federation(federation)
            if bootstrap_bundle is not None:
                store.put_bundle(bootstrap_bundle, source="federation")
        return federation

    def federations(self) -> list[Federation]:
        """Every federation relationship of this zone."""
        with self._store() as store:
            return store.federations()

    def record_poll(self, trust_domain: TrustDomain, at: dt.datetime, error: str | None) -> None:
        """Note one poll's outcome for ``meshfed trust list``."""
        with self._store() as store:
            store.record_poll(trust_domain, at, error)
