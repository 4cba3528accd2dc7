"""Token misuse is refused with one clear line and leaves nothing behind, on either zone.

The accepting zone runs for real (controller + peering service on loopback, in
a background event loop); the dialing zone is driven through the CLI, as an
operator would.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import threading
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from meshfed.cli import app
from meshfed.errors import InvalidTokenError, MeshfedError, PeeringError
from meshfed.federation.dialer import establish
from meshfed.federation.peering_state import PeerState
from meshfed.federation.peering_store import PeeringStore
from meshfed.federation.token import decode_token, hash_secret
from meshfed.zone import Zone
from tests.clocks import ManualClock
from tests.test_peering import Harness, run

runner = CliRunner()


class Background:
    """Runs a zone's controller on its own event loop thread, so the CLI can run in this one."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def close(self) -> None:
        self.call(self.harness.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def east(make_zone) -> Iterator[Background]:
    background = Background(Harness(make_zone("east")))
    background.call(background.harness.start())
    yield background
    background.close()


def cli(*args: str) -> Any:
    return runner.invoke(app, list(args))


def token_for(zone: Zone, peer: str, ttl: str = "15m") -> str:
    result = cli("peer", "token", "--dir", str(zone.directory), "--peer", peer, "--ttl", ttl)
    assert result.exit_code == 0, result.output
    line: str = result.stdout.strip().splitlines()[0]
    return line


def refused(zone: Zone, token: str, error: type[MeshfedError] = InvalidTokenError) -> str:
    result = cli("peer", "establish", "--dir", str(zone.directory), token)
    assert result.exit_code != 0
    assert isinstance(result.exception, error), result.exception
    message = str(result.exception)
    assert "\n" not in message
    return message


def assert_nothing_stored(dialer: Zone, acceptor: Zone) -> None:
    with PeeringStore.of(dialer) as store:
        assert store.peerings() == []
    assert [s.bundle.trust_domain.name for s in dialer.trust.trusted_bundles()] == [dialer.trust_domain.name]
    assert [s.bundle.trust_domain.name for s in acceptor.trust.trusted_bundles()] == [acceptor.trust_domain.name]
    with PeeringStore.of(acceptor) as store:
        assert all(p.state is PeerState.PENDING for p in store.peerings())


def reencode(token: str, **changes: object) -> str:
    return decode_token(token).model_copy(update=changes).encode()


def test_the_secret_is_stored_only_as_a_hash(east, make_zone):
    token = token_for(east.harness.zone, "west")
    secret = decode_token(token).secret
    database = (east.harness.zone.directory / "state.db").read_bytes()
    assert secret.encode() not in database
    with PeeringStore.of(east.harness.zone) as store:
        rows = store.connection.execute("SELECT secret_hash FROM peering_tokens").fetchall()
    assert rows == [(hash_secret(secret),)]


def test_bad_tokens_are_refused_and_nothing_is_stored(east, make_zone):
    acceptor = east.harness.zone
    west = make_zone("west")
    good = token_for(acceptor, "west")

    assert "not base64url" in refused(west, "!!not-base64!!")
    assert "does not decode to JSON" in refused(west, base64.urlsafe_b64encode(b"{not json").decode())
    assert "malformed" in refused(west, base64.urlsafe_b64encode(b'{"peer_name": "west"}').decode())
    assert "secret is unknown" in refused(west, reencode(good, secret="A" * 43))
    # Expired by the clock on the dialer, and by the acceptor's own record when the token's date is forged.
    past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    assert "expired" in refused(west, reencode(good, expires_at=past))
    short = token_for(acceptor, "west", ttl="1s")
    # The acceptor's own record has lapsed (as a second on its clock would make it), whatever the token says.
    with PeeringStore.of(acceptor) as store:
        store.connection.execute("UPDATE peering_tokens SET expires_at = ? WHERE used_at IS NULL", (past.isoformat(),))
    assert "expired" in refused(west, reencode(short, expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)))
    # Foreign: meant for another zone (caught locally, and by the acceptor when the name is forged).
    north_token = token_for(acceptor, "north")
    assert "issued for zone 'north'" in refused(west, north_token)
    assert "issued for zone 'north'" in refused(west, reencode(north_token, peer_name="west"))
    # A zone's own token presented to itself.
    assert "issued by zone east itself" in refused(acceptor, token_for(acceptor, "west"))
    # Unreachable acceptor: the error names the address and what to check.
    message = refused(west, reencode(token_for(acceptor, "west"), addresses=["127.0.0.1:9"]), PeeringError)
    assert "127.0.0.1:9" in message
    assert "reachable" in message
    assert_nothing_stored(west, acceptor)

    # The latest token still works after all that, exactly once.
    good = token_for(acceptor, "west")
    result = cli("peer", "establish", "--dir", str(west.directory), good)
    assert result.exit_code == 0, result.exception
    with PeeringStore.of(west) as store:
        store.delete("east")  # forget it locally so only the acceptor's check can refuse the reuse
    assert "already used" in refused(west, good)


