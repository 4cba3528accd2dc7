"""The ``meshfed`` command line: one command group per noun.

Every failure meshfed expects prints one line on stderr and exits non-zero;
tracebacks are reserved for bugs. Usage errors are one line too, ``meshfed:
error: <message> (see 'meshfed <command> --help')``, exit 2. The exit codes
are ``ExitCode`` in ``meshfed.cli.common``.
"""

from __future__ import annotations

import datetime as dt
import errno
import importlib
import os
import sqlite3
import sys
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, cast, get_args

import typer
import typer.main
from pydantic import ValidationError
from typer import _click as click  # typer vendors click: TyperGroup's overrides take its types
from typer.core import TyperGroup

from meshfed import __version__, _core, defaults
from meshfed.addresses import HostPort, is_ip_address, parse_host, parse_host_port, parse_port
from meshfed.cli import _signals  # noqa: F401 -- before the command groups: SIGTERM while `up` imports them
from meshfed.cli.common import ExitCode, ZoneDir, duration_text, fail, parse_duration
from meshfed.errors import InvalidAddressError, MeshfedError
from meshfed.logs import LogFormat, LogLevel
from meshfed.sqlite import describe_error
from meshfed.validation import describe_validation_error

if TYPE_CHECKING:
    from meshfed.trust.endpoint import WebCertificate

# Command groups by name: (module under meshfed.cli, its Typer app or command function). Each is
# imported when the command line names it, so `meshfed version` does not pay for gRPC, the catalog
# clients and the zone's stores (about a second of imports) before printing one line.
_LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "zone": ("zone", "zone_app"),
    "trust": ("trust", "trust_app"),
    "service": ("service", "service_app"),
    "catalog": ("service", "catalog_app"),
    "export": ("export", "export_app"),
    "authz": ("authz", "authz_app"),
    "peer": ("peer", "peer_app"),
    "status": ("status", "status"),
    "explain": ("status", "explain"),
}


