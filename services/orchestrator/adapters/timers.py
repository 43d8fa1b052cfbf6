"""Durable orchestrator timers: one compact table row per waiting instance, and a due-time index.

The table (`timers`, RocksDB restored from its changelog, co-partitioned with `contacts`) is
the truth. The in-memory heap is only an index over it, rebuilt from the table after every
recovery; see docs/timers.md for the costs and what happens on crashes and partition moves.
"""

from __future__ import annotations

import heapq
import struct
import sys
from collections.abc import Iterable, MutableMapping
from datetime import UTC, datetime, timedelta

import structlog

from shared.contracts import TimerFired
from shared.journey_engine.state import CancelTimer, ScheduleTimer
from shared.streams import Table

log = structlog.get_logger(__name__)

# Row layout. Key: contact key, NUL, instance id (ids are hex, so the last NUL splits the key).
# Value: the due time as 8-byte big-endian epoch milliseconds, then the timer id. A heap entry is
# `value[:8] + key`, so plain bytes comparison orders entries by due time.
SEPARATOR = b"\x00"
_DUE = struct.Struct(">Q")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
# Refire delays double after each unanswered firing; the exponent is capped to keep ints small.
_MAX_DOUBLINGS = 20


def epoch_ms(when: datetime) -> int:
    """Epoch milliseconds, rounded up: a timer never fires before its due time."""
    return -((_EPOCH - when) // _MS)


def from_epoch_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def timer_key(contact_key: str, instance_id: str) -> bytes:
    return contact_key.encode() + SEPARATOR + instance_id.encode()


def timer_value(due_ms: int, timer_id: str) -> bytes:
    return _DUE.pack(due_ms) + timer_id.encode()


def timer_fired(key: bytes, value: bytes, now: datetime) -> TimerFired:
    """The wire record for the timer stored under `key` with `value`."""
    contact_key, _sep, instance_id = key.rpartition(SEPARATOR)
    return TimerFired(
        contact_key=contact_key.decode(),
        instance_id=instance_id.decode(),
        timer_id=value[8:].decode(),
        due_at=from_epoch_ms(_DUE.unpack_from(value)[0]),
        fired_at=now,
    )


class TimerStore:
    """The waiting instances' timers on this worker's partitions.

    `table` is any mutable mapping of bytes to bytes: the worker's table, a dict in
    tests. Writes happen only in `apply` (called while a record is handled); firing reads.

    The index is a heap of `due + key` byte strings with lazy deletion: an entry is checked
    against the table when it reaches the top, and dropped if its instance was cancelled or now
    waits on another time. Restarting a timer to a later time (S12) pushes nothing: the old,
    earlier entry is moved to the new due time when it pops. Other superseded entries are
    dropped by a compaction once they outnumber the live timers.
    """

    def __init__(
        self,
        table: MutableMapping[bytes, bytes],
        *,
        refire_after: timedelta = timedelta(seconds=30),
        refire_max: timedelta = timedelta(minutes=15),
        compact_floor: int = 1024,
    ) -> None:
        self._table = table
        self._heap: list[bytes] = []
        # Fired but not yet answered by the engine: key -> (its re-arm heap entry, refires so far).
        self._fired: dict[bytes, tuple[bytes, int]] = {}
        self._live = 0
        self._refire_ms = refire_after // _MS
        self._refire_max_ms = refire_max // _MS
        self._compact_floor = compact_floor

    def __len__(self) -> int:
        """Timers in the table (exact after each rebuild; revoked partitions linger until then)."""
        return self._live

    @property
    def indexed(self) -> int:
        """Heap entries, live and superseded."""
        return len(self._heap)

    def index_bytes(self) -> int:
        """Memory held by the index: the heap list, its byte strings and the fired map."""
        heap = self._heap
        entries = sys.getsizeof(b"") * len(heap) + sum(map(len, heap))
        return sys.getsizeof(heap) + entries + sys.getsizeof(self._fired)

    def timer_id(self, contact_key: str, instance_id: str) -> str | None:
        """The id of the timer stored for this instance, if it has a row."""
        value = self._table.get(timer_key(contact_key, instance_id))
        return value[8:].decode() if value is not None else None

    def apply(self, command: ScheduleTimer | CancelTimer) -> None:
        """Store the engine's timer command: schedule (or restart) overwrites, cancel deletes."""
        key = timer_key(command.contact_key, command.instance_id)
        old = self._table.get(key)
        if isinstance(command, CancelTimer):
            if old is not None:
                del self._table[key]
                self._live -= 1
            self._fired.pop(key, None)
            return
        value = timer_value(epoch_ms(command.due_at), command.timer_id)
        if old == value:
            return  # a replayed command
        self._table[key] = value
        if old is None:
            self._live += 1
        was_fired = self._fired.pop(key, None) is not None
        if was_fired or old is None or value[:8] < old[:8]:
            heapq.heappush(self._heap, value[:8] + key)
        # Otherwise the due time stayed or moved later: the heap already holds an entry at or
        # before it, which is moved when it pops. S12's restarts cost one table write, no entry.

    def pop_due(self, now: datetime, limit: int = 1000) -> list[TimerFired]:
        """Up to `limit` timers due at `now`, earliest first; each is re-armed, not forgotten.

        A fired timer keeps its row until the engine answers with CancelTimer or ScheduleTimer.
        Until then its heap entry sits at now + the refire delay, so a TimerFired record that
        was lost or ignored is sent again, with doubling delays.
        """
        now_ms = (now - _EPOCH) // _MS
        horizon = _DUE.pack(now_ms)
        heap = self._heap
        fired: list[TimerFired] = []
        while heap and len(fired) < limit and heap[0][:8] <= horizon:
            entry = heap[0]
            key = entry[8:]
            armed = self._fired.get(key)
            if armed is not None and armed[0] != entry:
                heapq.heappop(heap)  # superseded while the fired timer awaits the engine
                continue
            value = self._table.get(key)
            if value is None:
                heapq.heappop(heap)  # cancelled, or its partition moved to another worker
                self._fired.pop(key, None)
                continue
            if armed is None and value[:8] > entry[:8]:
                heapq.heapreplace(heap, value[:8] + key)  # restarted to a later time
                continue
            refires = 0 if armed is None else armed[1] + 1
            delay = min(self._refire_ms << min(refires, _MAX_DOUBLINGS), self._refire_max_ms)
            rearm = _DUE.pack(now_ms + delay) + key
            heapq.heapreplace(heap, rearm)
            self._fired[key] = (rearm, refires)
            fired.append(timer_fired(key, value, now))
        return fired

    @property
    def needs_compaction(self) -> bool:
        return len(self._heap) - self._live > max(self._live, self._compact_floor)

    def compact_if_needed(self) -> None:
        """Drop superseded entries once they outnumber the live timers: amortised O(1) each."""
        if self.needs_compaction:
            before = len(self._heap)
            self.rebuild()
            log.info("orchestrator.timers_compacted", entries_before=before, live=self._live)

    def rebuild(self) -> int:
        """Index every row of the table; returns how many. Run after each recovery.

        A worker's table iterates only the partitions this worker owns. The scan holds the event
        loop (under 1 us a row): the consumer heartbeats on its own thread, and rebalances are
        applied by the loop between batches, so they cannot change the table under it.
        Unanswered fired timers keep their re-arm time instead of firing again.
        """
        self._heap = []  # let the old index go before the new one is built
        fired = self._fired
        still_fired: dict[bytes, tuple[bytes, int]] = {}
        rows = stored_rows(self._table)
        if not fired:
            heap = [value[:8] + key for key, value in rows]
        else:
            heap = []
            for key, value in rows:
                armed = fired.get(key)
                if armed is None:
                    heap.append(value[:8] + key)
                else:
                    heap.append(armed[0])
                    still_fired[key] = armed
        heapq.heapify(heap)
        self._heap = heap
        self._fired = still_fired
        self._live = len(heap)
        return self._live


def stored_rows(table: MutableMapping[bytes, bytes]) -> Iterable[tuple[bytes, bytes]]:
    """The table's rows as stored: a worker's table scans its partitions' databases undecoded;
    any other mapping (a dict in tests) gives its items."""
    if isinstance(table, Table):
        return table.rows()
    return table.items()
