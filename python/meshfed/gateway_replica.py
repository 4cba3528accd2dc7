"""A gateway replica (``meshfed gateway``): the zone's data plane in a process of its own, without its controller.

It serves the config the zone's leader publishes (:mod:`meshfed.replica.gateway_feed`),
read every :data:`~meshfed.defaults.GATEWAY_REPLICA_POLL`. Nothing on the connection path
needs the controller: while the zone has no leader, or the feed cannot be read or is
refused, the replica keeps serving the config it applied last, and says why on
``/readyz`` (still 200: it serves) and in its log, once per problem. ``/readyz`` is 503
until the first config is applied, and again while draining: on SIGTERM the replica
stops being ready, keeps serving for the drain time (load balancers and kube-proxy stop
sending it new connections meanwhile), then closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import signal
import socket
from typing import TYPE_CHECKING, Any

import orjson
import uvicorn
from cryptography import x509
from fastapi import FastAPI, Response, status
from fastapi.responses import JSONResponse

from meshfed import __version__, defaults
from meshfed.addresses import HostPort, parse_host_port
from meshfed.api.app import HealthServer
from meshfed.clock import SYSTEM_CLOCK, Clock
from meshfed.errors import GatewayConfigError, GatewayError, MeshfedError
from meshfed.gateway.handle import Gateway
from meshfed.replica import KvReplica, SecretReplica
from meshfed.replica.gateway_feed import Feed, FeedHeader, FeedReader
from meshfed.replica.manifest import ReplicaError
from meshfed.telemetry import Telemetry

if TYPE_CHECKING:
    from meshfed.catalog.settings import ConsulSettings

log = logging.getLogger("meshfed.gateway")


@dataclasses.dataclass(frozen=True)
class FeedSource:
    """Where the leader publishes: beside ``replica``; ``consul`` is how to reach Consul for a KV replica."""

    replica: SecretReplica | KvReplica
    consul: ConsulSettings | None = None


class GatewayReplica:
    """One replica's gateway: the feed's configs applied as they come, the last one kept when one cannot be."""

    def __init__(self, reader: FeedReader, *, listen_host: str | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self._reader = reader
        self._listen_host = listen_host
        self._clock = clock
        # When the SVID of the config applied is valid: (not before, not after); None without one.
        self._svid_validity: tuple[dt.datetime, dt.datetime] | None = None
        self._gateway: Gateway | None = None
        self._telemetry: Telemetry | None = None
        self._document: bytes | None = None  # the config applied, as applied
        self.applied: FeedHeader | None = None
        """The header of the publication the gateway serves (None before the first)."""
        self.problem = ""
        """Why the last read did not apply a new config ('' when it did, or there was none new)."""
        self.draining = False

    @property
    def gateway(self) -> Gateway | None:
        return self._gateway

    async def refresh(self) -> bool:
        """Read the feed and apply what is new; True if a config was applied. A problem is kept in :attr:`problem`
        (logged when it changes) and the running config stays."""
        try:
            feed = await self._reader.read()
        except ReplicaError as err:
            return self._refused(str(err))
        if feed is None:
            return False
        try:
            await asyncio.to_thread(self._apply, feed)
        except ReplicaError as err:
            return self._refused(str(err))
        except (GatewayConfigError, GatewayError) as err:
            header = feed.header
            return self._refused(
                f"{self._reader.where}: config {header.generation} (written by {header.writer}): {err}"
            )
        if self.problem:
            log.info("gateway replica: %s: serving config %d again", self._reader.where, feed.header.generation)
        self.problem = ""
        log.info(
            "gateway replica: applied zone %s's gateway config %d from %s (written by %s at %s)",
            feed.header.zone,
            feed.header.generation,
            self._reader.where,
            feed.header.writer,
            feed.header.written_at,
        )
        return True

    async def keep_refreshed(self, every: dt.timedelta, clock: Clock = SYSTEM_CLOCK) -> None:
        while True:
            await self.refresh()
            await clock.sleep(every.total_seconds())

    def close(self) -> None:
        gateway, self._gateway = self._gateway, None
        if gateway is not None:
            gateway.close()
        if self._telemetry is not None:
            self._telemetry.shutdown()

    def readiness(self) -> tuple[int, dict[str, Any]]:
        """The ``/readyz`` answer: its status code and body."""
        if self.draining:
            return status.HTTP_503_SERVICE_UNAVAILABLE, {"status": "draining"}
        if self.applied is None:
            waiting = {"status": "waiting for a config", "problems": [self.problem] if self.problem else []}
            return status.HTTP_503_SERVICE_UNAVAILABLE, waiting
        problems = [problem for problem in (self.problem, self._svid_problem()) if problem]
        body: dict[str, Any] = {
            "status": "degraded" if problems else "ready",
            "problems": problems,
            "zone": self.applied.zone,
            "generation": self.applied.generation,
            "writer": self.applied.writer,
            "written_at": self.applied.written_at,
        }
        return status.HTTP_200_OK, body

    def _svid_problem(self) -> str:
        """What is wrong with the applied config's SVID now: expired, or near its end with no renewal in sight."""
        if self._svid_validity is None:
            return ""
        not_before, not_after = self._svid_validity
        now = self._clock.now()
        if now >= not_after:
            return (
                f"the gateway's SVID expired at {not_after.isoformat()}: peers refuse its connections; the zone's "
                f"leader publishes a renewed one to {self._reader.where} (is it running?)"
            )
        # The leader renews at half-life: past three quarters, renewals have stopped coming.
        if now >= not_before + (not_after - not_before) * 3 / 4:
            return (
                f"the gateway's SVID expires at {not_after.isoformat()} and no renewal has come (the zone's leader "
                f"renews it at half-life and publishes it to {self._reader.where}: is it running?)"
            )
        return ""

    def stop_accepting(self) -> None:
        """Close every listener; open connections go on to their end (on the config they started on)."""
        if self._gateway is None or self._document is None:
            return
        document = orjson.loads(self._document)
        document["listeners"] = []
        self._gateway.apply(orjson.dumps(document))

    def in_flight(self) -> int:
        """Connections the gateway proxies now (each counted once, on the cluster it goes to)."""
        if self._gateway is None:
            return 0
        return sum(int(cluster.get("active", 0)) for cluster in self._gateway.stats().get("clusters", {}).values())

    def metrics(self) -> bytes:
        return b"" if self._telemetry is None else self._telemetry.render()

    def _apply(self, feed: Feed) -> None:
        if self.applied is not None and feed.header.trust_domain != self.applied.trust_domain:
            raise ReplicaError(
                f"{self._reader.where} now holds a config of trust domain {feed.header.trust_domain}, not "
                f"{self.applied.trust_domain}: refused; a replica serves one zone (restart it to serve another)"
            )
        document = feed.config if self._listen_host is None else _listening_on(feed.config, self._listen_host)
        validity = _svid_validity(document)
        if self._gateway is None:
            self._gateway = Gateway(document)
            gateway = self._gateway
            self._telemetry = self._new_telemetry(feed.header.zone, gateway)
        else:
            self._gateway.apply(document)
        self.applied, self._document, self._svid_validity = feed.header, document, validity

    def _new_telemetry(self, zone: str, gateway: Gateway) -> Telemetry:
        telemetry = Telemetry(zone, gateway.stats)
        telemetry.add_gauge(
            "meshfed.gateway_replica.config_generation",
            "Generation of the zone's gateway config this replica serves (the leader counts each it publishes)",
            "{generation}",
            lambda: [] if self.applied is None else [(float(self.applied.generation), {})],
        )
        telemetry.add_gauge(
            "meshfed.gateway_replica.svid_expiry",
            "When the SVID of the config this replica serves expires, in seconds since the epoch",
            "s",
            lambda: [] if self._svid_validity is None else [(self._svid_validity[1].timestamp(), {})],
        )
        return telemetry

    def _refused(self, problem: str) -> bool:
        if self._gateway is not None:
            problem += "; serving the config applied before"
        if problem != self.problem:
            log.warning("gateway replica: %s", problem)
        self.problem = problem
        return False


