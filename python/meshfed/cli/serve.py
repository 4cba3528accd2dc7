"""``meshfed up``: one zone's controller, services and API in the foreground.

The order is what makes failures one line: the zone lock first (a second
``meshfed up`` of the zone is refused before it binds anything), then a check
that every fixed port binds, then the API socket, then the controller and its
services. A listener that still fails to bind (another process took the port
in between) fails the start; its error is translated here into the same one
line naming the address and the flag that set it, whichever component raised it.

SIGTERM at any moment stops the zone cleanly and exits 0: the handler is the
first thing ``serve_zone`` installs (a SIGTERM that came while Python imported
the CLI was recorded by ``meshfed.cli._signals`` and counts too); before the
API serves, a stop skips what has not started yet; once it serves, uvicorn
takes the signal and drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from meshfed import defaults
from meshfed.addresses import HostPort
from meshfed.api.app import HealthServer, create_health_app
from meshfed.cli import _signals
from meshfed.cli.remote import API_URL_FILE
from meshfed.controller import Controller
from meshfed.errors import CatalogError, GatewayConfigError, GatewayError, MeshfedError, PeeringError, TrustError
from meshfed.leadership import (
    Campaign,
    ConsulLockElector,
    LeadershipLostError,
    LeaseElector,
    LeaseSettings,
    LockSettings,
)
from meshfed.leadership.pod_label import LEADER_LABEL, PodLabel
from meshfed.logs import configure_logging
from meshfed.replica import SecretReplica
from meshfed.runtime import (
    ZoneRuntime,
    ZoneSettings,
    assemble_zone,
    check_settings,
    raise_open_file_limit,
    tune_garbage_collector,
)
from meshfed.zone import Zone
from meshfed.zone.tokens import install_token_files
from meshfed.zonelock import LOCK_FILE, hold_zone_lock, mark_following

if TYPE_CHECKING:
    from meshfed.catalog.consul_api import ConsulApi
    from meshfed.catalog.kubernetes_api import KubernetesApi
    from meshfed.gateway.config import GatewayConfig

log = logging.getLogger(__name__)

# What the peering service's PeeringError says when grpc cannot bind one of its ports.
_PEERING_BIND_FAILED = "cannot listen on"
# The gateway's bind error starts with the listener's name; each kind of listener is set by its own flags.
_GATEWAY_LISTENER_FLAGS = (
    ('listener "ingress"', "--gateway-address"),
    ('listener "egress:', "--egress-host/--egress-port-base"),
    ('listener "failover:', "--egress-host/--egress-port-base"),
)
_BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


@dataclass(frozen=True)
class ApiTls:
    """``--api-tls-cert`` and ``--api-tls-key``: the API serves HTTPS with this certificate (e.g. from cert-manager)."""

    cert: Path
    key: Path

    def check(self) -> None:
        """Load the pair once now, so that a bad file is one line before anything binds, not a server traceback."""
        for path in (self.cert, self.key):
            if not path.is_file():
                raise MeshfedError(f"--api-tls-cert/--api-tls-key: {path}: no such file")
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as err:
            raise MeshfedError(
                f"--api-tls-cert {self.cert} / --api-tls-key {self.key}: cannot load them ({err}); "
                "give a PEM certificate chain and its unencrypted PEM private key"
            ) from None

    def uvicorn_options(self) -> dict[str, Any]:
        return {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key)}


@dataclass(frozen=True)
class Listeners:
    """What ``meshfed up`` binds, as parsed from the flags, so that a failure names its flag."""

    api: HostPort
    gateway: HostPort
    gateway_flag: str  # --gateway-address, or the zone.toml key it defaulted from
    peering: HostPort
    establish: HostPort
    bundle_endpoint_port: int | None
    # --metrics-address: /healthz, /readyz and /metrics alone, in plain HTTP, for probes and Prometheus.
    metrics: HostPort | None = None
    api_tls: ApiTls | None = None
    # --bundle-endpoint-address sets both host and port; --bundle-endpoint-port the port on every interface.
    bundle_endpoint_host: str = defaults.BUNDLE_ENDPOINT_HOST
    bundle_endpoint_flag: str = "--bundle-endpoint-port"

    @property
    def bundle_endpoint(self) -> HostPort | None:
        if self.bundle_endpoint_port is None:
            return None
        return HostPort(self.bundle_endpoint_host, self.bundle_endpoint_port)

    def fixed(self) -> list[tuple[str, HostPort]]:
        """(flag, address) of every listener with a fixed port; port 0 always binds."""
        listeners = [
            ("--api-address", self.api),
            (self.gateway_flag, self.gateway),
            ("--peering-address", self.peering),
            ("--establish-address", self.establish),
        ]
        if self.bundle_endpoint is not None:
            listeners.append((self.bundle_endpoint_flag, self.bundle_endpoint))
        if self.metrics is not None:
            listeners.append(("--metrics-address", self.metrics))
        return [(flag, address) for flag, address in listeners if address.port != 0]


class _Stop:
    """The SIGTERM handler of ``meshfed up``: asks the API's server to stop, or, before there is one, the start."""

    def __init__(self) -> None:
        self.requested = False
        self.server: uvicorn.Server | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.end()

    def end(self) -> None:
        """Stop: the start where it is, or the API's server (which drains)."""
        self.requested = True
        if self.server is not None:
            self.server.should_exit = True

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self)
        # A SIGTERM that came while the CLI was still being imported.
        self.requested = self.requested or signal.SIGTERM in _signals.received


