"""A consumer's progress check runs beside the loop: the loop goes on while it waits on the
broker, takes its answer once on a later turn, and waits for it before the consumer closes."""

from __future__ import annotations

import asyncio
import threading

from shared.membership import CheckBeside


async def _answer(check: CheckBeside, seconds: float = 5.0) -> bool | None:
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        verdict = check.verdict()
        if verdict is not None:
            return verdict
        await asyncio.sleep(0.01)
    return None


def test_the_loop_goes_on_while_the_check_waits_and_takes_its_answer_once() -> None:
    async def scenario() -> None:
        release = threading.Event()
        calls = []

        def stalled() -> bool:
            calls.append(1)
            release.wait(5)
            return True

        check = CheckBeside()
        check.start(stalled)
        check.start(stalled)  # one check at a time
        # The loop's turns go on meanwhile.
        turns = 0
        for _ in range(5):
            await asyncio.sleep(0)
            turns += 1
        assert turns == 5
        assert check.running
        assert check.verdict() is None
        release.set()
        assert await _answer(check) is True
        assert check.verdict() is None  # taken once
        assert not check.running
        assert calls == [1]

    asyncio.run(scenario())


def test_finish_waits_for_the_check_and_drops_its_answer() -> None:
    async def scenario() -> None:
        ended = threading.Event()

        def stalled() -> bool:
            ended.wait(0.2)
            ended.set()
            return True

        check = CheckBeside()
        check.start(stalled)
        await check.finish()
        assert ended.is_set()
        assert not check.running
        assert check.verdict() is None
        await check.finish()  # nothing running: returns at once

    asyncio.run(scenario())


def test_a_synchronous_close_waits_for_the_check_s_thread() -> None:
    async def scenario() -> None:
        used = threading.Event()
        released = threading.Event()

        def stalled() -> bool:
            used.set()
            released.wait(0.3)
            released.set()
            return False

        check = CheckBeside()
        check.wait_ended(0)  # never started: returns at once
        check.start(stalled)
        await asyncio.to_thread(used.wait, 5)
        check.wait_ended(5)
        assert released.is_set()

    asyncio.run(scenario())


def test_a_check_that_failed_gives_no_answer_and_the_next_one_runs() -> None:
    async def scenario() -> None:
        def broken() -> bool:
            raise TimeoutError("the broker did not answer")

        check = CheckBeside()
        check.start(broken)
        deadline = asyncio.get_running_loop().time() + 5
        while check.running and asyncio.get_running_loop().time() < deadline:
            assert check.verdict() is None  # no answer, and nothing raised into the loop
            await asyncio.sleep(0.01)
        assert not check.running
        check.start(lambda: True)
        assert await _answer(check) is True

    asyncio.run(scenario())
