"""Which zone a command works on: a running zone through its API, or a stopped one through its files.

A zone's running process owns its state: it applies what it is told at once,
validates it the way the API does, and is the only writer of its files while it
runs. So every command that reads or changes a zone talks to its API when it
can, and to the zone directory only when nothing serves it:

- ``--api URL`` (or ``MESHFED_API``): that zone's API, wherever it runs, with
  ``--token-file`` (default: the zone directory's token: ``admin-token`` for changes,
  ``read-token`` for reads) and ``--api-ca`` for an HTTPS API signed by a
  private CA;
- ``--dir DIR`` of a zone that runs here: the API its ``meshfed up`` recorded
  in ``DIR/api-url``, with the directory's token, while the zone's controller
  lease is alive (a crashed zone's stale record is ignored);
- ``--dir DIR`` of a zone that does not run: its files, which the zone reads
  when it next starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer

# typer vendors click: its UsageError is what main() reports as a usage error (exit 2).
from typer._click.exceptions import UsageError
from typer._click.globals import get_current_context

from meshfed.cli.common import DIR_ENVVAR
from meshfed.errors import MeshfedError
from meshfed.runstate import RunState
from meshfed.zone import READ_TOKEN_FILE, STATE_FILE, TOKEN_FILE, Zone
from meshfed.zonelock import following_pid

API_URL_FILE = "api-url"
"""Where ``meshfed up`` records its API's URL in the zone directory (removed when it stops)."""

_TIMEOUT_SECONDS = 30.0  # establish dials the accepting zone and delete waits for the peer: seconds, not minutes

ApiOption = Annotated[
    str | None,
    typer.Option(
        "--api",
        envvar="MESHFED_API",
        help="Manage the zone through this API URL; default: the API of the zone in --dir when it runs.",
    ),
]
TokenFileOption = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        envvar="MESHFED_TOKEN_FILE",
        help="A token of the zone for --api; default: --dir's admin-token (changes) or read-token (reads).",
    ),
]
CaOption = Annotated[
    Path | None, typer.Option("--api-ca", help="CA certificate (PEM) that signed the API's TLS certificate.")
]


