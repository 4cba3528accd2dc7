"""``meshfed up``: run one zone in the foreground, its flags parsed and checked before anything binds.

The flags build :class:`meshfed.runtime.ZoneSettings`: the controller's
(:class:`~meshfed.controller.ControllerSettings`), the peering service's
(:class:`~meshfed.federation.settings.PeeringSettings`) and the zone's own.
Every flag's default is the one in :mod:`meshfed.defaults`, the field's default
(``tests/test_defaults.py`` checks each field against its flag); the heavy
modules (the controller, the API, gRPC) load inside the command, so
``meshfed --help`` stays quick.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast, get_args

import typer

from meshfed import defaults
from meshfed.addresses import HostPort, is_ip_address, parse_host, parse_host_port, parse_port
from meshfed.cli.common import ZoneDir, duration_text, parse_duration
from meshfed.errors import InvalidAddressError, MeshfedError
from meshfed.leadership import LeaseSettings, LockSettings
from meshfed.leadership.pod_label import LeaderPod
from meshfed.logs import LogFormat, LogLevel
from meshfed.replica import KvReplica, SecretReplica

if TYPE_CHECKING:
    from meshfed.trust.endpoint import WebCertificate


def up(
    directory: ZoneDir,
    api_address: Annotated[str, typer.Option(help="host:port of the zone's HTTP API.")] = defaults.API_ADDRESS,
    api_tls_cert: Annotated[
        Path | None,
        typer.Option(help="Serve the API over HTTPS with this PEM certificate chain (needs --api-tls-key)."),
    ] = None,
    api_tls_key: Annotated[Path | None, typer.Option(help="The PEM private key of --api-tls-cert.")] = None,
    metrics_address: Annotated[
        str | None,
        typer.Option(
            help="host:port of a plain-HTTP listener serving only /healthz, /readyz and /metrics (no token), "
            "for probes and Prometheus when the API is on loopback or TLS. Default: none."
        ),
    ] = None,
    gateway_address: Annotated[
        str | None, typer.Option(help="host:port of the gateway ingress; default from zone.toml.")
    ] = None,
    gateway_advertise: Annotated[
        list[str] | None, typer.Option(help="host:port peers use to reach the ingress. Repeatable.")
    ] = None,
    peering_address: Annotated[
        str, typer.Option(help="host:port of the peering stream (mTLS).")
    ] = defaults.PEERING_ADDRESS,
    establish_address: Annotated[
        str, typer.Option(help="host:port where peers redeem tokens (TLS).")
    ] = defaults.ESTABLISH_ADDRESS,
    advertise_host: Annotated[
        str | None, typer.Option(help="Host name or IP that peers dial for peering; put in tokens.")
    ] = None,
    egress_host: Annotated[
        str, typer.Option(help="Address the egress listeners of imported services bind to.")
    ] = defaults.EGRESS_HOST,
    egress_advertise_host: Annotated[
        str | None, typer.Option(help="Address local clients reach imports at (the pod IP); default: --egress-host.")
    ] = None,
    egress_port_base: Annotated[
        int, typer.Option(help="First local port for imported services (0-65535); 0 = ephemeral.")
    ] = defaults.EGRESS_PORT_BASE,
    egress_connect_address: Annotated[
        str | None,
        typer.Option(
            help="host:port of one HTTP CONNECT listener for every import: clients ask for "
            "<service>.<namespace>.<peer>:<port> (or <service>.<namespace>:<port> for a failover group)."
        ),
    ] = None,
    per_import_listeners: Annotated[
        bool,
        typer.Option(help="A listening port per imported service port and failover group (off: CONNECT only)."),
    ] = True,
    bundle_endpoint_port: Annotated[
        int | None,
        typer.Option(help="Serve the SPIFFE bundle endpoint on this port of every interface (0-65535)."),
    ] = None,
    bundle_endpoint_address: Annotated[
        str | None,
        typer.Option(help="host:port to serve the SPIFFE bundle endpoint on (instead of --bundle-endpoint-port)."),
    ] = None,
    bundle_endpoint_web_cert: Annotated[
        Path | None,
        typer.Option(
            help="Serve the bundle endpoint as https_web with this PEM certificate chain (from a CA its consumers "
            "trust; needs --bundle-endpoint-web-key). Default: https_spiffe, presenting the controller's SVID."
        ),
    ] = None,
    bundle_endpoint_web_key: Annotated[
        Path | None, typer.Option(help="The PEM private key of --bundle-endpoint-web-cert.")
    ] = None,
    bundle_refresh_hint: Annotated[
        str | None,
        typer.Option(
            help="The spiffe_refresh_hint of this zone's bundle, such as 5m (1s to 7d); a rotation's default "
            "overlap is three of it. Default: bundle_refresh_hint in zone.toml, else 5m."
        ),
    ] = None,
    failing_peer_policy: Annotated[
        str, typer.Option(help="open: keep serving a failing peer's imports; closed: stop after the grace.")
    ] = defaults.FAILING_PEER_POLICY,
    failing_peer_grace: Annotated[
        str, typer.Option(help="How long a peer may fail before the policy applies.")
    ] = duration_text(defaults.FAILING_PEER_GRACE),
    health_check_interval: Annotated[
        str,
        typer.Option(
            help="Active TCP checks of local endpoints; two failures in a row mark one unhealthy for peers. 0s = off."
        ),
    ] = duration_text(defaults.HEALTH_CHECK_INTERVAL),
    allow_empty_catalog: Annotated[
        bool,
        typer.Option(
            help="Tell peers at once if the catalog is empty at start. By default a zone that exported "
            "services before keeps them for its peers until the catalog has services again or "
            "POST /v1/catalog/confirm-empty."
        ),
    ] = False,
    egress_workload_tls: Annotated[
        str | None,
        typer.Option(
            help="plain: egress listeners take plain TCP and peers see this zone's gateway; strict: local "
            "workloads must present SVIDs of this zone, and peers see which workload called; permissive: both. "
            "Default: [egress] workload_tls in zone.toml (plain)."
        ),
    ] = None,
    leader_lease: Annotated[
        str | None,
        typer.Option(
            help="NAMESPACE/NAME of a coordination.k8s.io Lease: serve only while holding it, follow (warm, "
            "serving nothing) while another process of the zone does, and exit if it is lost. Credentials: "
            "[kubernetes] in zone.toml, else the pod's service account. Default: no election."
        ),
    ] = None,
    leader_lock: Annotated[
        str | None,
        typer.Option(
            help="A Consul KV key (such as meshfed/east/leader): serve only while holding its lock through a "
            "Consul session, as --leader-lease does with a Lease. Consul: [consul] in zone.toml; its token "
            "needs session:write and key:write on the key. Default: no election."
        ),
    ] = None,
    leader_identity: Annotated[
        str | None,
        typer.Option(help="This process among the candidates. Default: $POD_NAME, else host-pid."),
    ] = None,
    leader_pod: Annotated[
        str | None,
        typer.Option(
            help="NAMESPACE/NAME of the pod this process runs in: label it meshfed.io/leader=true while it leads "
            "and its zone is ready, false otherwise, for Services to select the leader; a follower then answers "
            "/readyz 200. Needs patch on pods. Default: no label, a follower is not ready."
        ),
    ] = None,
    state_secret: Annotated[
        str | None,
        typer.Option(
            help="NAMESPACE/NAME: keep the zone's state (CA, tokens, peerings, exports, imports) in Secrets NAME "
            "and NAME-<digest> too, restored at start when the directory does not hold it (an empty volume, a "
            "new leader) and published every 2s; credentials as --leader-lease's. Default: the directory alone."
        ),
    ] = None,
    state_kv: Annotated[
        str | None,
        typer.Option(
            help="A Consul KV prefix (such as meshfed/east/state): keep the zone's state there, as "
            "--state-secret does in Secrets; its token needs key_prefix write on it. Default: the directory alone."
        ),
    ] = None,
    gateway_feed: Annotated[
        bool,
        typer.Option(
            "--gateway-feed",
            help="While leading, also publish the config this zone's gateway runs (SVID included) beside the state "
            "replica (Secret NAME-gateway, or PREFIX/gateway/), for gateway replicas (meshfed gateway) to serve. "
            "Needs --state-secret or --state-kv. Default: no feed.",
        ),
    ] = False,
    admin_token_file: Annotated[
        Path | None,
        typer.Option(
            help="A file holding the API's admin token (a mounted Secret, say): it replaces the zone's at "
            "start, after its replica is restored. Default: the zone directory's admin-token.",
        ),
    ] = None,
    read_token_file: Annotated[
        Path | None,
        typer.Option(
            help="The same for the read-only token. Default: the zone directory's read-token.",
        ),
    ] = None,
    leader_lease_duration: Annotated[
        str, typer.Option(help="How long a leader not seen renewing keeps the Lease (renewals at 2/15 of it).")
    ] = "15s",
    log_level: Annotated[LogLevel, typer.Option(help="debug, info, warning or error.")] = LogLevel.info,
    log_format: Annotated[
        LogFormat, typer.Option(help="json (one object per line, with trace ids) or text.")
    ] = LogFormat.json,
) -> None:
    """Run one zone in the foreground: controller, gateway, peering and API. SIGTERM stops it cleanly."""
    import faulthandler

    from meshfed.cli.serve import ApiTls, Listeners, serve_zone
    from meshfed.controller import ControllerSettings, health_check_every
    from meshfed.federation.settings import PeeringSettings
    from meshfed.policy.egress import WorkloadTls
    from meshfed.runtime import ZoneSettings
    from meshfed.zone import Zone, parse_refresh_hint
    from meshfed.zone.tokens import TokenFiles

    if failing_peer_policy not in ("open", "closed"):
        raise typer.BadParameter("use open or closed", param_hint="--failing-peer-policy")
    if (api_tls_cert is None) != (api_tls_key is None):
        raise typer.BadParameter("give both or neither", param_hint="--api-tls-cert/--api-tls-key")
    if egress_workload_tls not in (None, *get_args(WorkloadTls)):
        raise typer.BadParameter("use plain, permissive or strict", param_hint="--egress-workload-tls")
    for token_file, flag in ((admin_token_file, "--admin-token-file"), (read_token_file, "--read-token-file")):
        if token_file is not None and not (token_file.is_file() and os.access(token_file, os.R_OK)):
            raise typer.BadParameter(f"{token_file} is not a file this process can read", param_hint=flag)
    bundle_endpoint = _bundle_endpoint(
        bundle_endpoint_port, bundle_endpoint_address, bundle_endpoint_web_cert, bundle_endpoint_web_key
    )
    # Every address is parsed here, before anything binds: ports the layers below would take
    # modulo 65536, or names they would only refuse much later, are one line naming the flag.
    zone = Zone.open(directory)
    if gateway_address is None:
        gateway_flag, gateway = f"gateway_address in {directory / 'zone.toml'}", zone.config.gateway_address
    else:
        gateway_flag, gateway = "--gateway-address", gateway_address
    listeners = Listeners(
        api=parse_host_port(api_address, what="--api-address", allow_zero=True),
        gateway=_gateway_bind(gateway, gateway_flag),
        gateway_flag=gateway_flag,
        peering=parse_host_port(peering_address, what="--peering-address", allow_zero=True),
        establish=parse_host_port(establish_address, what="--establish-address", allow_zero=True),
        bundle_endpoint_port=None if bundle_endpoint is None else bundle_endpoint.address.port,
        bundle_endpoint_host=bundle_endpoint.address.host if bundle_endpoint else defaults.BUNDLE_ENDPOINT_HOST,
        bundle_endpoint_flag=bundle_endpoint.flag if bundle_endpoint else "--bundle-endpoint-port",
        metrics=(
            None
            if metrics_address is None
            else parse_host_port(metrics_address, what="--metrics-address", allow_zero=True)
        ),
        api_tls=None if api_tls_cert is None or api_tls_key is None else ApiTls(api_tls_cert, api_tls_key),
    )
    controller = ControllerSettings(
        gateway_address=None if gateway_address is None else str(listeners.gateway),
        gateway_advertise=tuple(
            str(parse_host_port(address, what="--gateway-advertise", allow_zero=False))
            for address in gateway_advertise or ()
        ),
        egress_host=ip_host(egress_host, "--egress-host"),
        egress_advertise_host=(
            None if egress_advertise_host is None else parse_host(egress_advertise_host, what="--egress-advertise-host")
        ),
        egress_port_base=parse_port(egress_port_base, what="--egress-port-base", allow_zero=True),
        egress_connect_address=(
            None
            if egress_connect_address is None
            else str(parse_host_port(egress_connect_address, what="--egress-connect-address", allow_zero=True))
        ),
        per_import_listeners=per_import_listeners,
        failing_peer_grace=parse_duration(failing_peer_grace, "--failing-peer-grace"),
        failing_peer_policy="open" if failing_peer_policy == "open" else "closed",
        health_check=health_check_every(parse_duration(health_check_interval, "--health-check-interval")),
        allow_empty_catalog=allow_empty_catalog,
        egress_workload_tls=cast("WorkloadTls | None", egress_workload_tls),
    )
    peering = PeeringSettings(
        listen_address=str(listeners.peering),
        establish_address=str(listeners.establish),
        advertise_host=None if advertise_host is None else parse_host(advertise_host, what="--advertise-host"),
    )
    settings = ZoneSettings(
        controller=controller,
        peering=peering,
        leader=_leader(leader_lease, leader_lock, leader_identity, leader_lease_duration),
        replica=parse_replica(state_secret, state_kv),
        gateway_feed=_gateway_feed(gateway_feed, state_secret is not None or state_kv is not None),
        leader_pod=_leader_pod(leader_pod, leader_lease is not None or leader_lock is not None),
        token_files=TokenFiles(admin_token_file, read_token_file),
        bundle_endpoint_port=listeners.bundle_endpoint_port,
        bundle_endpoint_host=listeners.bundle_endpoint_host,
        bundle_endpoint_web=bundle_endpoint.web if bundle_endpoint else None,
        bundle_refresh_hint=(
            None
            if bundle_refresh_hint is None
            else dt.timedelta(seconds=parse_refresh_hint(bundle_refresh_hint, "--bundle-refresh-hint"))
        ),
    )
    # A crash in a C extension (gRPC, SQLite, the core) prints every thread's Python stack to stderr: the
    # operator's report says where, not only "exited -11".
    faulthandler.enable()
    serve_zone(zone, settings, listeners, log_level=log_level.value, json_logs=log_format is LogFormat.json)


def _leader(
    lease: str | None, lock: str | None, identity: str | None, duration: str
) -> LeaseSettings | LockSettings | None:
    """What ``meshfed up`` campaigns for, from its flags; None: no election."""
    who = identity or os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    if lease is not None and lock is not None:
        raise typer.BadParameter("give --leader-lease or --leader-lock, not both", param_hint="--leader-lock")
    if lock is not None:
        return LockSettings(_consul_key(lock, "--leader-lock", 512), who)
    if lease is None:
        return None
    namespace, slash, name = lease.partition("/")
    if not (slash and _DNS_NAME.fullmatch(namespace) and _DNS_NAME.fullmatch(name)):
        raise typer.BadParameter("give NAMESPACE/NAME, both DNS names", param_hint="--leader-lease")
    seconds = parse_duration(duration, "--leader-lease-duration").total_seconds()
    if seconds < 3:
        raise typer.BadParameter("at least 3s", param_hint="--leader-lease-duration")
    # Kubernetes' controllers' proportions: renew deadline 2/3 of the duration, a try every 2/15.
    return LeaseSettings(
        namespace, name, who, duration=seconds, renew_deadline=seconds * 2 / 3, retry_period=seconds * 2 / 15
    )


def _leader_pod(pod: str | None, campaigning: bool) -> LeaderPod | None:
    if pod is None:
        return None
    if not campaigning:
        raise typer.BadParameter(
            "labels the leader's pod: give --leader-lease or --leader-lock too", param_hint="--leader-pod"
        )
    namespace, slash, name = pod.partition("/")
    if not (slash and _LABEL_NAME.fullmatch(namespace) and _DNS_NAME.fullmatch(name)):
        raise typer.BadParameter("give NAMESPACE/NAME of this process's pod", param_hint="--leader-pod")
    return LeaderPod(namespace, name)


def _gateway_feed(wanted: bool, replicated: bool) -> bool:
    if wanted and not replicated:
        raise typer.BadParameter(
            "the feed is published beside the state replica: give --state-secret or --state-kv too",
            param_hint="--gateway-feed",
        )
    return wanted


def parse_replica(secret: str | None, kv: str | None) -> SecretReplica | KvReplica | None:
    """Where ``meshfed up`` keeps the zone's state besides its directory, from its flags; None: nowhere."""
    if secret is not None and kv is not None:
        raise typer.BadParameter("give --state-secret or --state-kv, not both", param_hint="--state-kv")
    if kv is not None:
        # 400 leaves room for the pieces' keys, <prefix>/pieces/<64 hex digits>.
        return KvReplica(_consul_key(kv.rstrip("/"), "--state-kv", 400))
    if secret is None:
        return None
    namespace, slash, name = secret.partition("/")
    # NAME is also a label value (63 characters); each piece is Secret NAME-<64 hex digits>.
    if not (slash and _LABEL_NAME.fullmatch(namespace) and _LABEL_NAME.fullmatch(name)):
        raise typer.BadParameter(
            "give NAMESPACE/NAME: a namespace, and a name of 1-63 lower-case letters, digits and -",
            param_hint="--state-secret",
        )
    return SecretReplica(namespace, name)


