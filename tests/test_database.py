"""The running zone's database: one connection on one thread, units in order, and the change feed."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
from pathlib import Path

import pytest

from meshfed.database import Database
from meshfed.federation.exports import ExportRules
from meshfed.zone import STATE_FILE


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


def test_blocking_call_is_refused_on_the_event_loop_and_works_from_a_worker_thread(tmp_path: Path) -> None:
    database = Database(tmp_path / STATE_FILE)

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="would block"):
            database.call(lambda db: None)
        assert await asyncio.to_thread(database.call, lambda db: db.execute("SELECT 1").fetchone()) == (1,)

    try:
        asyncio.run(scenario())
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