class _LazyGroup(TyperGroup):
    """The root command: the groups of ``_LAZY_COMMANDS`` are loaded on first use (click's lazy-group pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _LAZY_COMMANDS:
            return super().get_command(ctx, cmd_name)
        module_name, attribute = _LAZY_COMMANDS[cmd_name]
        module = importlib.import_module(f"meshfed.cli.{module_name}")
        target = getattr(module, attribute)
        command: click.Command
        if isinstance(target, typer.Typer):  # a group, even of one subcommand (`catalog list`)
            command = typer.main.get_group(target)
        else:  # a single command: typer turns a one-command app into that command
            single = typer.Typer()
            single.command(cmd_name)(target)
            command = typer.main.get_command(single)
        command.name = cmd_name
        return command


app = typer.Typer(
    name="meshfed",
    cls=_LazyGroup,
    help="Federate service meshes across clusters: SPIFFE trust bridging, catalogs, east-west gateways.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version_text() -> str:
    return f"meshfed {__version__} (core {_core.core_version()})"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(_version_text())
        raise typer.Exit(ExitCode.OK)


@app.callback()
def _meshfed(
    _version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version (as 'meshfed version')."
        ),
    ] = False,
) -> None:
    pass


@app.command()
def version() -> None:
    """Print meshfed's version and the Rust core's version."""
    typer.echo(_version_text())


class Shell(StrEnum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


@app.command()
def completion(shell: Annotated[Shell, typer.Argument(help="bash, zsh or fish.")]) -> None:
    """Print the shell completion script: eval "$(meshfed completion bash)" (or zsh; fish: | source)."""
    from typer._completion_shared import get_completion_script

    typer.echo(get_completion_script(prog_name=PROG, complete_var=_COMPLETE_VAR, shell=shell.value))


PROG = "meshfed"
_COMPLETE_VAR = "_MESHFED_COMPLETE"  # what the completion script sets when it asks meshfed for candidates


@app.command()
def demo(
    requests: Annotated[int, typer.Option(min=1, max=100_000, help="HTTP requests to send across zones.")] = 200,
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="Concurrent client connections.")] = 8,
) -> None:
    """Federate three zones on this machine with tokens and send traffic through their gateways."""
    from meshfed.demo import run_demo

    report = run_demo(requests=requests, concurrency=concurrency)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
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
    log_level: Annotated[LogLevel, typer.Option(help="debug, info, warning or error.")] = LogLevel.info,
    log_format: Annotated[
        LogFormat, typer.Option(help="json (one object per line, with trace ids) or text.")
    ] = LogFormat.json,
) -> None:
    """Run one zone in the foreground: controller, gateway, peering and API. SIGTERM stops it cleanly."""
    from meshfed.cli.serve import ApiTls, Listeners, serve_zone
    from meshfed.controller import health_check_every
    from meshfed.policy.egress import WorkloadTls
    from meshfed.runtime import ZoneSettings
    from meshfed.zone import Zone, parse_refresh_hint

    if failing_peer_policy not in ("open", "closed"):
        raise typer.BadParameter("use open or closed", param_hint="--failing-peer-policy")
    if (api_tls_cert is None) != (api_tls_key is None):
        raise typer.BadParameter("give both or neither", param_hint="--api-tls-cert/--api-tls-key")
    if egress_workload_tls not in (None, *get_args(WorkloadTls)):
        raise typer.BadParameter("use plain, permissive or strict", param_hint="--egress-workload-tls")
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
    settings = ZoneSettings(
        gateway_address=None if gateway_address is None else str(listeners.gateway),
        gateway_advertise=tuple(
            str(parse_host_port(address, what="--gateway-advertise", allow_zero=False))
            for address in gateway_advertise or ()
        ),
        egress_host=_ip_host(egress_host, "--egress-host"),
        egress_advertise_host=(
            None if egress_advertise_host is None else parse_host(egress_advertise_host, what="--egress-advertise-host")
        ),
        egress_port_base=parse_port(egress_port_base, what="--egress-port-base", allow_zero=True),
        peering_address=str(listeners.peering),
        establish_address=str(listeners.establish),
        advertise_host=None if advertise_host is None else parse_host(advertise_host, what="--advertise-host"),
        bundle_endpoint_port=listeners.bundle_endpoint_port,
        bundle_endpoint_host=listeners.bundle_endpoint_host,
        bundle_endpoint_web=bundle_endpoint.web if bundle_endpoint else None,
        bundle_refresh_hint=(
            None
            if bundle_refresh_hint is None
            else dt.timedelta(seconds=parse_refresh_hint(bundle_refresh_hint, "--bundle-refresh-hint"))
        ),
        failing_peer_grace=parse_duration(failing_peer_grace, "--failing-peer-grace"),
        failing_peer_policy="open" if failing_peer_policy == "open" else "closed",
        health_check=health_check_every(parse_duration(health_check_interval, "--health-check-interval")),
        allow_empty_catalog=allow_empty_catalog,
        egress_workload_tls=cast("WorkloadTls | None", egress_workload_tls),
    )
    serve_zone(zone, settings, listeners, log_level=log_level.value, json_logs=log_format is LogFormat.json)


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


def _ip_host(text: str, what: str) -> str:
    host = parse_host(text, what=what)
    if not is_ip_address(host):
        raise InvalidAddressError(f"{what} {text!r}: {_GATEWAY_BINDS_IPS}")
    return host


def main() -> None:
    """Entry point of the ``meshfed`` script: exits with an ``ExitCode``, errors in one line on stderr."""
    if _COMPLETE_VAR in os.environ:  # the shell asks for candidates: typer registers its shells only on request
        from typer._completion_classes import completion_init

        completion_init()
    try:
        code = app(prog_name=PROG, complete_var=_COMPLETE_VAR, standalone_mode=False)
    except typer.TyperException as err:  # click's UsageError (exit 2) and the rest of its errors
        if type(err).__name__ == "NoArgsIsHelpError":  # the help is printed already (typer checks it so too)
            sys.exit(ExitCode.USAGE)
        _usage_error(err)
    except typer.Abort:  # input ended at a prompt
        print(f"{PROG}: aborted", file=sys.stderr)
        sys.exit(ExitCode.INTERRUPTED)
    except MeshfedError as err:
        fail(str(err))
    except ValidationError as err:  # a model built from user input that a command did not check first
        fail(describe_validation_error(err))
    except sqlite3.Error as err:
        # Opening a database turns its errors into ZoneError; a damaged page may only show on a later query.
        fail(describe_error(err))
    except OSError as err:
        message = f"{err.strerror or err}: {err.filename}" if err.filename else str(err)
        fail(f"{message}; raise the open-file limit (ulimit -n)" if err.errno in _FD_EXHAUSTED else message)
    except KeyboardInterrupt:
        sys.exit(ExitCode.INTERRUPTED)
    # Without standalone mode typer returns what the command returned (None), or the code of a typer.Exit.
    sys.exit(code if isinstance(code, int) else ExitCode.OK)


def _usage_error(err: typer.TyperException) -> NoReturn:
    """``meshfed: error: <message> (see 'meshfed <command> --help')``, on one line."""
    # Typer words an enum's refusal as pydantic does ("Value error, 'x' is not one of ..."): drop that.
    message = " ".join(err.format_message().split()).removesuffix(".").replace(": Value error, ", ": ")
    if message[:1].isupper() and message[1:2].islower():
        message = message[0].lower() + message[1:]
    param, ctx = getattr(err, "param", None), getattr(err, "ctx", None)
    envvar = getattr(param, "envvar", None)
    if type(err).__name__ == "MissingParameter" and isinstance(envvar, str):
        # "missing option '--dir' (or set MESHFED_DIR)", whether or not typer named the variable.
        message = message.replace(f" (env var: '{envvar}')", "") + f" (or set {envvar})"
    command = getattr(ctx, "command_path", None) or PROG
    print(f"{PROG}: error: {message} (see '{command} --help')", file=sys.stderr)
    sys.exit(getattr(err, "exit_code", ExitCode.USAGE))


_FD_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE})


__all__ = ["app", "main"]
