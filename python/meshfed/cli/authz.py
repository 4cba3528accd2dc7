"""``meshfed authz``: who may call each exported service, by SPIFFE ID."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer
from pydantic import ValidationError

from meshfed import audit
from meshfed.cli.common import Output, OutputOption, ZoneDir, emit, print_table
from meshfed.errors import FederationError
from meshfed.federation.authz import AuthzRule, AuthzRules
from meshfed.policy.authz import RuleSpec
from meshfed.validation import describe_validation_error
from meshfed.zone import Zone

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
    directory: ZoneDir,
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
    zone = Zone.open(directory)
    with AuthzRules(zone.directory) as rules:
        rule = rules.add(spec, position=position)
    audit.record(
        zone.directory, actor=audit.cli_actor(), action="authz.add", target=f"{service}.{namespace}", rule=asdict(rule)
    )
    emit(rule, output, table=lambda: typer.echo(f"rule {rule.rule_id}: {_describe(rule)}"))


@authz_app.command("remove")
def remove(
    directory: ZoneDir,
    rule_id: Annotated[
        int | None, typer.Option("--id", min=1, max=2**63 - 1, help="The rule to remove (see 'meshfed authz list').")
    ] = None,
    service: Annotated[
        str | None, typer.Option("--service", help="Remove every CLI/API rule of this service instead.")
    ] = None,
    namespace: NamespaceOption = "default",
    output: OutputOption = Output.table,
) -> None:
    """Remove a rule, or every rule of a service added by the CLI or API (zone.toml rules stay)."""
    if (rule_id is None) == (service is None):
        raise typer.BadParameter("give --id N or --service NAME", param_hint="--id")
    zone = Zone.open(directory)
    with AuthzRules(zone.directory) as rules:
        if rule_id is not None:
            removed = rules.remove(rule_id)
            target, count = f"{removed.service}.{removed.namespace}", 1
            message = f"removed rule {rule_id}: {_describe(removed)}"
        else:
            assert service is not None
            count = rules.remove_service(service, namespace)
            target = f"{service}.{namespace}"
            message = f"removed {count} rule(s) of {target}"
    audit.record(zone.directory, actor=audit.cli_actor(), action="authz.remove", target=target, rules=count)
    emit({"removed": count, "target": target}, output, table=lambda: typer.echo(message))


@authz_app.command("list")
def list_rules(
    directory: ZoneDir,
    service: Annotated[str | None, typer.Option("--service", help="Only this service.")] = None,
    output: OutputOption = Output.table,
) -> None:
    """List the rules in the order the gateway applies them, per service.

    -o json prints a list of rules: rule_id, namespace, service, port (null: every port), action,
    pattern, source (config: zone.toml; api: the CLI or API).
    """
    zone = Zone.open(directory)
    with AuthzRules(zone.directory) as rules:
        current = [rule for rule in rules.rules() if service is None or rule.service == service]
    emit(
        current,
        output,
        table=lambda: print_table(
            f"zone {zone.name} authorization rules (first match decides; no match: denied)",
            ("id", "service", "port", "action", "caller", "from"),
            (
                (
                    rule.rule_id,
                    f"{rule.service}.{rule.namespace}",
                    "all" if rule.port is None else rule.port,
                    rule.action,
                    rule.pattern,
                    "zone.toml" if rule.source == "config" else "cli/api",
                )
                for rule in current
            ),
            width=140,
        ),
    )


def _describe(rule: AuthzRule) -> str:
    port = "" if rule.port is None else f" port {rule.port}"
    return f"{rule.action} {rule.pattern} on {rule.service}.{rule.namespace}{port}"
