"""Peer exports: what each peer is told of this zone, and where peers reach its ingress.

A peer is told the exports of the config the gateway runs (never of one it
has not accepted yet, nor before that config's ingress admits the peer's
trust domain: it would refuse the peer's calls to what it is told of), with
the gateway's verdict on local endpoints. Peers ask
once per update, and a large catalog makes a snapshot costly to rebuild: so
each peer's is built once per applied config and health change, and kept.
While the catalog is unexpectedly empty, peers are held to what they last heard.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from meshfed.addresses import HostPort
from meshfed.federation.exchange import ServiceSnapshot
from meshfed.federation.exports import ExportedCatalog
from meshfed.federation.gateway_config import INGRESS_LISTENER
from meshfed.zone import Zone

from .catalog_watch import CatalogWatch
from .gateway_driver import GatewayDriver
from .local_health import LocalHealth


class PeerExports:
    """One snapshot per peer of what it may see; ``advertise`` is where peers reach the ingress (default: its bind)."""

    def __init__(
        self,
        zone: Zone,
        driver: GatewayDriver,
        health: LocalHealth,
        catalog: CatalogWatch,
        *,
        advertise: Sequence[str],
    ) -> None:
        self._zone = zone
        self._driver = driver
        self._health = health
        self._catalog = catalog
        self._advertise = list(advertise)
        # What each peer was last told, per applied generation.
        self._snapshots: dict[str, ServiceSnapshot] = {}
        self._admitted: frozenset[str] = frozenset()

    def changed(self) -> bool:
        """A config was applied, or the health verdict changed: build each peer's snapshot again when it asks.

        True when the applied config admits other peers than before: they must be asked again.
        """
        self._snapshots = {}
        admitted, self._admitted = self._admitted, self._driver.applied_exports.admitted
        return admitted != self._admitted

    def for_peer(self, peer: str) -> ServiceSnapshot | None:
        """What the peering stream sends ``peer``: its :meth:`snapshot`, once the ingress admits it (else None)."""
        if peer not in self._driver.applied_exports.admitted:
            return None
        return self.snapshot(peer)

    def snapshot(self, peer: str) -> ServiceSnapshot:
        """What ``peer`` may see of this zone: the exports of the config the gateway runs now."""
        held = self._catalog.held_for(peer)
        if held is not None:
            return held
        cached = self._snapshots.get(peer)
        if cached is not None:
            return cached
        applied = self._driver.applied_exports
        if applied.exported is None:  # the config before the first build: nothing is exported yet
            applied = dataclasses.replace(applied, exported=ExportedCatalog(applied.catalog, applied.index))
        assert applied.exported is not None
        snapshot = applied.exported.snapshot(
            zone=self._zone.name,
            trust_domain=str(self._zone.trust_domain),
            gateway_addresses=self.advertised_gateway_addresses(),
            peer=peer,
            rules_version=applied.rules_version,
            health_version=self._health.version,
            unhealthy=self._health.unhealthy,
        )
        self._snapshots[peer] = snapshot
        return snapshot

    def advertised_gateway_addresses(self) -> list[str]:
        """Where peers reach this zone's ingress."""
        if self._advertise:
            return list(self._advertise)
        host, port = self._driver.gateway.address(INGRESS_LISTENER)
        # A wildcard bind is reachable on loopback at least; real deployments set gateway_advertise.
        return [str(HostPort("127.0.0.1" if host in ("0.0.0.0", "::") else host, port))]  # noqa: S104 -- compares
