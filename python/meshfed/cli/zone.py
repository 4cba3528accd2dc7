"""``meshfed zone``: create and inspect zone directories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from meshfed.zone import Zone

zone_app = typer.Typer(help="Create and inspect zones.", no_args_is_help=True)


@zone_app.command("init")
def init(
    directory: Annotated[Path, typer.Option("--dir", help="Directory to create; must not exist or be empty.")],
    name: Annotated[str, typer.Option(help="Zone name, a DNS label such as 'east'.")],
    trust_domain: Annotated[str, typer.Option(help="SPIFFE trust domain, such as 'east.mesh'.")],
) -> None:
    """Create a zone: root and intermediate CA, config, state database and admin token."""
    zone = Zone.init(directory, name, trust_domain)
    typer.echo(f"zone {zone.name} (trust domain {zone.trust_domain}) created in {zone.directory}")
