"""The group commit of a batch's tasks (`shared.rendezvous`)."""

from __future__ import annotations

import asyncio

import pytest

from shared.rendezvous import STARTED_TOGETHER, Rendezvous, run_all


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


async def test_a_task_aside_does_not_hold_the_round_back() -> None:
    """A provider call of one task (aside) and another task's try: the round runs while the
    call is under way, not after it."""
    order: list[str] = []
    call_may_end = asyncio.Event()

    async def action() -> None:
        order.append("commit")

    rendezvous = Rendezvous(action)

    async def calling() -> None:
        async with rendezvous.aside():
            await call_may_end.wait()
        order.append("call ended")

    async def parks() -> None:
        await rendezvous.gate()
        order.append("parked went on")
        call_may_end.set()

    await asyncio.wait_for(rendezvous.run([calling, parks]), timeout=5)

    assert order == ["commit", "parked went on", "call ended"]


async def test_stepping_back_in_waits_for_a_running_round() -> None:
    """Nothing written by a task that comes back from aside may fall into a running round."""
    order: list[str] = []
    round_started = asyncio.Event()
    round_may_end = asyncio.Event()

    async def action() -> None:
        order.append("round begins")
        round_started.set()
        await round_may_end.wait()
        order.append("round ends")

    rendezvous = Rendezvous(action)

    async def calling() -> None:
        async with rendezvous.aside():
            await round_started.wait()  # the call answers while the round commits
        order.append("outcome written")

    async def parks() -> None:
        await rendezvous.gate()

    async def ends_the_round() -> None:
        async with rendezvous.aside():
            await round_started.wait()
            await asyncio.sleep(0)
            order.append("call answered")
            round_may_end.set()

    await asyncio.wait_for(rendezvous.run([calling, parks, ends_the_round]), timeout=5)

    assert order.index("outcome written") > order.index("round ends")
    assert order.index("call answered") < order.index("round ends")


async def test_calls_in_slots_make_a_round_per_wave() -> None:
    """Tries that mark themselves only once they hold one of two call slots: every try is
    committed before its call, no more than two are committed and not yet called, and the
    waiting for a slot does not stall the rounds."""
    slots = asyncio.Semaphore(2)
    committed: set[str] = set()
    marked: set[str] = set()
    called: list[str] = []
    most_waiting = 0

    async def action() -> None:
        nonlocal most_waiting
        committed.update(marked)
        most_waiting = max(most_waiting, len(committed) - len(called))

    rendezvous = Rendezvous(action)

    async def one_try(name: str) -> None:
        async with rendezvous.aside():
            await slots.acquire()
        try:
            marked.add(name)
            await rendezvous.gate()
            assert name in committed
            async with rendezvous.aside():
                await asyncio.sleep(0.001)
                called.append(name)
        finally:
            slots.release()

    names = [f"t{i}" for i in range(7)]
    await asyncio.wait_for(rendezvous.run([lambda n=n: one_try(n) for n in names]), timeout=5)

    assert sorted(called) == names
    assert most_waiting <= 2
    assert rendezvous.rounds >= 4


async def test_a_cancelled_task_aside_leaves_at_once() -> None:
    round_may_end = asyncio.Event()

    async def action() -> None:
        await round_may_end.wait()

    rendezvous = Rendezvous(action)

    async def fails_during_the_round() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("boom")

    async def parks() -> None:
        await rendezvous.gate()

    async def calling() -> None:
        async with rendezvous.aside():
            await asyncio.sleep(60)

    with pytest.raises(RuntimeError, match="boom"):
        await asyncio.wait_for(rendezvous.run([calling, parks, fails_during_the_round]), timeout=5)
    round_may_end.set()  # the round that was left running ends with the test


async def test_a_round_waits_for_a_joining_task_and_commits_it_with_the_others() -> None:
    commits: list[list[str]] = []
    parked: list[str] = []

    async def action() -> None:
        commits.append(sorted(parked))
        parked.clear()

    rendezvous = Rendezvous(action, join_wait=60.0)
    staged = asyncio.Event()

    async def ready() -> None:
        parked.append("ready")
        await rendezvous.gate()

    async def staging() -> None:
        async with rendezvous.joining():
            await staged.wait()  # an SMTP server taking the message
        parked.append("staged")
        await rendezvous.gate()

    async def server() -> None:
        # Let "ready" park; the round could fire, but "staging" is joining.
        for _ in range(10):
            await asyncio.sleep(0)
        assert rendezvous.rounds == 0
        staged.set()

    await asyncio.wait_for(rendezvous.run([ready, staging, server]), timeout=5)
    assert commits == [["ready", "staged"]]


async def test_a_round_fires_without_a_joining_task_that_takes_longer_than_the_wait() -> None:
    committed = asyncio.Event()
    rounds: list[list[str]] = []
    parked: list[str] = []

    async def action() -> None:
        rounds.append(sorted(parked))
        parked.clear()
        committed.set()

    rendezvous = Rendezvous(action, join_wait=0.01)

    async def ready() -> None:
        parked.append("ready")
        await rendezvous.gate()

    async def slow() -> None:
        async with rendezvous.joining():
            await committed.wait()  # answers only once a round went without it
        parked.append("slow")
        await rendezvous.gate()

    await asyncio.wait_for(rendezvous.run([ready, slow]), timeout=5)
    assert rounds == [["ready"], ["slow"]]


async def test_a_joining_task_does_not_let_a_round_fire_while_another_task_runs() -> None:
    """Joining shortens no one else's work: the round still waits for a task that neither
    parked nor stepped aside, however long the joining one has waited."""
    order: list[str] = []
    working = asyncio.Event()

    async def action() -> None:
        order.append("commit")

    rendezvous = Rendezvous(action, join_wait=0.0)

    async def ready() -> None:
        await rendezvous.gate()
        order.append("ready went on")

    async def joining() -> None:
        async with rendezvous.joining():
            await working.wait()

    async def busy() -> None:
        for _ in range(20):
            await asyncio.sleep(0)  # work inside the batch, not aside
        order.append("busy done")
        working.set()

    await asyncio.wait_for(rendezvous.run([ready, joining, busy]), timeout=5)
    assert order[:2] == ["busy done", "commit"]


async def test_a_joining_task_left_behind_waits_for_the_running_action_before_going_on() -> None:
    """The round fired without a task still joining and is committing when that task comes
    back: the task writes nothing until the action ended (a record produced into a committing
    transaction would fail it)."""
    order: list[str] = []
    committing = asyncio.Event()
    finish_commit = asyncio.Event()

    async def action() -> None:
        order.append("commit begins")
        committing.set()
        await finish_commit.wait()
        order.append("commit ends")

    rendezvous = Rendezvous(action, join_wait=0.01)

    async def ready() -> None:
        await rendezvous.gate()

    async def slow() -> None:
        async with rendezvous.joining():
            await committing.wait()  # back while the round that went without it commits
            finish_commit.set()
        order.append("slow writes")

    await asyncio.wait_for(rendezvous.run([ready, slow]), timeout=5)
    assert order == ["commit begins", "commit ends", "slow writes"]


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
