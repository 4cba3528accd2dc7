"""Peering state as the operator sees it: connected or not (or unknown), expired offers, terminated peerings.

Two real zones in one process (controller, gateway, peering service over real
gRPC and TLS, see ``tests/test_peering.py``) and the real CLI reading their
directories.
"""

from __future__ import annotations

import datetime as dt
import logging

import pytest
from typer.testing import CliRunner

from meshfed.cli import app as cli
from meshfed.federation.dialer import establish
from meshfed.federation.peering_state import EXPIRED_PENDING_KEPT, PeerState
from meshfed.federation.peering_store import PeeringStore
from meshfed.zone import Zone
from tests.conftest import eventually
from tests.test_peering import Harness, run


def peer_show(zone: Zone, name: str) -> dict[str, str]:
    result = CliRunner().invoke(cli, ["peer", "show", "--dir", str(zone.directory), name])
    assert result.exit_code == 0, result.output
    fields = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def peer_list(zone: Zone) -> str:
    result = CliRunner().invoke(cli, ["peer", "list", "--dir", str(zone.directory)])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_peer_show_says_what_the_running_zone_knows_or_that_it_is_not_running(
    make_zone, caplog: pytest.LogCaptureFixture
) -> None:
    east, west = Harness(make_zone("east")), Harness(make_zone("west"))

    async def scenario() -> None:
        await east.start()
        await west.start()
        await establish(west.zone, east.service.issue_token("west").encoded)
        await eventually(lambda: west.state_of("east") is PeerState.ACTIVE, "west ACTIVE")
        await eventually(lambda: peer_show(west.zone, "east")["connected"] == "yes", "west's CLI sees it connected")
        await eventually(lambda: peer_show(east.zone, "west")["connected"] == "yes", "east's CLI sees it connected")
        shown = peer_show(west.zone, "east")
        assert shown["state"] == "ACTIVE"
        assert shown["zone"] == "east (east.mesh)"
        assert shown["peer addresses"] == east.service.stream_addresses[0]  # a list, printed as a list
        assert shown["last heartbeat received"].endswith("ago)")
        assert "None" not in shown.values()
        assert "[" not in "".join(shown.values())

        # East stops: west's zone still runs and knows the stream is down.
        await east.stop()
        await eventually(lambda: peer_show(west.zone, "east")["connected"] == "no", "west's CLI sees it down")
        await eventually(lambda: west.state_of("east") is PeerState.FAILING, "west marks east FAILING")
        # East's own directory: nobody runs there, so nobody knows.
        assert peer_show(east.zone, "west")["connected"] == "unknown: the zone is not running"
        await west.stop()
        assert peer_show(west.zone, "east")["connected"] == "unknown: the zone is not running"

    with caplog.at_level(logging.INFO, logger="meshfed.federation.service"):
        run(scenario())
    # Losing the peer is a warning that names it and says what to check.
    failing = [r for r in caplog.records if "-> FAILING" in r.getMessage()]
    assert failing
    assert all(r.levelno == logging.WARNING for r in failing)
    assert "peer east:" in failing[0].getMessage()
    assert "is zone east running" in failing[0].getMessage()
    refused = [r for r in caplog.records if "cannot connect" in r.getMessage()]
    assert refused, "the dialer's refused connections are not logged"
    assert all(r.levelno == logging.WARNING for r in refused)
    assert refused[0].getMessage().startswith("peer east at 127.0.0.1:")
    assert "peering port reachable" in refused[0].getMessage()


def test_expired_pending_peerings_are_not_listed_and_are_dropped_later(make_zone) -> None:
    east = make_zone("east")
    with PeeringStore.of(east) as store:
        issued = store.issue_token(east, "west", ["127.0.0.1:15441"], dt.timedelta(minutes=15))
        expires = issued.token.expires_at
        assert [p.name for p in store.peerings()] == ["west"]
        # Past its token's expiry the offer is gone from every read, though its row waits a while.
        later = expires + dt.timedelta(seconds=1)
        assert store.peerings(later) == []
        assert store.get("west", now=later) is None
        assert store.drop_expired_pending(later) == []
        assert store.drop_expired_pending(expires + EXPIRED_PENDING_KEPT + dt.timedelta(seconds=1)) == ["west"]
        assert store.connection.execute("SELECT count(*) FROM peering_tokens").fetchone() == (0,)
        # The CLI, after the real expiry: not listed; a new token makes a fresh offer.
        store.issue_token(east, "north", ["127.0.0.1:15441"], dt.timedelta(minutes=15))
        store.connection.execute("UPDATE peering_tokens SET expires_at = '2001-01-01T00:00:00Z'")
    assert "north" not in peer_list(east)
    with PeeringStore.of(east) as store:
        store.issue_token(east, "north", ["127.0.0.1:15441"], dt.timedelta(minutes=15))
    assert "PENDING" in peer_list(east)


def test_a_terminated_peering_makes_way_for_a_new_one_with_the_same_name(make_zone) -> None:
    east, west = Harness(make_zone("east")), Harness(make_zone("west"))

    async def both_active() -> None:
        await eventually(lambda: west.state_of("east") is PeerState.ACTIVE, "west ACTIVE")
        await eventually(lambda: east.state_of("west") is PeerState.ACTIVE, "east ACTIVE")

    async def scenario() -> None:
        await east.start()
        await west.start()
        await establish(west.zone, east.service.issue_token("west").encoded)
        await both_active()

        # West (the dialer) ends it: east keeps a TERMINATED row, which used to refuse a new token.
        await west.service.delete("east")
        await eventually(lambda: east.state_of("west") is PeerState.TERMINATED, "east sees TERMINATED")
        await establish(west.zone, east.service.issue_token("west").encoded)
        await west.service.refresh()
        await both_active()

        # East (the acceptor) ends it: now west's row is TERMINATED and holds east's trust domain.
        await east.service.delete("west")
        await eventually(lambda: west.state_of("east") is PeerState.TERMINATED, "west sees TERMINATED")
        await establish(west.zone, east.service.issue_token("west").encoded)
        await west.service.refresh()
        await both_active()
        with PeeringStore.of(west.zone) as store:
            assert [(p.name, p.state) for p in store.peerings()] == [("east", PeerState.ACTIVE)]

        await west.stop()
        await east.stop()

    run(scenario())
