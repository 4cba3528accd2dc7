"""The ``meshfed`` command line: one command group per noun.

Every failure meshfed expects prints one line on stderr and exits non-zero;
tracebacks are reserved for bugs.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from meshfed import __version__, _core
from meshfed.cli.common import ZoneDir, fail
from meshfed.cli.service import catalog_app, service_app
from meshfed.cli.trust import trust_app
from meshfed.cli.zone import zone_app
from meshfed.errors import MeshfedError
from meshfed.zone import Zone

app = typer.Typer(
    name="meshfed",
    help="Federate service meshes across clusters: SPIFFE trust bridging, catalogs, east-west gateways.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(zone_app, name="zone")
app.add_typer(trust_app, name="trust")
app.add_typer(service_app, name="service")
app.add_typer(catalog_app, name="catalog")


@app.command()
def version() -> None:
    """Print meshfed's version and the Rust core's version."""
    typer.echo(f"meshfed {__version__} (core {_core.core_version()})")


@app.command()
def demo(
    requests: Annotated[int, typer.Option(min=1, max=100_000, help="HTTP requests to send across zones.")] = 200,
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="Concurrent client connections.")] = 8,
) -> None:
    """Federate two zones on this machine and send traffic between them through the gateways."""
    from meshfed.demo import run_demo

    report = run_demo(requests=requests, concurrency=concurrency, echo=typer.echo)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def up(
    directory: ZoneDir,
    api_address: Annotated[str, typer.Option(help="host:port of the zone's HTTP API.")] = "127.0.0.1:8470",
    gateway_address: Annotated[
        str | None, typer.Option(help="host:port of the gateway ingress; default from zone.toml.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run one zone in the foreground: controller, gateway and API. SIGTERM or Ctrl-C stops it cleanly."""
    from meshfed.cli.serve import serve_zone

    serve_zone(Zone.open(directory), api_address=api_address, gateway_address=gateway_address, log_level=log_level)


def main() -> None:
    """Entry point of the ``meshfed`` script."""
    try:
        app()
    except MeshfedError as err:
        fail(str(err))
    except OSError as err:
        fail(f"{err.strerror or err}: {err.filename}" if err.filename else str(err))
    except KeyboardInterrupt:
        sys.exit(130)


__all__ = ["app", "main"]
