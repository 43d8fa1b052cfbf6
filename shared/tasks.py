"""A batch's tasks run together (`run_all`): a stream worker that handles a batch's units of work
concurrently (the dispatcher: one task per contact of the batch) starts them a few per turn of
the event loop, and the first failure ends them all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

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