@dataclass(frozen=True)
class ZoneApi:
    """A zone's HTTP API, with a token; every failure is one :class:`MeshfedError` line."""

    url: str
    token: str
    verify: str | bool = True

    def get(self, path: str, **params: object) -> Any:
        return self.call("GET", path, params=params)

    def post(self, path: str, body: object) -> Any:
        return self.call("POST", path, body=body)

    def put(self, path: str, body: bytes, content_type: str) -> Any:
        return self.call("PUT", path, content=body, content_type=content_type)

    def delete(self, path: str, **params: object) -> Any:
        return self.call("DELETE", path, params=params)

    def call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, object] | None = None,
        body: object = None,
        content: bytes | None = None,
        content_type: str | None = None,
    ) -> Any:
        """The decoded JSON answer (None for 204), or a MeshfedError naming the zone and what it said."""
        headers = {"Authorization": f"Bearer {self.token}"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        query = {key: value for key, value in (params or {}).items() if value is not None}
        try:
            response = httpx.request(
                method,
                f"{self.url.rstrip('/')}{path}",
                params=query,  # type: ignore[arg-type]  # values are str/int/list, as httpx takes
                json=body,
                content=content,
                headers=headers,
                timeout=_TIMEOUT_SECONDS,
                verify=self.verify,
            )
        except httpx.HTTPError as err:
            raise MeshfedError(
                f"cannot reach the zone's API at {self.url}: {err}; is 'meshfed up' running, and is this its "
                "--api-address?"
            ) from None
        if response.status_code == 204:
            return None
        if response.is_success:
            return response.json()
        raise MeshfedError(_refusal(self.url, response))


def _refusal(url: str, response: httpx.Response) -> str:
    try:
        detail: Any = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text.strip() or response.reason_phrase
    if isinstance(detail, list):  # FastAPI's validation errors: name each field and what is wrong
        detail = "; ".join(
            f"{'.'.join(str(part) for part in error.get('loc', ())[1:]) or 'body'}: {error.get('msg', error)}"
            for error in detail
            if isinstance(error, dict)
        )
    # The API's own words say which token it wanted (admin or read); the flag to change is ours to name.
    hint = " (the token comes from --token-file, or the zone directory)" if response.status_code in (401, 403) else ""
    return f"the zone's API at {url} answered {response.status_code}: {detail}{hint}"


@dataclass(frozen=True)
class Target:
    """Where a command works: ``api`` when a zone serves it, else the zone directory's files."""

    api: ZoneApi | None
    directory: Path | None

    def zone(self) -> Zone:
        """The zone of ``--dir`` (for a command that works on files)."""
        if self.directory is None:
            _no_zone_given()
        return Zone.open(self.directory)


def target(
    directory: Path | None,
    api: str | None,
    token_file: Path | None,
    ca: Path | None,
    *,
    change: bool,
) -> Target:
    """The zone a command works on (see the module's docstring); ``change`` picks the default token."""
    if api is None:
        if directory is None:
            _no_zone_given()
        api = running_api_url(directory)
        if api is None:
            if change and (follower := following_pid(directory)) is not None:
                raise MeshfedError(
                    f"the zone in {directory} is a follower's copy (meshfed up pid {follower} waits to lead): "
                    "it is replaced when that process leads, so a change here would be lost; make it on the "
                    "leader's host or through its API (--api URL)"
                )
            return Target(None, directory)
    else:
        _check_url(api)
    return Target(ZoneApi(api, _token(directory, token_file, change), str(ca) if ca is not None else True), directory)


def _no_zone_given() -> NoReturn:
    # A usage error (exit 2), worded as click words a missing required option, with the other way named.
    raise UsageError(
        f"missing option '--dir' (or set {DIR_ENVVAR}), or give the zone's API with --api URL",
        ctx=get_current_context(silent=True),
    )


def _check_url(api: str) -> None:
    scheme, _, rest = api.partition("://")
    if scheme not in ("http", "https") or not rest.strip("/"):
        raise UsageError(
            f"--api {api!r} is not an API URL; give the zone's, such as http://127.0.0.1:8470",
            ctx=get_current_context(silent=True),
        )


def require_api(directory: Path | None, api: str | None, token_file: Path | None, ca: Path | None) -> ZoneApi:
    """The API of a zone that must be running (``status``, ``explain``): a read token."""
    if api is None and directory is not None and running_api_url(directory) is None:
        raise MeshfedError(
            f"zone in {directory} is not running (no live {API_URL_FILE}): start it with "
            f"'meshfed up --dir {directory}', or give --api URL for a zone elsewhere"
        )
    found = target(directory, api, token_file, ca, change=False).api
    assert found is not None  # target() gives an API whenever one was given or recorded
    return found


def running_api_url(directory: Path) -> str | None:
    """The API URL the zone in ``directory`` serves, while its controller's lease is alive."""
    try:
        recorded = (directory / API_URL_FILE).read_text().strip()
    except OSError:
        return None
    if not recorded or not (directory / STATE_FILE).exists():
        return None
    with RunState(directory) as state:
        return recorded if state.running() else None


def _token(directory: Path | None, token_file: Path | None, change: bool) -> str:
    if token_file is None:
        if directory is None:
            raise MeshfedError("give --token-file (a token of the zone) with --api, or --dir for the zone's own token")
        token_file = directory / (TOKEN_FILE if change else READ_TOKEN_FILE)
    try:
        return token_file.read_text().strip()
    except OSError as err:
        raise MeshfedError(f"cannot read the token {token_file}: {err.strerror or err}") from None


__all__ = [
    "API_URL_FILE",
    "ApiOption",
    "CaOption",
    "Target",
    "TokenFileOption",
    "ZoneApi",
    "require_api",
    "running_api_url",
    "target",
]
