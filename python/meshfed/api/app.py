"""The zone's HTTP API: FastAPI under ``/v1/``, plus health, readiness and metrics.

``create_app(controller)`` returns an app whose lifespan starts and stops the
controller (and with it the gateway and background services), so one uvicorn
process is one running zone. Reads of the zone's topology need its read or
admin token and changes its admin token (``api/auth.py``); health, readiness,
metrics and the zone's own bundle are open. ``create_health_app(controller)``
serves only those open routes, for ``meshfed up --metrics-address``: probes and
Prometheus reach them on the pod network while the API itself stays on
loopback or behind TLS. Its ``controller`` is asked for at each request: a
process that follows its zone's leader has none yet (alive, not ready).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from meshfed import __version__, _core
from meshfed.api import authz as authz_api
from meshfed.api import catalog as catalog_api
from meshfed.api import limits
from meshfed.api import peering as peering_api
from meshfed.api import status as status_api
from meshfed.api import trust as trust_api
from meshfed.api.auth import audit_call, require_admin, require_reader
from meshfed.controller import Controller
from meshfed.federation.service import PeeringService

_REDACTED = "<redacted>"


class ZoneInfo(BaseModel):
    name: str
    trust_domain: str
    version: str
    core_version: str
    gateway_address: str


def create_app(controller: Controller, peering: PeeringService | None = None) -> FastAPI:
    """The API of one zone; its lifespan owns ``controller`` (and the services added to it)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # `meshfed up` starts the controller before serving, so that a start-up
        # failure is one clear line rather than a server traceback.
        if not controller.ready:
            await controller.start()
        try:
            yield
        finally:
            await controller.stop()

    app = FastAPI(
        title="meshfed zone API",
        version=__version__,
        lifespan=lifespan,
        description="Federation API of one meshfed zone. Reads need the zone's read token (read-token) or "
        "its admin token; mutating calls need the admin token. /healthz, /readyz, /metrics and "
        "GET /v1/trust/bundle are open.",
    )
    limits.install(app)
    app.state.controller = controller
    app.state.peering = peering
    app.state.admin_token = controller.zone.admin_token()
    app.state.read_token = controller.zone.read_token()
    app.include_router(catalog_api.router)
    app.include_router(trust_api.router)
    app.include_router(peering_api.router)
    app.include_router(authz_api.router)
    app.include_router(status_api.router)
    _add_open_routes(app, lambda: controller)

    @app.get("/v1/zone", tags=["zone"], dependencies=[Depends(require_reader)])
    def zone_info() -> ZoneInfo:
        zone = controller.zone
        return ZoneInfo(
            name=zone.name,
            trust_domain=str(zone.trust_domain),
            version=__version__,
            core_version=_core.core_version(),
            gateway_address=controller.gateway_address,
        )

    @app.get("/v1/gateway/stats", tags=["gateway"], dependencies=[Depends(require_reader)])
    def gateway_stats() -> dict[str, Any]:
        """Counters of every gateway listener, with the identities of the callers it verified."""
        return controller.gateway_stats()

    @app.get(
        "/v1/gateway/config",
        tags=["gateway"],
        dependencies=[Depends(require_admin)],
        responses={503: {"description": "The gateway has not been configured yet"}},
    )
    async def gateway_config() -> dict[str, Any]:
        """The config the gateway runs (the last one it accepted), with its private key redacted.

        Reading it changes nothing: it is not rebuilt, and no egress port is given out.
        """
        applied = controller.applied_gateway_config  # read on the event loop that owns it
        if applied is None:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"zone {controller.zone.name}: the gateway has not been configured yet; "
                "it gets its first config when the controller starts",
            )
        document = await asyncio.to_thread(applied.model_dump, exclude_none=True)  # large with many imports
        if "identity" in document:
            document["identity"]["private_key_pem"] = _REDACTED
        return document

    @app.post(
        "/v1/gateway/reconfigure",
        tags=["gateway"],
        status_code=status.HTTP_204_NO_CONTENT,
        dependencies=[Depends(require_admin)],
    )
    async def reconfigure(request: Request) -> Response:
        """Rebuild the gateway config from the zone's state and apply it now."""
        await controller.reconfigure()
        audit_call(request, controller.zone.directory, "gateway.reconfigure", f"zone {controller.zone.name}")
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    return app


class HealthServer(uvicorn.Server):
    """A health and metrics listener's server: it leaves signals to its owner, which stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def create_health_app(controller: Callable[[], Controller | None], *, follower_ready: bool = False) -> FastAPI:
    """Only ``/healthz``, ``/readyz`` and ``/metrics`` of ``controller``: no token, no topology, no lifespan.

    Served beside the API (``meshfed up --metrics-address``) on its own port, so
    that kubelet probes and Prometheus need neither the API's TLS nor a token,
    and a NetworkPolicy can admit monitoring to metrics without admitting it to the API.
    """
    app = FastAPI(title="meshfed zone health", version=__version__, openapi_url=None, docs_url=None, redoc_url=None)
    _add_open_routes(app, controller, follower_ready=follower_ready)
    return app


def _add_open_routes(app: FastAPI, current: Callable[[], Controller | None], *, follower_ready: bool = False) -> None:
    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "The zone is still starting"}})
    def readyz() -> JSONResponse:
        """The gateway serves and every background service has started (503 until then).

        ``status`` is ``degraded`` (still 200: the gateway serves) when a
        background component crashed and waits to restart, the catalog cannot
        be read, imports cannot be published into it, or a peer's imports are
        withheld; ``problems`` says what, one line each. ``components`` is every
        background component with its state, restarts and readiness. A process
        that follows its zone's leader answers ``following``: 503, or 200 when
        Services select the leader by its pod's label (``--leader-pod``).
        """
        controller = current()
        if controller is None:
            code = status.HTTP_200_OK if follower_ready else status.HTTP_503_SERVICE_UNAVAILABLE
            return JSONResponse({"status": "following"}, status_code=code)
        if not controller.ready:
            return JSONResponse({"status": "starting"}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
        problems = controller.problems()
        components = [dataclasses.asdict(component) for component in controller.supervisor.statuses()]
        return JSONResponse(
            {"status": "degraded" if problems else "ready", "problems": problems, "components": components}
        )

    @app.get("/metrics", tags=["health"], response_class=Response)
    def metrics() -> Response:
        """Prometheus text exposition of the zone's OpenTelemetry metrics (none while following)."""
        controller = current()
        text = "" if controller is None else controller.telemetry.render()
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")