def serve_zone(zone: Zone, settings: ZoneSettings, listeners: Listeners, *, log_level: str, json_logs: bool) -> None:
    """Lock the zone, start it (errors surface as one line), then serve the API until a signal.

    ``listeners`` are the parsed flags behind ``settings``' addresses. A SIGTERM
    before the API serves stops the start where it is, cleanly: this returns.
    """
    stop = _Stop()
    stop.install()
    with hold_zone_lock(zone.directory, zone.name):
        if stop.requested:
            return
        check_settings(zone, settings)
        if listeners.api_tls is not None:
            listeners.api_tls.check()
        if settings.bundle_endpoint_web is not None:
            settings.bundle_endpoint_web.check()
        # Before anything starts: grpc would log its own line for a taken port, and the
        # gateway would briefly serve before a later listener failed.
        for flag, address in listeners.fixed():
            bind_listener(address, flag).close()
        configure_logging(log_level, json=json_logs)
        raise_open_file_limit()
        tune_garbage_collector()
        # Held from here: a taken API port must not let the zone come up and peer first.
        with bind_listener(listeners.api, "--api-address") as api_socket, _bind_metrics(listeners) as metrics_socket:
            if stop.requested:
                return
            asyncio.run(_serve(zone, settings, listeners, api_socket, log_level, stop, metrics_socket))


