"""A batch's tasks run together (`shared.tasks.run_all`)."""

from __future__ import annotations

import asyncio

import pytest

from shared.tasks import STARTED_TOGETHER, run_all


class Fenced(BaseException):
    pass


async def test_a_failing_task_cancels_the_others() -> None:
    cancelled = asyncio.Event()

    async def waits_long() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def fails() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await asyncio.wait_for(run_all([waits_long, fails]), timeout=5)
    assert cancelled.is_set()


async def test_run_all_starts_its_tasks_a_few_per_turn_of_the_loop() -> None:
    """What the loop heard meanwhile (an acknowledgement, an answer) is served between the
    groups, not after every task of a large batch had its first go."""
    order: list[str] = []
    loop = asyncio.get_running_loop()

    async def work(n: int) -> None:
        order.append(f"task {n}")
        if n == 0:  # the first task's write is acknowledged at once
            loop.call_soon(order.append, "heard")
        await asyncio.sleep(0)

    await run_all([lambda n=n: work(n) for n in range(STARTED_TOGETHER * 3)])  # type: ignore[misc]

    starts = [entry for entry in order if entry.startswith("task")]
    assert len(starts) == STARTED_TOGETHER * 3
    assert order.index("heard") <= STARTED_TOGETHER  # within the first group's turn


async def test_run_all_starts_no_more_tasks_once_one_failed() -> None:
    started: list[int] = []

    async def work(n: int) -> None:
        started.append(n)
        if n == 0:
            raise Fenced("moved on")
        await asyncio.sleep(60)

    with pytest.raises(Fenced):
        await run_all([lambda n=n: work(n) for n in range(STARTED_TOGETHER * 10)])  # type: ignore[misc]

    assert len(started) < STARTED_TOGETHER * 10
