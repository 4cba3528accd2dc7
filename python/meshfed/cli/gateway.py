"""``meshfed gateway``: a gateway replica, serving the config its zone's leader publishes (no zone directory).

The zone's leader (``meshfed up --gateway-feed``) publishes the config its own
gateway runs, SVID included, beside the zone's state replica: Secret
``NAME-gateway`` for ``--state-secret NAMESPACE/NAME``, Consul key
``PREFIX/gateway/manifest`` for ``--state-kv PREFIX``. Any number of these
processes serve it; each keeps serving its last config while the zone has no
leader (see :mod:`meshfed.gateway_replica`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from meshfed import defaults
from meshfed.addresses import parse_host_port
from meshfed.cli.common import duration_text, parse_duration
from meshfed.cli.up import ip_host, parse_replica
from meshfed.logs import LogFormat, LogLevel


def gateway(
    state_secret: Annotated[
        str | None,
        typer.Option(
            help="NAMESPACE/NAME, as the leader's --state-secret: serve the config it publishes in Secret "
            "NAME-gateway (and NAME-gateway-1 to -15 for a large config; needs get on those only). Credentials: "
            "$KUBECONFIG, else the pod's service account."
        ),
    ] = None,
    state_kv: Annotated[
        str | None,
        typer.Option(
            help="PREFIX, as the leader's --state-kv: serve the config it publishes at PREFIX/gateway/manifest in "
            "Consul's KV store (and PREFIX/gateway/<n>/manifest for a large config; needs key_prefix read on "
            "PREFIX/gateway/)."
        ),
    ] = None,
    consul_address: Annotated[
        str, typer.Option(help="Consul's HTTP address, for --state-kv.")
    ] = "http://127.0.0.1:8500",
    consul_token_file: Annotated[
        Path | None, typer.Option(help="A file holding the Consul ACL token, for --state-kv. Default: none.")
    ] = None,
    listen_host: Annotated[
        str | None,
        typer.Option(
            help="Listen on this address instead of the host each listener of the leader's config names (its "
            "ports are kept). Default: the config's hosts."
        ),
    ] = None,
    metrics_address: Annotated[
        str,
        typer.Option(
            help="host:port of a plain-HTTP listener serving only /healthz, /readyz (200 once a config is "
            "applied) and /metrics."
        ),
    ] = defaults.GATEWAY_REPLICA_METRICS_ADDRESS,
    drain_time: Annotated[
        str,
        typer.Option(
            help="After SIGTERM, how long to keep accepting connections (not ready): time for load balancers and "
            "kube-proxy to stop sending new ones."
        ),
    ] = duration_text(defaults.GATEWAY_REPLICA_DRAIN),
    finish_time: Annotated[
        str,
        typer.Option(
            help="Then, with the listeners closed, how long the open connections get to end before they are cut."
        ),
    ] = duration_text(defaults.GATEWAY_REPLICA_FINISH),
    log_level: Annotated[LogLevel, typer.Option(help="debug, info, warning or error.")] = LogLevel.info,
    log_format: Annotated[
        LogFormat, typer.Option(help="json (one object per line, with trace ids) or text.")
    ] = LogFormat.json,
) -> None:
    """Run a gateway replica in the foreground: the zone's data plane, without its controller. SIGTERM stops it."""
    from meshfed.catalog.settings import ConsulSettings
    from meshfed.cli.serve import bind_listener
    from meshfed.gateway_replica import Drain, FeedSource, serve_gateway_replica
    from meshfed.logs import configure_logging
    from meshfed.runtime import raise_open_file_limit

    replica = parse_replica(state_secret, state_kv)
    if replica is None:
        raise typer.BadParameter("give --state-secret or --state-kv: where the leader publishes the config")
    if consul_token_file is not None and state_kv is None:
        raise typer.BadParameter("only with --state-kv", param_hint="--consul-token-file")
    consul = None
    if state_kv is not None:
        try:
            consul = ConsulSettings(
                address=consul_address,
                token_file=None if consul_token_file is None else str(consul_token_file),
            )
        except ValueError as err:
            raise typer.BadParameter(str(err).splitlines()[-1], param_hint="--consul-address") from None
    host = None if listen_host is None else ip_host(listen_host, "--listen-host")
    metrics = parse_host_port(metrics_address, what="--metrics-address", allow_zero=True)
    drain = Drain(parse_duration(drain_time, "--drain-time"), parse_duration(finish_time, "--finish-time"))
    configure_logging(log_level.value, json=log_format is LogFormat.json)
    raise_open_file_limit()
    with bind_listener(metrics, "--metrics-address") as metrics_socket:
        serve_gateway_replica(FeedSource(replica, consul), listen_host=host, metrics_socket=metrics_socket, drain=drain)
