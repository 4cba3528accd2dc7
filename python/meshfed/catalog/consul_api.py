"""Consul's HTTP API as the Consul catalog calls it: the client, one read, one write, and what a failure means.

Reads and writes go through py-consul's HTTP client (its aiohttp session and
its status-to-exception mapping) but not its endpoint wrappers: those hide the
``X-Consul-Results-Filtered-By-Acls`` header, and ``catalog.register`` /
``deregister`` put the token into the JSON body as ``WriteRequest``, which a
Consul with ACLs refuses (``Request decode failed: json: unknown field
"WriteRequest"``), and send node meta as a query filter that register ignores.
The token travels in the ``X-Consul-Token`` header only.

ACLs: Consul does not refuse a read the token may not make, it filters the
answer, and says so in ``X-Consul-Results-Filtered-By-Acls`` (never for the
anonymous token); :class:`Answer` carries that, and :meth:`ConsulApi.hidden`
says which rule would show what is missing. A refused write (403) is described
by :meth:`ConsulApi.describe` with the rule to add when Consul names the
missing permission. The rules meshfed's token needs are in
``helm/meshfed/examples/consul-acl-policy.hcl`` (:data:`ACL_POLICY_FILE`).

Used by :mod:`meshfed.catalog.consul_watch` (reading),
:mod:`meshfed.catalog.consul_imports` (registering imports) and
:mod:`meshfed.leadership.consul` (the leader's lock).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
import consul
import consul.aio
from consul.callback import CB

from meshfed.catalog.settings import ConsulSettings
from meshfed.errors import CatalogError, MeshfedError

# The Consul catalog's one logger, named for meshfed.catalog.consul as before the split into modules.
log = logging.getLogger("meshfed.catalog.consul")

# Named in error hints: the one place that says which ACL rules meshfed's token needs.
ACL_POLICY_FILE = "helm/meshfed/examples/consul-acl-policy.hcl"
_FILTERED_HEADER = "X-Consul-Results-Filtered-By-Acls"
# Consul's 403 names the missing permission: lacks permission 'service:write' on "api-west".
_MISSING_PERMISSION = re.compile(r"lacks permission '(\w+):(\w+)'(?: on \"([^\"]*)\")?")


@dataclass(frozen=True)
class Answer:
    """A Consul read: the raw ``X-Consul-Index``, the decoded body (None on 404), and what ACLs hid."""

    index: str | None
    body: Any
    filtered: bool
    default_deny: bool


def _answer(response: Any) -> Answer:
    body = CB.json()(response)  # raises py-consul's exceptions on 4xx/5xx and on bodies that are not JSON
    headers = response.headers  # case-insensitive (aiohttp)
    return Answer(
        index=headers.get("X-Consul-Index"),
        body=body,
        filtered=headers.get(_FILTERED_HEADER, "").lower() == "true",
        default_deny=headers.get("X-Consul-Default-Acl-Policy", "").lower() == "deny",
    )


class _HTTPClient(consul.aio.HTTPClient):  # type: ignore[misc]
    """py-consul's aiohttp client, adding the Enterprise ``ns`` / ``partition`` query parameters to every call."""

    extra_params: tuple[tuple[str, str], ...] = ()

    def uri(self, path: str, params: list[tuple[str, Any]] | None = None) -> str:
        uri: str = super().uri(path, params)
        if not self.extra_params:
            return uri
        return f"{uri}{'&' if '?' in uri else '?'}{urlencode(self.extra_params)}"


class _Consul(consul.aio.Consul):  # type: ignore[misc]
    def __init__(self, *, extra_params: list[tuple[str, str]], **kwargs: Any) -> None:
        self._extra_params = extra_params
        super().__init__(**kwargs)

    def http_connect(self, host: str, port: int, scheme: str, verify: bool | str = True, cert: Any = None) -> Any:
        client = _HTTPClient(
            host,
            port,
            scheme,
            connections_timeout=self.connections_timeout,
            verify=verify,
            cert=cert,
        )
        client.extra_params = tuple(self._extra_params)
        return client


