"""The group commit of a batch's tasks (`shared.rendezvous`)."""

from __future__ import annotations

import asyncio

import pytest

from shared.rendezvous import Rendezvous


class Fenced(BaseException):
    pass


async def test_one_action_for_every_task_parked_at_once() -> None:
    log: list[str] = []

    async def action() -> None:
        log.append("commit")

    rendezvous = Rendezvous(action)

    async def task(name: str) -> None:
        log.append(f"{name} before")
        await rendezvous.gate()
        log.append(f"{name} after")

    await rendezvous.run([lambda n=n: task(n) for n in ("a", "b", "c")])

    assert log.count("commit") == 1
    assert log.index("commit") > max(log.index(f"{n} before") for n in "abc")
    assert log.index("commit") < min(log.index(f"{n} after") for n in "abc")
    assert rendezvous.rounds == 1


async def test_a_task_that_finishes_without_parking_does_not_hold_the_others() -> None:
    commits = 0

    async def action() -> None:
        nonlocal commits
        commits += 1

    rendezvous = Rendezvous(action)
    reached: list[str] = []

    async def parks() -> None:
        await rendezvous.gate()
        reached.append("parked one went on")

    async def skips() -> None:
        await asyncio.sleep(0.01)  # a slow decision not to send
        reached.append("skipped")

    await asyncio.wait_for(rendezvous.run([parks, skips]), timeout=5)

    assert reached == ["skipped", "parked one went on"]
    assert commits == 1


async def test_a_second_gate_of_a_task_waits_for_the_next_round() -> None:
    order: list[str] = []

    async def action() -> None:
        order.append("commit")

    rendezvous = Rendezvous(action)

    async def two_sends() -> None:
        await rendezvous.gate()
        order.append("first send")
        await rendezvous.gate()
        order.append("second send")

    async def one_slow_send() -> None:
        await rendezvous.gate()
        await asyncio.sleep(0.02)  # its provider call
        order.append("slow send")

    await asyncio.wait_for(rendezvous.run([two_sends, one_slow_send]), timeout=5)

    # The second round waits until the slow task has finished (it might have parked again).
    assert order == ["commit", "first send", "slow send", "commit", "second send"]
    assert rendezvous.rounds == 2


async def test_a_failed_action_reaches_every_parked_task_and_cancels_the_rest() -> None:
    async def action() -> None:
        raise Fenced("the group moved on")

    rendezvous = Rendezvous(action)
    effects: list[str] = []

    async def sender(name: str) -> None:
        await rendezvous.gate()
        effects.append(name)  # a provider call: must never happen

    with pytest.raises(Fenced):
        await asyncio.wait_for(
            rendezvous.run([lambda n=n: sender(n) for n in ("a", "b")]), timeout=5
        )
    assert effects == []


async def test_a_failing_task_cancels_the_others() -> None:
    async def action() -> None:
        return None

    rendezvous = Rendezvous(action)
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
        await asyncio.wait_for(rendezvous.run([waits_long, fails]), timeout=5)
    assert cancelled.is_set()


async def test_no_work_is_no_round() -> None:
    async def action() -> None:
        raise AssertionError("no round without a task")

    rendezvous = Rendezvous(action)
    await rendezvous.run([])
    assert rendezvous.rounds == 0
