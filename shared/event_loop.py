"""The event loop every Waypost process runs on: uvloop (libuv) by default, the standard
library's asyncio loop when `WAYPOST_EVENT_LOOP=asyncio`.

The stream workers and the admin start their loops themselves (ingest's come from uvicorn,
which picks uvloop on its own). What they spend outside their own code is mostly the loop's:
sockets to providers and the document store, futures completed from Kafka's threads, tasks
switched per contact. docs/stream-processing.md has the measurement behind the default.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

import uvloop

T = TypeVar("T")

EventLoop = Literal["uvloop", "asyncio"]
LOOPS: tuple[EventLoop, ...] = ("uvloop", "asyncio")


def chosen(environ: dict[str, str] | None = None) -> EventLoop:
    """The loop `WAYPOST_EVENT_LOOP` names (uvloop when unset); anything else is refused."""
    value = (environ if environ is not None else dict(os.environ)).get(
        "WAYPOST_EVENT_LOOP", "uvloop"
    )
    for loop in LOOPS:
        if value.strip().lower() == loop:
            return loop
    raise ValueError(f"WAYPOST_EVENT_LOOP must be one of {', '.join(LOOPS)}, not {value!r}")


def factory(loop: EventLoop) -> Callable[[], asyncio.AbstractEventLoop]:
    return uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], loop: EventLoop | None = None) -> T:
    """`asyncio.run(main)` on the chosen loop (`chosen()` when `loop` is None). Safe on any
    thread: no process-wide policy is set."""
    with asyncio.Runner(loop_factory=factory(loop or chosen())) as runner:
        return runner.run(main)
