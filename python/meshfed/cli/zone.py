"""``meshfed zone``: create and inspect zone directories, and print their API tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from meshfed import audit
from meshfed.catalog.settings import CatalogMode, ConsulSettings, KubernetesSettings
from meshfed.cli.common import DIR_ENVVAR, Output, OutputOption, ZoneDir, emit
from meshfed.errors import ZoneError
from meshfed.zone import READ_TOKEN_FILE, TOKEN_FILE, Zone

zone_app = typer.Typer(help="Create and inspect zones.", no_args_is_help=True)


@zone_app.command("init")
def init(
    directory: Annotated[
        Path,
        typer.Option(
            "--dir", envvar=DIR_ENVVAR, show_envvar=True, help="Directory to create; must not exist or be empty."
        ),
    ],
    name: Annotated[str, typer.Option(help="Zone name, a DNS label such as 'east'.")],
    trust_domain: Annotated[str, typer.Option(help="SPIFFE trust domain, such as 'east.mesh'.")],
    catalog: Annotated[str, typer.Option(help="Where the zone's services live: embedded, consul or kubernetes.")] = (
        "embedded"
    ),
    consul_address: Annotated[
        str | None, typer.Option(help="Consul HTTP API, e.g. http://127.0.0.1:8500 (consul catalog).")
    ] = None,
    consul_datacenter: Annotated[str | None, typer.Option(help="Consul datacenter (default: the agent's).")] = None,
    consul_token_file: Annotated[str | None, typer.Option(help="File holding the Consul ACL token.")] = None,
    consul_namespace: Annotated[str | None, typer.Option(help="Consul Enterprise namespace.")] = None,
    kubeconfig: Annotated[
        str | None, typer.Option(help="Kubeconfig file (kubernetes catalog; default: in-cluster service account).")
    ] = None,
    kube_context: Annotated[str | None, typer.Option(help="Kubeconfig context (default: the current one).")] = None,
    kube_namespace: Annotated[
        list[str] | None, typer.Option(help="Namespace to watch; repeat for several (default: default).")
    ] = None,
    mirror_namespace: Annotated[
        str | None, typer.Option(help="Namespace for imported-service mirrors (default: the import's namespace).")
    ] = None,
    offline_root_key: Annotated[
        Path | None,
        typer.Option(
            help="Write the root CA's private key to this new file (outside the zone) instead of the zone "
            "directory; 'meshfed trust rotate' then needs it back (--root-key)."
        ),
    ] = None,
    output: OutputOption = Output.table,
) -> None:
    """Create a zone: root and intermediate CA, config, state database, admin and read tokens.

    -o table prints one line; -o json an object: zone, trust_domain, catalog, directory,
    admin_token_file, read_token_file, offline_root_key (null unless --offline-root-key).
    """
    if catalog not in ("embedded", "consul", "kubernetes"):
        raise ZoneError(f"--catalog {catalog!r}: choose embedded, consul or kubernetes")
    mode: CatalogMode = catalog  # type: ignore[assignment]  # checked just above
    consul_options = (consul_address, consul_datacenter, consul_token_file, consul_namespace)
    kube_options = (kubeconfig, kube_context, kube_namespace, mirror_namespace)
    if mode != "consul" and any(option is not None for option in consul_options):
        raise ZoneError("--consul-* options need --catalog consul")
    if mode != "kubernetes" and any(option is not None for option in kube_options):
        raise ZoneError("--kubeconfig, --kube-* and --mirror-namespace need --catalog kubernetes")
    try:
        consul = (
            ConsulSettings.model_validate(
                {
                    key: value
                    for key, value in {
                        "address": consul_address,
                        "datacenter": consul_datacenter,
                        "token_file": consul_token_file,
                        "namespace": consul_namespace,
                    }.items()
                    if value is not None
                }
            )
            if mode == "consul"
            else None
        )
        kubernetes = (
            KubernetesSettings.model_validate(
                {
                    key: value
                    for key, value in {
                        "kubeconfig": kubeconfig,
                        "context": kube_context,
                        "namespaces": kube_namespace or None,
                        "mirror_namespace": mirror_namespace,
                    }.items()
                    if value is not None
                }
            )
            if mode == "kubernetes"
            else None
        )
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise ZoneError(f"{mode}.{field}: {str(first['msg']).removeprefix('Value error, ')}") from None
    zone = Zone.init(
        directory,
        name,
        trust_domain,
        catalog=mode,
        consul=consul,
        kubernetes=kubernetes,
        offline_root_key=offline_root_key,
    )
    audit.record(
        zone.directory,
        actor=audit.cli_actor(),
        action="zone.init",
        target=f"zone {zone.name}",
        trust_domain=str(zone.trust_domain),
        catalog=mode,
    )
    document = {
        "zone": zone.name,
        "trust_domain": str(zone.trust_domain),
        "catalog": mode,
        "directory": str(zone.directory),
        "admin_token_file": str(zone.directory / TOKEN_FILE),
        "read_token_file": str(zone.directory / READ_TOKEN_FILE),
        "offline_root_key": None if offline_root_key is None else str(offline_root_key),
    }
    emit(
        document,
        output,
        table=lambda: typer.echo(
            f"zone {zone.name} (trust domain {zone.trust_domain}, {mode} catalog) created in {zone.directory}"
        ),
    )
    if offline_root_key is not None:
        typer.echo(f"the root key is in {offline_root_key}, not in the zone: keep it offline", err=True)


@zone_app.command("token")
def token(
    directory: ZoneDir,
    read: Annotated[bool, typer.Option("--read", help="The read-only token: every API read, no change.")] = False,
    admin: Annotated[bool, typer.Option("--admin", help="The admin token: every API call.")] = False,
    output: OutputOption = Output.table,
) -> None:
    """Print one of the zone's API tokens, for 'Authorization: Bearer <token>'.

    -o table prints the token alone; -o json an object: zone, kind (read or admin), token, file.
    """
    if read == admin:
        raise typer.BadParameter("choose one of --read or --admin", param_hint="--read/--admin")
    zone = Zone.open(directory)
    kind, secret, file = (
        ("read", zone.read_token(), READ_TOKEN_FILE) if read else ("admin", zone.admin_token(), TOKEN_FILE)
    )
    document = {"zone": zone.name, "kind": kind, "token": secret, "file": str(zone.directory / file)}
    emit(document, output, table=lambda: typer.echo(secret))
