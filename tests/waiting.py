"""Waiting in tests: a condition polled until it holds, with a deadline; never a bare sleep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T | None],
    *,
    timeout: float = 60.0,
    what: str = "condition",
    every: float = 0.1,
) -> T:
    """Poll until `condition` returns something truthy, and return it; fail with `what` after
    the deadline. Blocks: for tests that run outside an event loop."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)  # poll again; the deadline above bounds the whole wait


async def holds_within(condition: Callable[[], bool], seconds: float, every: float = 0.01) -> bool:
    """Whether `condition` holds within `seconds`, polled without blocking the running loop
    (the code under test may run on it)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(every)  # poll again; the deadline above bounds the whole wait
    return True


async def eventually(
    condition: Callable[[], bool], *, timeout: float, what: str, every: float = 0.01
) -> None:
    """`holds_within`, failing the test with `what` when the deadline passes."""
    if not await holds_within(condition, timeout, every):
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")
