"""The in-memory index of due times for the durable timers held in the contacts table.

The table is the source of truth (it survives restarts through its changelog); this heap is only
an index, rebuilt from the table after every rebalance. Firing a timer twice is harmless: the
engine ignores a timer that its instance no longer waits on.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(order=True, frozen=True)
class DueTimer:
    due_at: datetime
    timer_id: str = field(compare=False)
    contact_key: str = field(compare=False)
    instance_id: str = field(compare=False)


class TimerIndex:
    """A min-heap of due times, de-duplicated by timer id. O(log n) add and pop."""

    def __init__(self) -> None:
        self._heap: list[DueTimer] = []
        self._ids: set[str] = set()

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, timer: DueTimer) -> None:
        if timer.timer_id in self._ids:
            return
        self._ids.add(timer.timer_id)
        heapq.heappush(self._heap, timer)

    def pop_due(self, now: datetime, limit: int = 1000) -> list[DueTimer]:
        due: list[DueTimer] = []
        while self._heap and self._heap[0].due_at <= now and len(due) < limit:
            timer = heapq.heappop(self._heap)
            self._ids.discard(timer.timer_id)
            due.append(timer)
        return due

    def clear(self) -> None:
        self._heap.clear()
        self._ids.clear()