async def _serve(
    zone: Zone,
    settings: ZoneSettings,
    listeners: Listeners,
    api_socket: socket.socket,
    log_level: str,
    stop: _Stop,
    metrics_socket: socket.socket | None = None,
) -> None:
    campaigning = settings.leader is not None
    assembled: list[ZoneRuntime] = []  # the zone, once this process leads and has its state

    def controller() -> Controller | None:
        return assembled[0].controller if assembled else None

    # A follower answers /healthz (alive) and /readyz 503 (not serving) while it waits to lead.
    health = (
        _serve_health(zone.name, controller, listeners, metrics_socket, log_level, settings.leader_pod is not None)
        if campaigning
        else contextlib.nullcontext()
    )
    async with (
        health,
        _leading(zone, settings, stop, controller) as lost,
        _replicated(zone, settings, stop, lost, controller) as (current, replica_problems),
    ):
        if stop.requested:
            return
        # After the restore: the deployer's tokens win over those an older process published.
        for name in install_token_files(current.directory, settings.token_files):
            log.info("zone %s: %s replaced by the one the deployer gave", current.name, name)
        runtime = assemble_zone(current, settings)
        for source in replica_problems:
            runtime.controller.add_problem_source(source)
        assembled.append(runtime)
        tls = listeners.api_tls.uvicorn_options() if listeners.api_tls is not None else {}
        config = uvicorn.Config(runtime.app(), log_level=log_level, access_log=False, log_config=None, **tls)
        server = uvicorn.Server(config)
        # A SIGTERM while the controller starts stops it as soon as it has. Once serving, uvicorn takes the
        # signal, drains, then re-raises it to `stop`: a drained shutdown exits 0, as orchestrators expect.
        stop.server = server
        if stop.requested:
            return
        await _serve_led(
            current,
            runtime,
            listeners,
            api_socket,
            config,
            server,
            stop,
            metrics_socket if not campaigning else None,
            log_level,
        )
    if lost:
        raise MeshfedError(lost[0])


