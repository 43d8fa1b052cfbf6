"""Which offsets may be committed when records finish out of order (pure).

Many records of one partition are in flight at once; the committed offset may only move past a
record once it and every record before it are done, so a crash repeats work and never skips it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TopicPartition = tuple[str, int]


@dataclass
class _Partition:
    in_flight: set[int] = field(default_factory=set)
    done_up_to: int = -1  # highest finished offset with nothing lower still in flight


class OffsetTracker:
    """Tracks started and finished offsets; `committable()` gives the safe next offsets."""

    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, _Partition] = {}
        self._committed: dict[TopicPartition, int] = {}

    def started(self, topic: str, partition: int, offset: int) -> None:
        self._partitions.setdefault((topic, partition), _Partition()).in_flight.add(offset)

    def finished(self, topic: str, partition: int, offset: int) -> None:
        state = self._partitions.setdefault((topic, partition), _Partition())
        state.in_flight.discard(offset)
        state.done_up_to = max(state.done_up_to, offset)

    def in_flight(self) -> int:
        return sum(len(p.in_flight) for p in self._partitions.values())

    def committable(self) -> dict[TopicPartition, int]:
        """Next offsets to commit (Kafka's "next record to read"), only where they moved."""
        moved: dict[TopicPartition, int] = {}
        for tp, state in self._partitions.items():
            if state.in_flight:
                position = min(state.in_flight)
            elif state.done_up_to >= 0:
                position = state.done_up_to + 1
            else:
                continue
            if self._committed.get(tp) != position:
                moved[tp] = position
        return moved

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def forget(self, tp: TopicPartition) -> None:
        """Drop a partition this worker no longer owns."""
        self._partitions.pop(tp, None)
        self._committed.pop(tp, None)
