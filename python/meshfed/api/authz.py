"""``/v1/authz``: the authorization rules of exported services (federation/authz.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response, status
from pydantic import Field

from meshfed.api.auth import audit_call, require_admin, require_reader
from meshfed.controller import Controller
from meshfed.errors import FederationError
from meshfed.federation.authz import MAX_RULES_PER_SERVICE, AuthzRules, ConfigRuleError, RuleView
from meshfed.policy.authz import RuleSpec

router = APIRouter(prefix="/v1/authz", tags=["authz"])
MAX_RULE_ID = 2**63 - 1  # SQLite's INTEGER: a larger id names no rule, and must not reach the database


class RuleRequest(RuleSpec):
    position: int | None = Field(
        default=None, ge=1, le=MAX_RULES_PER_SERVICE, description="1 = first of the service's API rules; default last."
    )


def _controller(request: Request) -> Controller:
    controller: Controller = request.app.state.controller
    return controller


async def _applied(controller: Controller) -> None:
    if controller.ready:
        await controller.exports_changed()


@router.get("", dependencies=[Depends(require_reader)])
def list_rules(request: Request, service: Annotated[str | None, Query()] = None) -> list[RuleView]:
    """Every rule in the order the gateway applies it; the first that matches a caller decides."""
    with AuthzRules(_controller(request).zone.directory) as rules:
        return [RuleView.of(rule) for rule in rules.rules() if service is None or rule.service == service]


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=[Depends(require_admin)])
async def add_rule(body: RuleRequest, request: Request) -> RuleView:
    """Add a rule; the gateway applies it before this call returns (when the zone runs)."""
    controller = _controller(request)
    spec = RuleSpec(**body.model_dump(exclude={"position"}))
    try:
        with AuthzRules(controller.zone.directory) as rules:
            rule = rules.add(spec, position=body.position)
    except FederationError as err:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(err)) from None
    audit_call(
        request,
        controller.zone.directory,
        "authz.add",
        f"{rule.service}.{rule.namespace}",
        rule_id=rule.rule_id,
        rule_action=rule.action,
        pattern=rule.pattern,
        port=rule.port,
    )
    await _applied(controller)
    return RuleView.of(rule)


@router.delete(
    "/{rule_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[Depends(require_admin)],
    responses={404: {"description": "No such rule"}, 409: {"description": "The rule comes from zone.toml"}},
)
async def remove_rule(rule_id: Annotated[int, Path(ge=1, le=MAX_RULE_ID)], request: Request) -> Response:
    """Remove a rule added by the CLI or API."""
    controller = _controller(request)
    try:
        with AuthzRules(controller.zone.directory) as rules:
            rule = rules.remove(rule_id)
    except FederationError as err:
        code = status.HTTP_409_CONFLICT if isinstance(err, ConfigRuleError) else status.HTTP_404_NOT_FOUND
        raise HTTPException(code, str(err)) from None
    audit_call(request, controller.zone.directory, "authz.remove", f"{rule.service}.{rule.namespace}", rule_id=rule_id)
    await _applied(controller)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
