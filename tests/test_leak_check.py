"""The leaked-task check of ``tests/conftest.py`` can fail: a forgotten task is reported."""

from __future__ import annotations

import asyncio


def test_a_task_left_running_is_reported(no_leaked_tasks: list[str]) -> None:
    async def forgetful() -> None:
        asyncio.get_running_loop().create_task(asyncio.Event().wait(), name="forgotten")

    asyncio.run(forgetful())
    assert no_leaked_tasks == ["forgotten (Event.wait)"]
    no_leaked_tasks.clear()  # left running on purpose: the check itself is what is tested


def test_a_task_that_ends_within_a_few_turns_is_not_a_leak(no_leaked_tasks: list[str]) -> None:
    async def tidy() -> None:
        task = asyncio.get_running_loop().create_task(asyncio.Event().wait())
        task.cancel()  # still unwinding when main returns

    asyncio.run(tidy())
    assert no_leaked_tasks == []
