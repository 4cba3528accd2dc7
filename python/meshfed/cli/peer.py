"""``meshfed peer``: peer this zone with others using one-time tokens.

Each command works through the zone's API when it runs (or ``--api``): the
running peering service opens, shows and tears down streams at once. On a zone
that does not run they work on its files, which it reads when it starts.
``establish`` always needs the *accepting* zone to be running: it dials it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
import time
from typing import Annotated, Any

import typer

from meshfed import audit
from meshfed.addresses import parse_host_port
from meshfed.catalog.publisher import PublicationStore
from meshfed.cli.common import OptionalZoneDir, Output, OutputOption, emit, parse_duration, print_table
from meshfed.cli.remote import ApiOption, CaOption, TokenFileOption, target
from meshfed.errors import MeshfedError
from meshfed.federation.dialer import establish
from meshfed.federation.peer_status import PeerStatus
from meshfed.federation.peering_store import PeeringStore, request_delete
from meshfed.zone import STATE_FILE

peer_app = typer.Typer(help="Peer this zone with other zones (tokens, establish, list, delete).", no_args_is_help=True)

_DELETE_WAIT_SECONDS = 5.0


@peer_app.command("token")
def token(
    peer: Annotated[str, typer.Option(help="Name of the zone allowed to redeem the token (its zone name).")],
    ttl: Annotated[str, typer.Option(help="How long the token stays valid, such as 15m or 1h.")] = "15m",
    address: Annotated[
        list[str] | None,
        typer.Option(
            help="HOST:PORT where peers reach this zone's establishment port (a zone that is not running). "
            "Default: where it serves, or as last run."
        ),
    ] = None,
    directory: OptionalZoneDir = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Print a one-time token that lets zone PEER establish a peering with this zone.

    -o json prints what POST /v1/peerings/tokens answers: the token, when it expires, the addresses in it.
    """
    lifetime = parse_duration(ttl)
    # Put in the token and dialed by the peer: a port to connect to, 1-65535.
    given = [str(parse_host_port(text, what="--address", allow_zero=False)) for text in address or ()]
    where = target(directory, api, token_file, api_ca, change=True)
    if where.api is not None:
        if given:
            raise MeshfedError(
                "--address is for a zone that is not running; a running zone puts the addresses it serves "
                "establishment on in the token (set them with 'meshfed up --advertise-host')"
            )
        answer = where.api.post(
            "/v1/peerings/tokens", {"peer_name": peer, "ttl_seconds": int(lifetime.total_seconds())}
        )
        _emit_token(answer, output, f"token for zone {peer}")
        return
    zone = where.zone()
    with PeeringStore.of(zone) as store:
        listener = store.listener()
        addresses = given or (list(listener.establish_addresses) if listener else [])
        issued = store.issue_token(zone, peer, addresses, lifetime)
    # Never the token itself: it is a one-time secret, and the log outlives it.
    audit.record(
        zone.directory,
        actor=audit.cli_actor(),
        action="peer.token",
        target=f"peer {peer}",
        expires_at=issued.token.expires_at.isoformat(),
        addresses=addresses,
    )
    answer = {"token": issued.encoded, "expires_at": issued.token.expires_at, "addresses": list(addresses)}
    _emit_token(answer, output, f"token for zone {peer} to peer with {zone.name}")


def _emit_token(issued: dict[str, Any], output: Output, what: str) -> None:
    """The token as TokenResponse (what the API answers), or the token alone on stdout for people and
    scripts (``$(meshfed peer token ...)``); the note on stderr either way."""
    from meshfed.api.peering import TokenResponse  # the API's models (and fastapi) only for this command

    answer = TokenResponse.model_validate(issued)
    emit(answer, output, table=lambda: typer.echo(answer.token))
    typer.echo(f"{what} via {', '.join(answer.addresses)}; one use, expires {answer.expires_at.isoformat()}", err=True)