_LABEL_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_DNS_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")
_CONSUL_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


def _consul_key(value: str, flag: str, longest: int) -> str:
    """``value`` as a Consul KV key (or prefix) of at most ``longest`` characters; else a usage error of ``flag``.

    No empty, ``.`` or ``..`` segment: an HTTP client folds those, and would write another key than the one named.
    """
    segments = value.split("/")
    if len(value) > longest or not all(_CONSUL_SEGMENT.fullmatch(s) and s not in (".", "..") for s in segments):
        raise typer.BadParameter(
            f"give a Consul KV key of at most {longest} letters, digits and . _ - /, in segments that are not "
            "empty, '.' or '..' (e.g. meshfed/east/leader)",
            param_hint=flag,
        )
    return value


@dataclass(frozen=True)
class _BundleEndpoint:
    address: HostPort
    flag: str  # the flag that set the address, for bind errors
    web: WebCertificate | None


def _bundle_endpoint(
    port: int | None, address: str | None, web_cert: Path | None, web_key: Path | None
) -> _BundleEndpoint | None:
    """Where and how ``meshfed up`` serves the bundle endpoint, from its four flags; None: not at all."""
    from meshfed.trust.endpoint import WebCertificate  # httpx and friends: only for `up`

    if port is not None and address is not None:
        raise MeshfedError(
            "--bundle-endpoint-address/--bundle-endpoint-port: give one (host:port, or a port on every interface)"
        )
    if (web_cert is None) != (web_key is None):
        raise MeshfedError("--bundle-endpoint-web-cert/--bundle-endpoint-web-key: give both or neither")
    web = None if web_cert is None or web_key is None else WebCertificate(web_cert, web_key)
    if address is not None:
        bound = parse_host_port(address, what="--bundle-endpoint-address", allow_zero=True)
        return _BundleEndpoint(bound, "--bundle-endpoint-address", web)
    if port is not None:
        parsed = parse_port(port, what="--bundle-endpoint-port", allow_zero=True)
        return _BundleEndpoint(HostPort(defaults.BUNDLE_ENDPOINT_HOST, parsed), "--bundle-endpoint-port", web)
    if web is not None:
        raise MeshfedError(
            "--bundle-endpoint-web-cert is the bundle endpoint's certificate: give --bundle-endpoint-address "
            "(or --bundle-endpoint-port) too"
        )
    return None


# The gateway binds socket addresses: an IP literal and a port, never a name.
_GATEWAY_BINDS_IPS = "the gateway binds IP addresses, not names; give one (0.0.0.0 or :: for every interface)"


def _gateway_bind(text: str, what: str) -> HostPort:
    address = parse_host_port(text, what=what, allow_zero=True)
    if not is_ip_address(address.host):
        raise InvalidAddressError(f"{what} {text!r}: {_GATEWAY_BINDS_IPS}")
    return address


def ip_host(text: str, what: str) -> str:
    """``text`` as a host to bind a gateway listener on: an IP address (the data plane binds no names)."""
    host = parse_host(text, what=what)
    if not is_ip_address(host):
        raise InvalidAddressError(f"{what} {text!r}: {_GATEWAY_BINDS_IPS}")
    return host


__all__ = ["up"]