def test_cli_list_show_and_delete_on_a_stopped_zone(east, make_zone):
    acceptor = east.harness.zone
    west = make_zone("west")
    result = cli("peer", "establish", "--dir", str(west.directory), "--name", "e1", token_for(acceptor, "west"))
    assert result.exit_code == 0, result.exception
    assert "the stream opens when this zone runs" in result.stdout
    listed = cli("peer", "list", "--dir", str(west.directory))
    assert "e1" in listed.stdout
    assert "ESTABLISHING" in listed.stdout
    shown = cli("peer", "show", "--dir", str(west.directory), "e1")
    assert "zone:                    east (east.mesh)" in shown.stdout
    assert "connected:               unknown: the zone is not running" in shown.stdout
    missing = cli("peer", "show", "--dir", str(west.directory), "nope")
    assert isinstance(missing.exception, PeeringError)
    deleted = cli("peer", "delete", "--dir", str(west.directory), "e1")
    assert "marked for deletion" in deleted.stdout
    with PeeringStore.of(west) as store:
        assert store.require("e1").state is PeerState.TERMINATED


def test_a_token_wrapped_by_a_terminal_is_accepted(east, make_zone):
    acceptor = east.harness.zone
    west = make_zone("west")
    token = token_for(acceptor, "west")
    # As a terminal or a mail client breaks it: newlines every 64 characters, indentation, a trailing space.
    wrapped = "\n  ".join(token[i : i + 64] for i in range(0, len(token), 64)) + " \n"
    assert decode_token(wrapped) == decode_token(token)
    result = runner.invoke(app, ["peer", "establish", "--dir", str(west.directory), "-"], input=wrapped)
    assert result.exit_code == 0, result.exception
    with PeeringStore.of(west) as store:
        assert store.require("east").state is PeerState.ESTABLISHING


def test_a_token_is_accepted_until_its_expiry_on_each_side_and_refused_from_then_on(make_zone):
    """The acceptor's clock and the dialer's each decide, to the millisecond; nothing waits for real time."""
    clock = ManualClock()
    east = Harness(make_zone("east"), clock=clock)
    west, north = make_zone("west"), make_zone("north")
    ttl = dt.timedelta(hours=1)

    async def scenario() -> None:
        await east.start()
        try:
            # At its expiry on the acceptor's clock the token is refused there (the dialer's clock is earlier).
            first = east.service.issue_token("west", ttl).token
            clock.advance((first.expires_at - clock.now()).total_seconds())
            with pytest.raises(InvalidTokenError, match="refused the token: this peering token expired"):
                await establish(west, first.encode())
            assert_nothing_stored(west, east.zone)

            # A millisecond before it, the acceptor takes it.
            second = east.service.issue_token("west", ttl).token
            clock.advance((second.expires_at - clock.now()).total_seconds() - 0.001)
            peering = await establish(west, second.encode())
            assert peering.state is PeerState.ESTABLISHING
            assert east.service.peer("west").state is PeerState.ESTABLISHING

            # The dialer's own clock refuses a token at its expiry, before asking the acceptor.
            third = east.service.issue_token("north", ttl).token
            north_clock = ManualClock()
            north_clock.advance((third.expires_at - north_clock.now()).total_seconds())
            with pytest.raises(InvalidTokenError, match=r"expired at .*; ask for a new one"):
                await establish(north, third.encode(), clock=north_clock)
            with PeeringStore.of(east.zone) as store:
                assert store.get("north") is not None  # still PENDING: east never saw it
        finally:
            await east.stop()

    run(scenario())
