"""Group commit for a batch of concurrent tasks: one durable step for all of them.

A transactional stream worker that calls providers must make its decision durable before the
call (`StreamWorker.checkpoint`), and one checkpoint per send would cost a broker round trip
each. `Rendezvous.run` starts one task per unit of work (the dispatcher: one per contact of the
batch); a task that reaches `gate()` parks there. When every task still running is parked, the
action (the checkpoint) runs once, and all parked tasks go on together. A task that parks again
later (a second send of the same contact, a fallback channel) waits for the next round.

A task that only waits on something outside (a provider call, a free call slot, a rate
limit) steps `aside()`: it does not hold the others' round back, and the action may run
meanwhile. Stepping back in waits for a running action to end, so nothing a task writes falls
between an action's reading of the writes and its commit. With calls aside, a try is made
durable as `sending` only once it holds a call slot: a round per wave of calls, not one for
the batch, and a crash strands only the tries actually under way.

A task that waits on something outside that usually ends within moments and is followed by
its park (staging an SMTP message) steps into `joining()` instead: a round that could fire but
for joining tasks waits for them, up to `join_wait` seconds, then fires without them. Stepping
aside there would make a round fire for almost every such task, one transaction each.

Should the action fail, every parked task gets its exception, and `run` cancels the others and
raises it: a fenced worker does nothing more for the batch.

The dispatcher uses the round only without a receipts topic (unit tests): with one, each try's
intent makes its mark durable, and a batch's tasks just run together (`run_all`, which starts
them a few per turn of the event loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial


class Rendezvous:
    def __init__(self, action: Callable[[], Awaitable[None]], join_wait: float = 0.0) -> None:
        self._action = action
        self._join_wait = join_wait
        self._live = 0
        self._joining = 0
        # Armed when only joining tasks keep a round from firing; once it rang, they don't.
        self._join_timer: asyncio.TimerHandle | None = None
        self._join_overdue = False
        self._parked: list[asyncio.Future[None]] = []
        self._firing = False
        self._firings: set[asyncio.Future[None]] = set()
        self._quiet = asyncio.Event()
        self._quiet.set()
        self.rounds = 0

    async def run(self, works: Sequence[Callable[[], Awaitable[None]]]) -> None:
        """Run every work concurrently until all finished; the first failure is raised (the
        others are cancelled)."""
        if not works:
            return
        self._live = len(works)
        await run_all([partial(self._tracked, work) for work in works])

    async def gate(self) -> None:
        """Park until every running task is parked or finished and the action has run."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._parked.append(waiter)
        self._maybe_fire()
        await waiter

    @asynccontextmanager
    async def aside(self) -> AsyncIterator[None]:
        """Wait on something outside the batch without holding back the others' round; on
        the way back in, a running action is waited for first (a cancelled task just leaves)."""
        self._live -= 1
        self._maybe_fire()
        try:
            async with self._away():
                yield
        finally:
            self._live += 1

    @asynccontextmanager
    async def joining(self) -> AsyncIterator[None]:
        """Wait on something outside the batch that the coming round should wait for, but
        only up to `join_wait` seconds from when it could fire without this task; on the way
        back, a running action is waited for first."""
        self._joining += 1
        self._maybe_fire()
        try:
            # A round that went without this task may be committing when it comes back.
            async with self._away(self._joined):
                yield
        finally:
            self._maybe_fire()

    def _joined(self) -> None:
        self._joining -= 1

    @asynccontextmanager
    async def _away(self, back: Callable[[], None] | None = None) -> AsyncIterator[None]:
        """Time outside the batch's work: on the way back (`back()` first), a running action
        is waited for, so nothing the task writes falls between the action's reading of the
        writes and its commit; a cancelled task just leaves."""
        cancelled = False
        try:
            yield
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            if back is not None:
                back()
            while not cancelled and self._firing:
                await self._quiet.wait()

    async def _tracked(self, work: Callable[[], Awaitable[None]]) -> None:
        try:
            await work()
        finally:
            self._live -= 1
            self._maybe_fire()

    def _maybe_fire(self) -> None:
        if self._firing or not self._parked:
            return
        missing = self._live - len(self._parked)  # running, neither parked nor aside
        if missing > self._joining:
            return
        if missing > 0 and not self._join_overdue:
            if self._join_timer is None:
                self._join_timer = asyncio.get_running_loop().call_later(
                    self._join_wait, self._overdue
                )
            return
        if self._join_timer is not None:
            self._join_timer.cancel()
            self._join_timer = None
        self._join_overdue = False
        self._firing = True
        self._quiet.clear()
        waiters, self._parked = self._parked, []
        firing = asyncio.ensure_future(self._fire(waiters))
        self._firings.add(firing)
        firing.add_done_callback(self._firings.discard)

    def _overdue(self) -> None:
        self._join_timer = None
        self._join_overdue = True
        self._maybe_fire()

    async def _fire(self, waiters: list[asyncio.Future[None]]) -> None:
        self.rounds += 1
        try:
            await self._action()
        except BaseException as exc:  # noqa: BLE001 - every parked task gets it
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
        else:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        finally:
            self._firing = False
            self._quiet.set()
            self._maybe_fire()


# Tasks `run_all` starts in one turn of the event loop. Each runs on its own to its first wait
# (a dispatcher's try: decoding, rendering, writing its intent), and what the loop heard
# meanwhile (acknowledgements, answers) waits until every task started in the same turn has
# had its go: a batch of 500 tries started at once held its first intents' acknowledgements
# back by 60 to 190 ms.
STARTED_TOGETHER = 8


async def run_all(works: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Run every work concurrently until all finished; the first failure is raised (the others
    are cancelled), and so is a cancellation (of them all)."""
    if not works:
        return
    tasks: list[asyncio.Future[None]] = []
    failed: list[asyncio.Future[None]] = []

    def note_failure(task: asyncio.Future[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            failed.append(task)

    try:
        for started, work in enumerate(works, 1):
            task: asyncio.Future[None] = asyncio.ensure_future(work())
            task.add_done_callback(note_failure)
            tasks.append(task)
            if started % STARTED_TOGETHER == 0 and started < len(works):
                await asyncio.sleep(0)
                if failed:
                    break  # the rest are never started
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        # Every finished task's outcome is taken (several may carry the same failure).
        failures = [t.exception() for t in done if not t.cancelled()]
        failure = next((exc for exc in failures if exc is not None), None)
        if failure is not None:
            for waiting in pending:
                waiting.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            raise failure
    except asyncio.CancelledError:
        for started_task in tasks:
            started_task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
