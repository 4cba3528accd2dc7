"""``meshfed authz``: who may call each exported service, by SPIFFE ID.

Each command works through the zone's API when it runs (or ``--api``), else on
its files (:mod:`meshfed.cli.remote`); ``-o json`` prints the API's rule objects
either way.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer
from pydantic import ValidationError

from meshfed import audit
from meshfed.cli.common import OptionalZoneDir, Output, OutputOption, emit, print_table
from meshfed.cli.remote import ApiOption, CaOption, TokenFileOption, target
from meshfed.errors import FederationError
from meshfed.federation.authz import AuthzRules, RuleView
from meshfed.policy.authz import RuleSpec
from meshfed.validation import describe_validation_error

authz_app = typer.Typer(
    help="Authorization rules per exported service: ordered allow/deny over caller SPIFFE IDs. "
    "Without rules, any identity of the peers an export names may call; once a service has rules, "
    "what they do not allow is denied.",
    no_args_is_help=True,
)


ServiceOption = Annotated[str, typer.Option("--service", help="Service name in the zone's catalog.")]
NamespaceOption = Annotated[str, typer.Option(help="Namespace of the service.")]


@authz_app.command("add")
def add(
    service: ServiceOption,
    allow: Annotated[
        str | None,
        typer.Option(help="Allow callers matching this pattern: '*', a SPIFFE ID, or spiffe://<td>/<path>/*."),
    ] = None,
    deny: Annotated[str | None, typer.Option(help="Deny callers matching this pattern (same forms).")] = None,
    namespace: NamespaceOption = "default",
    port: Annotated[int | None, typer.Option(help="Only this service port (default: every port).")] = None,
    position: Annotated[
        int | None, typer.Option(help="Where among the service's rules (1 = first); default: last.")
    ] = None,
    directory: OptionalZoneDir = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Add one rule; a running zone applies it within a second. The first matching rule decides."""
    if (allow is None) == (deny is None):
        raise typer.BadParameter("give exactly one of --allow PATTERN or --deny PATTERN", param_hint="--allow")
    pattern = allow if allow is not None else deny
    try:
        spec = RuleSpec(
            service=service,
            namespace=namespace,
            port=port,
            action="allow" if allow is not None else "deny",
            id=pattern or "",
        )
    except ValidationError as err:
        raise FederationError(describe_validation_error(err)) from None
    where = target(directory, api, token_file, api_ca, change=True)
    if where.api is not None:
        rule = RuleView.model_validate(where.api.post("/v1/authz", {**spec.model_dump(), "position": position}))
    else:
        zone = where.zone()
        with AuthzRules(zone.directory) as rules:
            stored = rules.add(spec, position=position)
        audit.record(
            zone.directory,
            actor=audit.cli_actor(),
            action="authz.add",
            target=f"{service}.{namespace}",
            rule=asdict(stored),
        )
        rule = RuleView.of(stored)
    emit(rule, output, table=lambda: typer.echo(f"rule {rule.rule_id}: {_describe(rule)}"))


@authz_app.command("remove")
def remove(
    rule_id: Annotated[
        int | None, typer.Option("--id", min=1, max=2**63 - 1, help="The rule to remove (see 'meshfed authz list').")
    ] = None,
    service: Annotated[
        str | None, typer.Option("--service", help="Remove every CLI/API rule of this service instead.")
    ] = None,
    namespace: NamespaceOption = "default",
    directory: OptionalZoneDir = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Remove a rule, or every rule of a service added by the CLI or API (zone.toml rules stay)."""
    if (rule_id is None) == (service is None):
        raise typer.BadParameter("give --id N or --service NAME", param_hint="--id")
    where = target(directory, api, token_file, api_ca, change=True)
    if where.api is not None:
        listed = [RuleView.model_validate(item) for item in where.api.get("/v1/authz", service=service)]
        if rule_id is not None:
            chosen = [rule for rule in listed if rule.rule_id == rule_id]
        else:
            chosen = [rule for rule in listed if rule.namespace == namespace and rule.source == "api"]
        for rule in chosen:
            where.api.delete(f"/v1/authz/{rule.rule_id}")
        if rule_id is not None and not chosen:
            raise FederationError(f"no authorization rule {rule_id}; see 'meshfed authz list'")
        name = f"{chosen[0].service}.{chosen[0].namespace}" if rule_id is not None else f"{service}.{namespace}"
        message = (
            f"removed rule {rule_id}: {_describe(chosen[0])}"
            if rule_id is not None
            else f"removed {len(chosen)} rule(s) of {name}"
        )
        emit({"removed": len(chosen), "target": name}, output, table=lambda: typer.echo(message))
        return
    zone = where.zone()
    with AuthzRules(zone.directory) as rules:
        if rule_id is not None:
            removed = rules.remove(rule_id)
            name, count = f"{removed.service}.{removed.namespace}", 1
            message = f"removed rule {rule_id}: {_describe(RuleView.of(removed))}"
        else:
            assert service is not None
            count = rules.remove_service(service, namespace)
            name = f"{service}.{namespace}"
            message = f"removed {count} rule(s) of {name}"
    audit.record(zone.directory, actor=audit.cli_actor(), action="authz.remove", target=name, rules=count)
    emit({"removed": count, "target": name}, output, table=lambda: typer.echo(message))


@authz_app.command("list")
def list_rules(
    service: Annotated[str | None, typer.Option("--service", help="Only this service.")] = None,
    directory: OptionalZoneDir = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
) -> None:
    """List the rules in the order the gateway applies them, per service.

    -o json prints what GET /v1/authz returns: rule_id, service, namespace, port (null: every port),
    action, id (the callers' SPIFFE ID pattern), source (config: zone.toml; api: the CLI or API).
    """
    where = target(directory, api, token_file, api_ca, change=False)
    current: list[RuleView]
    if where.api is not None:
        current = [RuleView.model_validate(item) for item in where.api.get("/v1/authz", service=service)]
    else:
        with AuthzRules(where.zone().directory) as rules:
            current = [RuleView.of(rule) for rule in rules.rules() if service is None or rule.service == service]
    emit(
        current,
        output,
        table=lambda: print_table(
            "authorization rules (first match decides; no match: denied)",
            ("id", "service", "port", "action", "caller", "from"),
            (
                (
                    rule.rule_id,
                    f"{rule.service}.{rule.namespace}",
                    "all" if rule.port is None else rule.port,
                    rule.action,
                    rule.id,
                    "zone.toml" if rule.source == "config" else "cli/api",
                )
                for rule in current
            ),
            width=140,
        ),
    )


def _describe(rule: RuleView) -> str:
    port = "" if rule.port is None else f" port {rule.port}"
    return f"{rule.action} {rule.id} on {rule.service}.{rule.namespace}{port}"