class ConsulApi:
    """One Consul as a zone's catalog talks to it: ``address``, the zone's token, the node meshfed registers on."""

    def __init__(self, settings: ConsulSettings, *, node: str, blocking_wait: float) -> None:
        self.settings = settings
        self.address = settings.address
        self.node = node
        self._wait = blocking_wait
        self._token = _read_token(settings.token_file)
        self._client: _Consul | None = None
        self._warned_anonymous = False

    def client(self) -> _Consul:
        """The client, made on first use."""
        if self._client is None:
            self._client = self._connect()
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def _connect(self) -> _Consul:
        parts = urlsplit(self.address)
        settings = self.settings
        extra: list[tuple[str, str]] = []
        if settings.namespace:
            extra.append(("ns", settings.namespace))
        if settings.partition:
            extra.append(("partition", settings.partition))
        cert = (settings.cert_file, settings.key_file) if settings.cert_file and settings.key_file else None
        client = _Consul(
            extra_params=extra,
            host=parts.hostname,
            port=parts.port or (443 if parts.scheme == "https" else 8500),
            scheme=parts.scheme,
            dc=settings.datacenter,
            verify=settings.ca_file or True,
            cert=cert,
            # A blocking query may take wait + wait/16 (Consul's jitter): allow for it, and no more.
            connections_timeout=self._wait * 1.25 + 10,
        )
        # py-consul prefers CONSUL_HTTP_TOKEN over the token it is given; the zone's config wins here.
        client.token = self._token
        return client

    # -- HTTP -------------------------------------------------------------------------------------------

    async def get(self, path: str, index: int | None = None, params: dict[str, str] | None = None) -> Answer:
        """One read; with ``index``, a blocking query that returns once Consul's index passes it (or on ``wait``).
        ``params``: more of the query (``keys`` to list a KV prefix)."""
        query = self._params(params)
        if index:
            query += [("index", str(index)), ("wait", self._wait_param())]
        answer: Answer = await self.client().http.get(_answer, path, params=query, headers=self._headers())
        if answer.default_deny and self._token is None and not self._warned_anonymous:
            # Consul filters the anonymous token's reads without saying so: this is the only sign.
            self._warned_anonymous = True
            log.warning(
                "Consul at %s enforces ACLs (default policy deny) and zone.toml names no [consul] token_file: "
                "Consul shows meshfed only what its anonymous token may read, and does not say what it hides "
                "— create a token with the policy in %s",
                self.address,
                ACL_POLICY_FILE,
            )
        return answer

    async def put(self, path: str, body: dict[str, Any]) -> None:
        """One catalog write, the token in the header only (Consul refuses unknown fields in the body)."""
        if self.settings.datacenter:
            body = {**body, "Datacenter": self.settings.datacenter}
        await self.client().http.put(CB.boolean(), path, data=json.dumps(body), headers=self._headers())

    async def send(self, path: str, *, params: dict[str, str] | None = None, body: Any = None) -> Any:
        """One PUT that answers a value (a session's ID, whether a lock was taken): its decoded JSON, None on
        404. ``body``: a string or bytes is sent as it is (a KV value), anything else as JSON."""
        data = "" if body is None else body if isinstance(body, str | bytes) else json.dumps(body)
        return await self.client().http.put(
            CB.json(), path, params=self._params(params), data=data, headers=self._headers()
        )

    async def delete(self, path: str, *, params: dict[str, str] | None = None) -> None:
        """One DELETE (a KV key); a key that is not there is no error, as Consul answers."""
        await self.client().http.delete(CB.json(), path, params=self._params(params), headers=self._headers())

    def _params(self, params: dict[str, str] | None) -> list[tuple[str, str]]:
        query = list((params or {}).items())
        if self.settings.datacenter:
            query.append(("dc", self.settings.datacenter))
        return query

    def _headers(self) -> dict[str, str]:
        return {"X-Consul-Token": self._token} if self._token else {}

    def _wait_param(self) -> str:
        return f"{max(self._wait, 0.001) * 1000:.0f}ms"

    # -- what went wrong, and what to check ---------------------------------------------------------------

    def hidden(self, path: str) -> str:
        """What an answer filtered by ACLs lacks, and which rule of the documented policy would show it."""
        where, token = f"Consul at {self.address}", self._token_named()
        if path == "/v1/catalog/services":
            return (
                f"{where} hides services from {token} (ACL-filtered {path}): the catalog lacks them "
                f'— does its policy grant service:read on every service (service_prefix "" read, {ACL_POLICY_FILE})?'
            )
        if path.startswith("/v1/health/service/"):
            # One message for every service, so that a token without node:read is one log line, not one per service.
            return (
                f"{where} hides instances on nodes that {token} cannot read (ACL-filtered /v1/health/service): "
                f'services lack endpoints — does its policy grant node:read on every node (node_prefix "" read, '
                f"{ACL_POLICY_FILE})?"
            )
        return (
            f"{where} hides node {self.node} or its services from {token} (ACL-filtered {path}): meshfed cannot "
            f"tell what it registered there — does its policy grant node:read and service:read ({ACL_POLICY_FILE})?"
        )

    def _token_named(self) -> str:
        if self.settings.token_file is None:
            return "the anonymous ACL token (zone.toml names no [consul] token_file)"
        return f"the ACL token in {self.settings.token_file}"

    def _denied(self, text: str, key_prefix: str | None = None) -> str:
        """A 403, with the ACL rule that would have allowed it when Consul names the missing permission (for a
        key under ``key_prefix``, the rule on the prefix: its other keys need it too)."""
        where, token = f"Consul at {self.address}", self._token_named()
        if self.settings.token_file is None:
            return (
                f"{where} denied access (403 {text}) to {token} — create a token with the policy in {ACL_POLICY_FILE}"
            )
        if "ACL not found" in text:
            return (
                f"{where} does not know {token} (403 ACL not found) — is it the SecretID of a token "
                "that exists in this datacenter?"
            )
        missing = _MISSING_PERMISSION.search(text)
        if missing is None:
            return f"{where} denied access (403 {text}) — does {token} carry the policy in {ACL_POLICY_FILE}?"
        kind, access, name = missing.groups()
        on = f' on "{name}"' if name is not None else ""
        rule = f'{kind} "{name}" {{ policy = "{access}" }}' if name is not None else f'{kind} = "{access}"'
        if kind == "key" and key_prefix is not None and name is not None and name.startswith(f"{key_prefix}/"):
            rule = f'key_prefix "{key_prefix}/" {{ policy = "{access}" }}'
        return (
            f"{where} denied access (403 {text}) — {token} lacks {kind}:{access}{on}: "
            f"add `{rule}` to its policy (see {ACL_POLICY_FILE})"
        )

    @contextlib.contextmanager
    def described(
        self, what: str, error: type[MeshfedError] = MeshfedError, *, key_prefix: str | None = None
    ) -> Iterator[None]:
        """Consul's and the HTTP client's errors in the block as one ``error`` about ``what``, saying what to
        check (:meth:`describe`); meshfed's own errors pass as they are."""
        try:
            yield
        except MeshfedError:
            raise
        except Exception as err:
            raise error(f"{what}: {self.describe(err, key_prefix=key_prefix)}") from None

    def describe(self, err: BaseException, *, key_prefix: str | None = None) -> str:
        where = f"Consul at {self.address}"
        if isinstance(err, CatalogError):
            return str(err)
        if isinstance(err, aiohttp.ClientConnectorError):
            return f"{where} refused the connection ({err.os_error}) — is [consul] address in zone.toml right?"
        if isinstance(err, consul.ACLPermissionDenied):
            return self._denied(str(err).strip(), key_prefix)
        if isinstance(err, consul.ACLDisabled):
            return f"{where} rejected the request (401 {str(err).strip()}) — check the ACL token"
        if isinstance(err, TimeoutError | consul.Timeout):
            return f"{where} did not answer in time — is it overloaded or behind a proxy that cuts long polls?"
        text = str(err).strip()
        if "Failed to decode JSON" in text:
            return f"{where} sent a response that is not JSON — is that address a Consul HTTP API? ({text[:200]})"
        return f"{where}: {type(err).__name__}: {text[:300]}"


def _read_token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError as err:
        raise CatalogError(f"cannot read the Consul ACL token file {path}: {err.strerror}") from None


__all__ = ["ACL_POLICY_FILE", "Answer", "ConsulApi"]
