"""The event loop every Waypost process runs on: uvloop (libuv) by default, the standard
library's asyncio loop when `WAYPOST_EVENT_LOOP=asyncio` (`CommonSettings.event_loop`).

The stream workers and the admin start their loops themselves (ingest's come from uvicorn,
which picks uvloop on its own). What they spend outside their own code is mostly the loop's:
sockets to providers and the document store, futures completed from Kafka's threads, tasks
switched per contact. docs/stream-processing.md has the measurement behind the default.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

import uvloop

T = TypeVar("T")

EventLoop = Literal["uvloop", "asyncio"]


def factory(loop: EventLoop) -> Callable[[], asyncio.AbstractEventLoop]:
    return uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], loop: EventLoop) -> T:
    """`asyncio.run(main)` on `loop` (a service's `event_loop` setting). Safe on any thread:
    no process-wide policy is set."""
    with asyncio.Runner(loop_factory=factory(loop)) as runner:
        return runner.run(main)
