"""The running zone's database: one connection on one thread, units in order, and the change feed."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from meshfed.database import Database
from meshfed.federation.authz import AuthzRules
from meshfed.federation.exports import ExportRules
from meshfed.runtime import assemble_zone
from meshfed.zone import STATE_FILE
from tests.conftest import eventually
from tests.test_e2e_federation import LOOPBACK, call, register_echo


def _threads_of(database: Database, units: int) -> set[int]:
    async def scenario() -> set[int]:
        idents = await asyncio.gather(*(database.run(lambda db: threading.get_ident()) for _ in range(units)))
        return set(idents)

    return asyncio.run(scenario())


def _append(order: list[int], n: int, db: sqlite3.Connection) -> None:
    order.append(n)


def test_every_unit_runs_on_the_one_owner_thread_in_submission_order(tmp_path: Path) -> None:
    database = Database(tmp_path / STATE_FILE)
    try:
        assert len(_threads_of(database, 20)) == 1
        order: list[int] = []

        async def scenario() -> None:
            await asyncio.gather(*(database.run(functools.partial(_append, order, n)) for n in range(50)))

        asyncio.run(scenario())
        assert order == list(range(50))
    finally:
        database.close()


def test_the_feed_sees_own_commits_and_other_connections_commits(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    database = Database(path)

    async def scenario() -> None:
        seen = database.version
        # Nothing changed: the feed answers with the same version once the timeout passes.
        assert await database.changed(seen, 0) == seen
        await database.using(ExportRules, lambda rules: rules.add("web", "default", ["west"]))
        own = await database.changed(seen, 0)
        assert own > seen
        # Another connection (the CLI, another process) commits: data_version tells.
        with ExportRules(tmp_path) as other:
            other.add("db", "default", ["west"])
        assert await database.changed(own, 10) > own
        # A read changes nothing.
        now = database.version
        await database.using(ExportRules, ExportRules.rules)
        assert await database.changed(now, 0) == now

    try:
        asyncio.run(scenario())
    finally:
        database.close()


def test_every_store_of_the_process_borrows_the_one_connection_one_block_at_a_time(tmp_path: Path) -> None:
    database = Database(tmp_path / STATE_FILE)
    in_block, go_on = threading.Event(), threading.Event()
    order: list[str] = []

    def cli_like_write() -> None:
        # As the API's handlers and the zone's own parts write: a store by path, in a worker thread.
        with ExportRules(tmp_path) as rules, AuthzRules(tmp_path) as authz:  # nested: one lease
            assert rules._db is authz._db
            in_block.set()
            go_on.wait(10)
            rules.add("web", "default", ["west"])
            order.append("block")

    async def scenario() -> None:
        seen = database.version
        writer = asyncio.ensure_future(asyncio.to_thread(cli_like_write))
        await asyncio.to_thread(in_block.wait, 10)
        # A unit submitted during the block waits for it: the block holds the connection alone.
        unit = asyncio.ensure_future(database.run(lambda db: order.append("unit")))
        await asyncio.sleep(0)
        assert order == []
        go_on.set()
        await asyncio.gather(writer, unit)
        assert order == ["block", "unit"]
        assert database.version > seen  # the block's commit is the zone's own: the feed counts it

    try:
        asyncio.run(scenario())
        # Once closed, stores open connections of their own again (the CLI's way).
        database.close()
        with ExportRules(tmp_path) as rules:
            assert [rule.service for rule in rules.rules()] == ["web"]
    finally:
        database.close()


def test_a_cancelled_caller_leaves_its_unit_to_finish_and_the_connection_open(tmp_path: Path) -> None:
    database = Database(tmp_path / STATE_FILE)
    entered, release = threading.Event(), threading.Event()

    def slow(db: sqlite3.Connection) -> None:
        entered.set()
        release.wait(10)
        db.execute("CREATE TABLE finished (a)")

    async def scenario() -> None:
        task = asyncio.ensure_future(database.run(slow))
        await asyncio.to_thread(entered.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        # Queued behind the cancelled caller's unit, which completed on the connection still open.
        assert await database.run(lambda db: db.execute("SELECT count(*) FROM finished").fetchone()) == (0,)

    try:
        asyncio.run(scenario())
    finally:
        database.close()


def test_a_closed_database_refuses_new_units(tmp_path: Path) -> None:
    database = Database(tmp_path / STATE_FILE)
    database.close()
    with pytest.raises(RuntimeError):
        asyncio.run(database.run(lambda db: None))


def test_two_running_zones_federate_over_one_connection_each(make_zone, echo_server, monkeypatch) -> None:
    """After start, peering, exports, imports, health and the lease go through each zone's one connection."""
    east, west = make_zone("east"), make_zone("west")
    register_echo(east, echo_server)
    with ExportRules(east.directory) as rules:
        rules.add("echo", "default", ["west"])
    opened: list[str] = []
    connect = sqlite3.connect

    def counting_connect(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        opened.append(str(database))
        connection: sqlite3.Connection = connect(database, *args, **kwargs)
        return connection

    async def scenario() -> None:
        runtimes = [assemble_zone(zone, LOOPBACK) for zone in (east, west)]
        for runtime in runtimes:
            await runtime.controller.start()
        e, w = runtimes
        monkeypatch.setattr(sqlite3, "connect", counting_connect)
        try:
            await w.peering.establish(e.peering.issue_token("west").encoded, "east")
            egress = "egress:echo.default.east:tcp"
            await eventually(lambda: egress in w.controller.gateway.addresses(), "west's egress for echo")
            assert await call(w, egress, b"one writer") == b"one writer"
            # A rule written as the API writes it (a store by path, in this process) is seen by the zone.
            with ExportRules(east.directory) as rules:
                rules.remove("echo", "default")
            await eventually(lambda: egress not in w.controller.gateway.addresses(), "the unexport reaches west")
        finally:
            for runtime in reversed(runtimes):
                await runtime.controller.stop()
            monkeypatch.undo()

    asyncio.run(scenario())
    assert opened == []
