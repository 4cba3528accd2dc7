"""The controller: the one long-running process of a zone.

It owns the zone's gateway (the Rust data plane), keeps the gateway's SVID
fresh, turns the zone's state into a gateway config, and runs the zone's
background services (bundle pollers, rotation, peering). Every change reaches
the data plane through one path, :meth:`Controller.reconfigure`, which builds a
complete config and applies it atomically.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from meshfed.errors import MeshfedError
from meshfed.gateway import Gateway, GatewayConfig, Identity, TerminateListener
from meshfed.telemetry import Telemetry
from meshfed.trust.bundle import bundle_roots_pem
from meshfed.trust.ca import Svid
from meshfed.zone import Zone

log = logging.getLogger(__name__)

DEFAULT_GATEWAY_SVID_TTL = dt.timedelta(hours=24)
INGRESS_LISTENER = "ingress"


class Service(Protocol):
    """A background part of the controller, started after the gateway and stopped before it."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Controller:
    """Runs one zone: gateway, SVID renewal, services. Use ``async with`` or start/stop."""

    def __init__(
        self,
        zone: Zone,
        *,
        gateway_address: str | None = None,
        gateway_svid_ttl: dt.timedelta = DEFAULT_GATEWAY_SVID_TTL,
        services: Sequence[Service] = (),
    ) -> None:
        self.zone = zone
        self.gateway_address = gateway_address or zone.config.gateway_address
        self._svid_ttl = gateway_svid_ttl
        self._services = list(services)
        self._gateway: Gateway | None = None
        self._svid: Svid | None = None
        self._renewal: asyncio.Task[None] | None = None
        self._apply_lock = asyncio.Lock()
        self._stopped = False
        self.telemetry = Telemetry(zone.name, self.gateway_stats)

    async def __aenter__(self) -> Controller:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def add_service(self, service: Service) -> None:
        """Register a service before :meth:`start` (services usually need :meth:`reconfigure` first)."""
        if self.ready:
            raise MeshfedError("services must be added before the controller starts")
        self._services.append(service)

    @property
    def ready(self) -> bool:
        """True once the gateway serves and every service has started."""
        return self._gateway is not None

    @property
    def gateway(self) -> Gateway:
        if self._gateway is None:
            raise MeshfedError(f"zone {self.zone.name}: the controller is not running")
        return self._gateway

    async def start(self) -> None:
        """Start the gateway with the zone's current state, then the services."""
        if self._stopped:
            raise MeshfedError(f"zone {self.zone.name}: a stopped controller cannot restart; make a new one")
        self._svid = await asyncio.to_thread(self._issue_gateway_svid)
        config = await asyncio.to_thread(self.gateway_config)
        gateway = await asyncio.to_thread(Gateway, config)
        try:
            for service in self._services:
                await service.start()
        except BaseException:
            await asyncio.to_thread(gateway.close)
            raise
        self._gateway = gateway
        self._renewal = asyncio.create_task(self._renew_gateway_svid(), name=f"meshfed-{self.zone.name}-svid")
        log.info("zone %s running: gateway ingress on %s", self.zone.name, self.gateway_address)

    async def stop(self) -> None:
        """Stop services (newest first), SVID renewal, then the gateway. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self._renewal is not None:
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal
            self._renewal = None
        for service in reversed(self._services):
            try:
                await service.stop()
            except Exception:
                log.exception("zone %s: a service failed to stop cleanly", self.zone.name)
        if self._gateway is not None:
            await asyncio.to_thread(self._gateway.close)
            self._gateway = None
        self.telemetry.shutdown()

    async def reconfigure(self) -> None:
        """Rebuild the gateway config from the zone's state and apply it atomically.

        Serialized: concurrent callers apply one after another, each a complete
        config, so the last state always wins.
        """
        async with self._apply_lock:
            config = await asyncio.to_thread(self.gateway_config)
            await asyncio.to_thread(self.gateway.apply, config)

    def gateway_config(self) -> GatewayConfig:
        """The complete gateway config for the zone's state now."""
        if self._svid is None:
            raise MeshfedError(f"zone {self.zone.name}: no gateway SVID yet; start the controller first")
        bundles = [stored.bundle for stored in self.zone.trusted_bundles()]
        return GatewayConfig(
            identity=Identity(
                cert_chain_pem=self._svid.cert_chain_pem().decode(),
                private_key_pem=self._svid.private_key_pem().decode(),
            ),
            trust_bundles=bundle_roots_pem(bundles),
            # Default deny: the ingress routes nothing until services are exported to peers.
            listeners=[TerminateListener(name=INGRESS_LISTENER, address=self.gateway_address, routes=[])],
        )

    def gateway_stats(self) -> dict[str, Any]:
        """The gateway's counters, or none while it is not running."""
        return self._gateway.stats() if self._gateway is not None else {"listeners": {}}

    @property
    def gateway_svid(self) -> Svid | None:
        return self._svid

    def _issue_gateway_svid(self) -> Svid:
        return self.zone.issue_svid(self.zone.trust_domain.gateway_id, self._svid_ttl)

    async def _renew_gateway_svid(self) -> None:
        # Renew at half-life, as SPIRE agents do: a failed renewal leaves half the
        # lifetime to retry before peers start refusing the gateway.
        while True:
            svid = self._svid
            assert svid is not None
            lifetime = svid.leaf.not_valid_after_utc - svid.leaf.not_valid_before_utc
            renew_at = svid.leaf.not_valid_before_utc + lifetime / 2
            await asyncio.sleep(max((renew_at - dt.datetime.now(dt.UTC)).total_seconds(), 1.0))
            try:
                self._svid = await asyncio.to_thread(self._issue_gateway_svid)
                await self.reconfigure()
                log.info("zone %s: gateway SVID renewed until %s", self.zone.name, self._svid.leaf.not_valid_after_utc)
            except MeshfedError as err:
                log.error("zone %s: gateway SVID renewal failed, retrying: %s", self.zone.name, err)