def _svid_validity(config: bytes) -> tuple[dt.datetime, dt.datetime] | None:
    """When the leaf of ``config``'s identity is valid; None without one (the data plane checks it whole)."""
    try:
        chain = orjson.loads(config).get("identity", {}).get("cert_chain_pem")
        leaf = x509.load_pem_x509_certificates(chain.encode())[0] if isinstance(chain, str) else None
    except (orjson.JSONDecodeError, AttributeError, ValueError, IndexError):
        return None
    return None if leaf is None else (leaf.not_valid_before_utc, leaf.not_valid_after_utc)


def _listening_on(config: bytes, host: str) -> bytes:
    """``config`` with each listener on ``host``, its port kept (``meshfed gateway --listen-host``)."""
    try:
        document = orjson.loads(config)
        for listener in document.get("listeners", []):
            port = parse_host_port(str(listener["address"]), what="a listener's address", allow_zero=True).port
            listener["address"] = str(HostPort(host, port))
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as err:
        raise GatewayConfigError(f"gateway config rejected: its listeners' addresses do not read: {err}") from None
    return orjson.dumps(document)


def create_replica_health_app(replica: GatewayReplica) -> FastAPI:
    """``/healthz``, ``/readyz`` and ``/metrics`` of a gateway replica: no token, no topology."""
    app = FastAPI(title="meshfed gateway replica", version=__version__, openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        code, body = replica.readiness()
        return JSONResponse(body, status_code=code)

    @app.get("/metrics", response_class=Response)
    def metrics() -> Response:
        return Response(replica.metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


@dataclasses.dataclass(frozen=True)
class Drain:
    """How a replica stops: ``accepting`` for this long after the signal (not ready), then no new connections
    and up to ``finishing`` for the open ones to end."""

    accepting: dt.timedelta = defaults.GATEWAY_REPLICA_DRAIN
    finishing: dt.timedelta = defaults.GATEWAY_REPLICA_FINISH


def serve_gateway_replica(
    source: FeedSource, *, listen_host: str | None, metrics_socket: socket.socket, drain: Drain
) -> None:
    """Serve until SIGTERM or SIGINT, then drain (``drain``) and close."""
    asyncio.run(_serve(source, listen_host, metrics_socket, drain))


async def _serve(source: FeedSource, listen_host: str | None, metrics_socket: socket.socket, drain: Drain) -> None:
    client, close = await _client(source)
    try:
        from meshfed.replica.stores import feed_store

        reader = FeedReader(feed_store(source.replica, client))
        replica = GatewayReplica(reader, listen_host=listen_host)
        config = uvicorn.Config(create_replica_health_app(replica), access_log=False, log_config=None, lifespan="off")
        server = HealthServer(config)  # the signals are ours, below: drain first
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        log.info("gateway replica: serving the gateway config published in %s", reader.where)
        serving = asyncio.create_task(server.serve(sockets=[metrics_socket]), name="replica-health")
        refreshing = asyncio.create_task(
            replica.keep_refreshed(defaults.GATEWAY_REPLICA_POLL), name="gateway-feed-reader"
        )
        try:
            await stopping.wait()
            replica.draining = True
            log.info("gateway replica: stopping; accepting new connections for %s more", drain.accepting)
            await asyncio.sleep(drain.accepting.total_seconds())
            refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refreshing
            await asyncio.to_thread(replica.stop_accepting)
            open_now = replica.in_flight()
            log.info(
                "gateway replica: stopped accepting; open connections: %d, given up to %s to end",
                open_now,
                drain.finishing,
            )
            deadline = loop.time() + drain.finishing.total_seconds()
            while open_now and loop.time() < deadline:
                await asyncio.sleep(0.1)
                open_now = replica.in_flight()
            if open_now:
                log.warning("gateway replica: closing %d connections still open after %s", open_now, drain.finishing)
        finally:
            refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refreshing
            server.should_exit = True
            await serving
            await asyncio.to_thread(replica.close)
    finally:
        await close()


async def _client(source: FeedSource) -> tuple[Any, Any]:
    """The platform client for ``source`` and how to close it."""
    if isinstance(source.replica, SecretReplica):
        import os

        from meshfed.catalog.kubernetes_api import KubernetesApi
        from meshfed.catalog.settings import KubernetesSettings
        from meshfed.errors import CatalogError

        api = KubernetesApi(KubernetesSettings(kubeconfig=os.environ.get("KUBECONFIG")))
        try:
            await api.connect()
        except CatalogError as err:
            raise MeshfedError(f"--state-secret: {err}") from None
        return api, api.aclose
    from meshfed.catalog.consul_api import ConsulApi
    from meshfed.catalog.settings import ConsulSettings

    consul = ConsulApi(source.consul or ConsulSettings(), node="meshfed-gateway", blocking_wait=10.0)
    return consul, consul.aclose


__all__ = ["Drain", "FeedSource", "GatewayReplica", "create_replica_health_app", "serve_gateway_replica"]
