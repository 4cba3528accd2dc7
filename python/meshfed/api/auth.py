"""API authentication: reads need a token of the zone, mutations its admin token.

A zone has two bearer tokens, both files in its directory (0600):

* ``read-token`` may call every read of the zone's topology (catalog, exports,
  peerings, trust listing, gateway stats, ``/v1/zone``) and nothing else;
* ``admin-token`` may call everything, reads included.

``/healthz``, ``/readyz``, ``/metrics`` and the zone's own SPIFFE bundle
(``GET /v1/trust/bundle``, public by design) take no token. A route declares
its level with ``dependencies=[Depends(require_reader)]`` or
``Depends(require_admin)``; ``tests/test_api_auth.py`` walks every route of the
app, so a new read left open fails the suite.

No token is 401 naming the token to send; a token that is neither is 403; the
read token on a mutation is 403 saying it is read-only. Tokens are compared in
constant time and never logged.
"""

from __future__ import annotations

import hmac
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from meshfed import audit

_bearer = HTTPBearer(
    auto_error=False,
    description="A token of the zone: read-token (reads only) or admin-token (everything), "
    "both files in the zone directory ('meshfed zone token --read|--admin').",
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]

NEEDS_ADMIN = "this call needs the zone's admin token: send 'Authorization: Bearer <admin-token>'"
NEEDS_READER = (
    "this call needs a token of the zone: send 'Authorization: Bearer <read-token>' "
    "(or the admin token; 'meshfed zone token --read' prints it)"
)
READ_ONLY = (
    "the read token is read-only: this call changes the zone and needs the admin token ('meshfed zone token --admin')"
)
WRONG_ADMIN = "the admin token is wrong for this zone"
WRONG_TOKEN = "the token is neither this zone's read token nor its admin token"  # noqa: S105 -- a message


class Role(Enum):
    """What the caller's token allows."""

    reader = "reader"
    admin = "admin"


def _role(request: Request, token: str) -> Role | None:
    presented = token.encode()
    admin: str = request.app.state.admin_token
    if hmac.compare_digest(presented, admin.encode()):
        return Role.admin
    # An app built without a read token (a router on its own in a test) knows only the admin token.
    reader: str | None = getattr(request.app.state, "read_token", None)
    if reader and hmac.compare_digest(presented, reader.encode()):
        return Role.reader
    return None


def _missing(message: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"})


def require_admin(request: Request, credentials: Credentials) -> Role:
    """The admin token: 401 without a token, 403 with the read token or a wrong one."""
    if credentials is None:
        raise _missing(NEEDS_ADMIN)
    role = _role(request, credentials.credentials)
    if role is Role.admin:
        return role
    raise HTTPException(status.HTTP_403_FORBIDDEN, READ_ONLY if role is Role.reader else WRONG_ADMIN)


def require_reader(request: Request, credentials: Credentials) -> Role:
    """The read token or the admin token: 401 without a token, 403 with a wrong one."""
    if credentials is None:
        raise _missing(NEEDS_READER)
    role = _role(request, credentials.credentials)
    if role is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, WRONG_TOKEN)
    return role


def audit_call(request: Request, zone_directory: Path, action: str, target: str, **detail: Any) -> None:
    """Record an admin call that changed the zone: who (``api:admin@<client host>``), the method and path.

    Called by each mutating route once its change is made; ``detail`` never holds a secret
    (a peering token's secret, a key): the log is for operators, not a copy of the state.
    """
    audit.record(
        zone_directory,
        actor=audit.api_actor(request),
        action=action,
        target=target,
        method=request.method,
        path=request.url.path,
        **detail,
    )


__all__ = ["Role", "audit_call", "require_admin", "require_reader"]