@contextlib.asynccontextmanager
async def _leading(
    zone: Zone, settings: ZoneSettings, stop: _Stop, controller: Callable[[], Controller | None]
) -> AsyncIterator[list[str]]:
    """Lead the zone (``--leader-lease``, ``--leader-lock``) for the block: campaign first, following meanwhile.

    Yields a list that holds why leadership was lost, if it was: the API is told to exit then, and
    the process exits non-zero so that its orchestrator restarts it as a follower. Without an election,
    the block simply runs. With ``--leader-pod`` the pod is labelled a follower first, the leader once
    ``controller()`` is ready, and a follower again at the end (:mod:`meshfed.leadership.pod_label`).
    """
    lost: list[str] = []
    if settings.leader is None:
        yield lost
        return
    label: PodLabel | None = None
    if settings.leader_pod is not None:
        label_api = await _kubernetes_api(zone, "--leader-pod")
        label = PodLabel(label_api, settings.leader_pod)
        try:
            await label.mark(leading=False)  # before anything: a restarted leader's pod still says it leads
        except MeshfedError:
            await label_api.aclose()
            raise
    elector, close = await _elector(zone, settings.leader)
    labelling: asyncio.Task[None] | None = None
    try:
        campaign = asyncio.create_task(elector.acquire())
        mark_following(zone.directory / LOCK_FILE, following=True)  # the CLI's changes go to the leader
        try:
            while not campaign.done():  # a SIGTERM ends a follower's wait
                if stop.requested:
                    campaign.cancel()
                    break
                await asyncio.wait({campaign}, timeout=0.2)
        finally:
            mark_following(zone.directory / LOCK_FILE, following=False)
        if campaign.cancelled():
            yield lost
            return
        campaign.result()

        def ended(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and isinstance(task.exception(), LeadershipLostError):
                lost.append(str(task.exception()))
                log.error("zone %s: %s", zone.name, lost[0])
                stop.end()

        holding = asyncio.create_task(elector.hold())
        holding.add_done_callback(ended)
        if label is not None:
            labelling = asyncio.create_task(_label_when_ready(zone, label, controller), name="leader-pod-label")
        try:
            yield lost
        finally:
            holding.cancel()
            with contextlib.suppress(asyncio.CancelledError, LeadershipLostError):
                await holding
    finally:
        if label is not None:
            if labelling is not None:
                labelling.cancel()
                with contextlib.suppress(asyncio.CancelledError, MeshfedError):
                    await labelling
            try:
                await label.mark(leading=False)  # Services stop sending it traffic before the Lease is free
            except MeshfedError as err:
                log.warning("zone %s: %s", zone.name, err)
            await label_api.aclose()
        await elector.release()
        await close()


async def _label_when_ready(zone: Zone, label: PodLabel, controller: Callable[[], Controller | None]) -> None:
    """Label the pod the leader once the zone it leads is ready: Services then send it traffic it can serve."""
    while (current := controller()) is None or not current.ready:
        await asyncio.sleep(0.2)
    while True:
        try:
            await label.mark(leading=True)
        except MeshfedError as err:
            log.error("zone %s: %s; Services send this leader no traffic until it is labelled", zone.name, err)
            await asyncio.sleep(2)
            continue
        log.info("zone %s: %s labelled %s=true: Services send it traffic", zone.name, label.pod, LEADER_LABEL)
        return


async def _elector(zone: Zone, leader: LeaseSettings | LockSettings) -> tuple[Campaign, Callable[[], Awaitable[None]]]:
    """The candidate for ``leader`` over the zone's own platform client, and how to close that client."""
    if isinstance(leader, LockSettings):
        consul = _consul_api(zone)
        return ConsulLockElector(consul, leader), consul.aclose
    api = await _kubernetes_api(zone, "--leader-lease")
    return LeaseElector(api, leader), api.aclose


@contextlib.asynccontextmanager
async def _replicated(
    zone: Zone, settings: ZoneSettings, stop: _Stop, lost: list[str], controller: Callable[[], Controller | None]
) -> AsyncIterator[tuple[Zone, list[Callable[[], str]]]]:
    """The zone with its state brought together with its replica (``--state-secret``, ``--state-kv``), published
    while the block runs and once more at its end; without a replica, the zone as it is. With ``--gateway-feed``,
    each config ``controller()``'s gateway applies is published too, for gateway replicas. Yields the zone and
    what to ask for the publications' problems (for its /readyz).

    Runs while leading: restoring the replica is what makes a new leader the zone. A publication refused
    because another process published (the fence of :mod:`meshfed.replica.replicator`) ends the block as a
    lost leadership does.
    """
    if settings.replica is None or stop.requested:
        yield zone, []
        return
    from meshfed.replica.gateway_feed import FeedPublisher
    from meshfed.replica.manifest import ReplicaError
    from meshfed.replica.replicator import ReplicaConflictError, StateReplica
    from meshfed.replica.stores import feed_store, replica_store

    client: KubernetesApi | ConsulApi
    if isinstance(settings.replica, SecretReplica):
        api = await _kubernetes_api(zone, "--state-secret")
        client, close = api, api.aclose
    else:
        consul = _consul_api(zone)
        client, close = consul, consul.aclose
    store = replica_store(settings.replica, client)
    writer = settings.leader.identity if settings.leader is not None else f"{socket.gethostname()}-{os.getpid()}"
    replica = StateReplica(store, zone.directory, zone=zone.name, trust_domain=str(zone.trust_domain), writer=writer)
    feed = (
        FeedPublisher(
            feed_store(settings.replica, client), zone=zone.name, trust_domain=str(zone.trust_domain), writer=writer
        )
        if settings.gateway_feed
        else None
    )
    try:
        log.info("zone %s: %s", zone.name, await replica.start())
        try:
            if swept := await replica.sweep():
                log.info("zone %s: %s: deleted %d pieces no manifest names", zone.name, replica.where, swept)
        except ReplicaError as err:
            log.warning("zone %s: cannot sweep its replica: %s", zone.name, err)

        def ended(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and isinstance(task.exception(), ReplicaConflictError):
                lost.append(str(task.exception()))
                log.error("zone %s: %s", zone.name, lost[-1])
                stop.end()

        publishing = asyncio.create_task(
            replica.keep_published(defaults.STATE_REPLICA_INTERVAL.total_seconds()), name="state-replica"
        )
        publishing.add_done_callback(ended)
        feeding: asyncio.Task[None] | None = None
        if feed is not None:
            await feed.start()

            def applied() -> GatewayConfig | None:
                current = controller()
                return None if current is None else current.applied_gateway_config

            feeding = asyncio.create_task(
                feed.keep_published(applied, defaults.GATEWAY_FEED_INTERVAL), name="gateway-feed"
            )
            feeding.add_done_callback(ended)
            log.info("zone %s: publishing its gateway config to %s for gateway replicas", zone.name, feed.where)
        problems = [lambda: f"state replica: {replica.problem}" if replica.problem else ""]
        if feed is not None:
            problems.append(lambda: f"gateway feed: {feed.problem}" if feed.problem else "")
        try:
            yield Zone.open(zone.directory), problems  # as restored
        finally:
            for task in (publishing, feeding):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, ReplicaError):
                        await task
            if not lost:
                try:
                    await replica.publish()  # what the zone wrote while it stopped
                except ReplicaError as err:
                    log.warning("zone %s: its last changes were not published: %s", zone.name, err)
    finally:
        await close()


def _consul_api(zone: Zone) -> ConsulApi:
    """The zone's [consul] settings, as its catalog reads them (else the local agent)."""
    from meshfed.catalog.consul_api import ConsulApi  # the Consul client: only for a campaign or a replica
    from meshfed.catalog.settings import ConsulSettings

    return ConsulApi(zone.config.consul or ConsulSettings(), node=f"meshfed-{zone.name}", blocking_wait=10.0)


async def _kubernetes_api(zone: Zone, flag: str) -> KubernetesApi:
    """A client with the zone's [kubernetes] credentials; else $KUBECONFIG, else the pod's service account."""
    from meshfed.catalog.kubernetes_api import KubernetesApi  # the Kubernetes client: only when asked for
    from meshfed.catalog.settings import KubernetesSettings

    api = KubernetesApi(zone.config.kubernetes or KubernetesSettings(kubeconfig=os.environ.get("KUBECONFIG")))
    try:
        await api.connect()
    except CatalogError as err:
        raise MeshfedError(f"{flag}: {err}") from None
    return api


async def _serve_led(
    zone: Zone,
    runtime: ZoneRuntime,
    listeners: Listeners,
    api_socket: socket.socket,
    config: uvicorn.Config,
    server: uvicorn.Server,
    stop: _Stop,
    metrics_socket: socket.socket | None,
    log_level: str,
) -> None:
    await start_runtime(runtime, listeners)
    try:
        if stop.requested:
            log.info("zone %s: stopped (SIGTERM) before the API served", zone.name)
            return
        try:
            # Listening from here: a client that reads the line below and connects is served.
            api_socket.listen(config.backlog)
        except OSError as err:
            raise MeshfedError(_cannot_listen("--api-address", listeners.api, err)) from None
        async with _serve_health(zone.name, lambda: runtime.controller, listeners, metrics_socket, log_level):
            host, port = api_socket.getsockname()[:2]
            scheme = "https" if listeners.api_tls is not None else "http"
            # Where `meshfed status` and `explain` find this process: a wildcard bind answers on loopback.
            # Written before the line below, so whoever reads that line finds the file.
            local = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104 -- compares
            recorded = zone.directory / API_URL_FILE
            recorded.write_text(f"{scheme}://{HostPort(local, port)}\n")
            log.info("zone %s: API on %s://%s", zone.name, scheme, HostPort(host, port))
            try:
                await server.serve(sockets=[api_socket])
            finally:
                recorded.unlink(missing_ok=True)
        if not server.started and not server.should_exit:
            raise MeshfedError(f"the API could not serve on {listeners.api}; see the log above (--api-address)")
    finally:
        await runtime.controller.stop()


@contextlib.asynccontextmanager
async def _serve_health(
    zone_name: str,
    controller: Callable[[], Controller | None],
    listeners: Listeners,
    metrics_socket: socket.socket | None,
    log_level: str,
    follower_ready: bool = False,
) -> AsyncIterator[None]:
    """Serve ``/healthz``, ``/readyz`` and ``/metrics`` of ``controller()`` (None: a follower's, ready when
    ``follower_ready``) on ``metrics_socket`` for the block."""
    if metrics_socket is None or listeners.metrics is None:
        yield
        return
    config = uvicorn.Config(
        create_health_app(controller, follower_ready=follower_ready),
        log_level=log_level,
        access_log=False,
        log_config=None,
        lifespan="off",
    )
    try:
        metrics_socket.listen(config.backlog)
    except OSError as err:
        raise MeshfedError(_cannot_listen("--metrics-address", listeners.metrics, err)) from None
    health = HealthServer(config)
    task = asyncio.create_task(health.serve(sockets=[metrics_socket]), name="health-listener")
    host, port = metrics_socket.getsockname()[:2]
    log.info("zone %s: health and metrics on http://%s", zone_name, HostPort(host, port))
    try:
        yield
    finally:
        health.should_exit = True
        await task


def _bind_metrics(listeners: Listeners) -> contextlib.AbstractContextManager[socket.socket | None]:
    if listeners.metrics is None:
        return contextlib.nullcontext()
    return bind_listener(listeners.metrics, "--metrics-address")


async def start_runtime(runtime: ZoneRuntime, listeners: Listeners) -> None:
    """Start the controller; a listener that cannot bind becomes one line naming its address and flag."""
    try:
        await runtime.controller.start()
    except GatewayConfigError:
        raise
    except GatewayError as err:
        flag = next((flag for prefix, flag in _GATEWAY_LISTENER_FLAGS if str(err).startswith(prefix)), None)
        if flag is None or "cannot bind" not in str(err):
            raise
        raise MeshfedError(f"{flag}: {err}") from None
    except PeeringError as err:
        if _PEERING_BIND_FAILED not in str(err):
            raise
        # grpc names the address but not why: bind it once here for the OS's reason.
        flag, address = next(
            ((flag, address) for flag, address in _peering_listeners(listeners) if str(address) in str(err)),
            ("--peering-address/--establish-address", listeners.peering),
        )
        bind_listener(address, flag).close()
        raise MeshfedError(
            f"{flag} {address}: cannot listen there: grpc could not bind it (GRPC_VERBOSITY=debug)"
        ) from None
    except TrustError as err:
        # The bundle endpoint's bind failure carries the OSError (asyncio.start_server's) as its cause.
        cause = err.__cause__
        endpoint = listeners.bundle_endpoint
        if endpoint is None or not isinstance(cause, OSError) or cause.errno not in _BIND_ERRNOS:
            raise
        raise MeshfedError(_cannot_listen(listeners.bundle_endpoint_flag, endpoint, cause)) from None


def _peering_listeners(listeners: Listeners) -> tuple[tuple[str, HostPort], ...]:
    return (("--peering-address", listeners.peering), ("--establish-address", listeners.establish))


def bind_listener(address: HostPort, flag: str) -> socket.socket:
    """A TCP socket bound to ``address`` and not yet listening (connects are refused until a server runs).

    SO_REUSEADDR as every listener of a zone sets (a restart rebinds at once),
    never SO_REUSEPORT: a port another process listens on is refused.
    """
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as err:
        raise MeshfedError(f"{flag} {address}: cannot resolve {address.host}: {err.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
    except OSError as err:
        sock.close()
        raise MeshfedError(_cannot_listen(flag, address, err)) from None
    return sock


def _cannot_listen(flag: str, address: HostPort, err: OSError) -> str:
    # asyncio's bind errors repeat the address in strerror; the errno alone says why.
    code = err.errno or 0
    reason = os.strerror(code) if code in errno.errorcode else (err.strerror or str(err))
    return f"{flag} {address}: cannot listen there: {reason.lower()}; {_HINTS.get(code, _HINT)}"


_HINT = "check the address and that the port is free"
_HINTS = {
    errno.EADDRINUSE: "is another zone or program using the port? (every zone needs ports of its own)",
    errno.EACCES: "ports below 1024 need privileges (CAP_NET_BIND_SERVICE)",
    errno.EADDRNOTAVAIL: "is this IP address assigned to a local interface?",
}