@peer_app.command("establish")
def establish_(
    encoded: Annotated[str, typer.Argument(metavar="TOKEN|-", help="The token, or '-' to read it from stdin.")],
    name: Annotated[
        str | None, typer.Option(help="Local name for the peering. Default: the accepting zone's name.")
    ] = None,
    directory: OptionalZoneDir = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Redeem a token from another zone: exchange trust bundles and record the peering.

    -o json prints what POST /v1/peerings/establish answers: the new peering (PeerStatus), with connected
    null when this zone is not running.
    """
    text = sys.stdin.read() if encoded == "-" else encoded
    where = target(directory, api, token_file, api_ca, change=True)
    if where.api is not None:
        made = PeerStatus.model_validate(
            where.api.post("/v1/peerings/establish", {"token": text.strip(), "name": name})
        )
        line = (
            f"established peering {made.name} with zone {made.peer_zone} ({made.peer_trust_domain}); "
            "the running zone opens the stream now"
        )
        emit(made, output, table=lambda: typer.echo(line))
        return
    zone = where.zone()
    peering = asyncio.run(establish(zone, text, name))
    audit.record(
        zone.directory,
        actor=audit.cli_actor(),
        action="peer.establish",
        target=f"peer {peering.name}",
        zone=peering.peer_zone,
        trust_domain=peering.peer_trust_domain,
    )
    with PeeringStore.of(zone) as store:
        status = PeerStatus.stored(store.require(peering.name))
        listener = store.listener()
    running = listener is not None and listener.alive()
    line = f"established peering {peering.name} with zone {peering.peer_zone} ({peering.peer_trust_domain}); " + (
        "the running controller opens the stream within a second"
        if running
        else "the stream opens when this zone runs ('meshfed up')"
    )
    emit(_status_document(status, running), output, table=lambda: typer.echo(line))


@peer_app.command("list")
def list_peers(
    directory: OptionalZoneDir = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
) -> None:
    """List peerings with their state, heartbeats, versions and lag.

    -o json prints the same list of objects as GET /v1/peerings (PeerStatus).
    """
    where = target(directory, api, token_file, api_ca, change=False)
    publication_error: str | None = None
    if where.api is not None:
        statuses = [PeerStatus.model_validate(item) for item in where.api.get("/v1/peerings")]
        catalog: dict[str, Any] = where.api.get("/v1/catalog")
        catalog_mode = catalog["source"]["mode"]
        publication_error = None if catalog["publication"]["ok"] else catalog["publication"]["error"]
    else:
        zone = where.zone()
        catalog_mode = zone.config.catalog
        with PeeringStore.of(zone) as store:
            statuses = [PeerStatus.of(peering) for peering in store.peerings()]
        with PublicationStore(zone.directory / STATE_FILE) as publications:
            publication = publications.get()
        if publication is not None and not publication.ok:
            publication_error = publication.last_error
    emit(
        statuses,
        output,
        table=lambda: print_table(
            "peerings",
            ("peer", "zone", "role", "state", "heartbeat age", "sent/acked", "received", "exported", "imported"),
            (
                (
                    status.name,
                    f"{status.peer_zone or '-'} ({status.peer_trust_domain or '-'})",
                    status.role,
                    status.state.value,
                    "-" if status.heartbeat_age_seconds is None else f"{status.heartbeat_age_seconds:.1f}s",
                    f"{status.sent_version}/{status.acked_version}",
                    status.received_version,
                    status.exported_services,
                    status.imported_services,
                )
                for status in statuses
            ),
        ),
    )
    for status in statuses:
        if status.import_error:
            typer.echo(f"warning: peer {status.name}: its newest update was refused: {status.import_error}", err=True)
        if status.state_reason and status.state.value in ("DISCONNECTED", "FAILING"):
            typer.echo(f"warning: peer {status.name} is {status.state.value}: {status.state_reason}", err=True)
    if publication_error is not None:
        typer.echo(
            f"warning: imports from these peers are served by the gateway but not published in the "
            f"{catalog_mode} catalog: {publication_error}",
            err=True,
        )


@peer_app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="The peering's local name.")],
    directory: OptionalZoneDir = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Show one peering in detail.

    A running zone says whether the stream is up; of a zone that is not
    running that is unknown, and says so. -o json prints the same object as
    GET /v1/peerings/NAME (PeerStatus), with connected null when unknown.
    """
    where = target(directory, api, token_file, api_ca, change=False)
    if where.api is not None:
        status = PeerStatus.model_validate(where.api.get(f"/v1/peerings/{name}"))
        running = True
    else:
        zone = where.zone()
        with PeeringStore.of(zone) as store:
            status = PeerStatus.stored(store.require(name))
            listener = store.listener()
        running = listener is not None and listener.alive()
    emit(_status_document(status, running), output, table=lambda: _print_status(status, running))


def _status_document(status: PeerStatus, running: bool) -> object:
    """``status`` as the API gives it; of a zone that is not running nobody knows whether the stream is up:
    connected is null, not false."""
    return status if running else {**status.model_dump(mode="json"), "connected": None}


def _print_status(status: PeerStatus, running: bool) -> None:
    now = dt.datetime.now(dt.UTC)
    lines = {
        "peer": status.name,
        "role": status.role,
        "state": status.state.value + (f" ({status.state_reason})" if status.state_reason else ""),
        "zone": f"{status.peer_zone or '-'} ({status.peer_trust_domain or '-'})",
        "peer addresses": ", ".join(status.peer_addresses) or "-",
        "connected": ("yes" if status.connected else "no") if running else "unknown: the zone is not running",
        "last connected": _moment(status.last_connected_at, now),
        "last heartbeat sent": _moment(status.last_heartbeat_sent_at, now),
        "last heartbeat received": _moment(status.last_heartbeat_received_at, now),
        "exports sent/acked": f"version {status.sent_version}/{status.acked_version}",
        "imports received": f"version {status.received_version}",
        "services exported": str(status.exported_services),
        "services imported": str(status.imported_services),
        "import error": status.import_error or "-",
    }
    width = max(map(len, lines))
    for key, value in lines.items():
        typer.echo(f"{key + ':':<{width + 1}} {value}")


def _moment(moment: dt.datetime | None, now: dt.datetime) -> str:
    if moment is None:
        return "never"
    return f"{moment.isoformat(timespec='seconds').replace('+00:00', 'Z')} ({_age(now - moment)} ago)"


def _age(elapsed: dt.timedelta) -> str:
    seconds = max(elapsed.total_seconds(), 0.0)
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


@peer_app.command("delete")
def delete(
    name: Annotated[str, typer.Argument(help="The peering's local name.")],
    directory: OptionalZoneDir = None,
    api: ApiOption = None,
    token_file: TokenFileOption = None,
    api_ca: CaOption = None,
    output: OutputOption = Output.table,
) -> None:
    """Delete a peering: tears it down on both sides when this zone runs, and removes its imports.

    -o json prints {"name": NAME, "deleted": true} once it is gone (the peer told, the imports removed),
    or false while the deletion is only recorded (the zone is not running, or has not finished yet).
    """
    where = target(directory, api, token_file, api_ca, change=True)
    if where.api is not None:
        where.api.delete(f"/v1/peerings/{name}")
        emit(
            {"name": name, "deleted": True},
            output,
            table=lambda: typer.echo(f"deleted peering {name}; the peer was told"),
        )
        return
    zone = where.zone()
    with PeeringStore.of(zone) as store:
        request_delete(store, name)
        audit.record(zone.directory, actor=audit.cli_actor(), action="peer.delete", target=f"peer {name}")
        listener = store.listener()
        if listener is None or not listener.alive():
            line = (
                f"peering {name} marked for deletion; this zone is not running, so the teardown "
                "(telling the peer, removing imports) finishes when it next starts"
            )
            emit({"name": name, "deleted": False}, output, table=lambda: typer.echo(line))
            return
        deadline = time.monotonic() + _DELETE_WAIT_SECONDS
        while store.get(name) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        gone = store.get(name) is None
    line = (
        f"deleted peering {name}; the peer was told"
        if gone
        else f"peering {name} marked for deletion; the running controller has not finished yet"
    )
    emit({"name": name, "deleted": gone}, output, table=lambda: typer.echo(line))


__all__ = ["peer_app"]
