"""A channel's call slots: a semaphore whose size follows the channel's `CallLimit`."""

from __future__ import annotations

import asyncio
from collections import deque

from services.dispatcher.domain.limits import CallLimit


class ChannelSlots:
    """Tries of one channel wait here, first come first served, until fewer than the limit
    allows are taken; each provider call's duration adjusts the limit (`sample`)."""

    def __init__(self, limit: CallLimit) -> None:
        self.limit = limit
        self.in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if not self._waiters and self.in_use < self.limit.allowed:
            self.in_use += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot just as it was cancelled: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.in_use -= 1
        self._wake()

    def sample(self, seconds: float) -> None:
        """A provider call of the channel took `seconds`."""
        self.limit.sample(seconds, self.in_use)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_use < self.limit.allowed:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_use += 1
                waiter.set_result(None)
