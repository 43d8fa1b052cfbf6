"""The bulk restore of the workers' tables (shared/restore.py): where reading starts, how
records and tombstones land in a partition's RocksDB database with the offset they reach, and the
reading loop over an in-memory changelog standing in for the broker's."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, TopicPartition
from rocksdict import Options, Rdict

from shared.restore import (
    CURRENT_KEY,
    OFFSET_KEY,
    PartitionWriter,
    TableStore,
    encode_offset,
    persisted_offset,
    restore_from,
    start_offset,
)

TOPIC = "app-things-changelog"


def open_db(path: Path) -> Rdict:
    return Rdict(str(path), options=Options(raw_mode=True))


def contents(path: Path) -> dict[bytes, bytes]:
    """The rows and the offset; the time it was last current is checked on its own."""
    db = open_db(path)
    try:
        return {bytes(k): bytes(v) for k, v in db.items() if k != CURRENT_KEY}
    finally:
        db.close()


def current_at(path: Path) -> int | None:
    db = open_db(path)
    try:
        raw = db.get(CURRENT_KEY)
        return int(raw) if raw is not None else None
    finally:
        db.close()


# -- where reading starts --------------------------------------------------------------------


def test_offsets_are_stored_under_the_key_databases_already_use() -> None:
    assert encode_offset(41) == b"41"
    assert persisted_offset(b"41") == 41
    assert persisted_offset(None) is None
    assert OFFSET_KEY == b"__faust\x00offset__"


@pytest.mark.parametrize(
    ("persisted", "low", "high", "start"),
    [
        (None, 0, 10, 0),  # a new database reads the whole partition
        (None, 4, 10, 4),  # from the first offset the topic still has
        (3, 0, 10, 4),  # a database with offsets 0-3 reads on from 4
        (3, 6, 10, 6),  # ... or from the first kept offset, if 4 and 5 are gone
        (9, 0, 10, None),  # current: nothing to read
        (None, 0, 0, None),  # an empty partition
        (None, 7, 7, None),  # a partition whose records were all deleted
        (25, 0, 10, None),  # the database claims more than the topic has: left as it is
    ],
)
def test_reading_starts_after_what_the_database_holds(
    persisted: int | None, low: int, high: int, start: int | None
) -> None:
    assert start_offset(persisted, low, high) == start


# -- the writer --------------------------------------------------------------------------------


def test_a_batch_lands_with_the_offset_of_its_last_record(tmp_path: Path) -> None:
    path = tmp_path / "things-0.db"
    writer = PartitionWriter(path.name, open_db(path), current_at=1_800_000_000)
    writer.put(b"a", b"1", 0)
    writer.put(b"b", b"2", 1)
    writer.put(b"a", b"3", 2)
    writer.write()
    writer.put(b"b", None, 3)  # a tombstone deletes a row an earlier batch wrote
    writer.write()
    writer.close()
    assert contents(path) == {b"a": b"3", OFFSET_KEY: b"3"}
    assert writer.records == 4
    # Each batch also says when the database was last current with its changelog.
    assert current_at(path) == 1_800_000_000


def test_the_end_of_a_partition_is_recorded_even_past_its_last_record(tmp_path: Path) -> None:
    path = tmp_path / "things-0.db"
    writer = PartitionWriter(path.name, open_db(path))
    writer.put(b"a", b"1", 5)
    writer.write(through=8)  # offsets 6 and 7 were compacted away
    writer.write(through=9)  # nothing staged: only the offset moves
    writer.write()  # nothing staged and no end: nothing to write
    writer.close()
    assert contents(path) == {b"a": b"1", OFFSET_KEY: b"9"}


# -- the reading loop, over an in-memory changelog -------------------------------------------


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    code: int | None = None  # an error code instead of a record

    def error(self) -> Any:
        return None if self.code is None else KafkaError(self.code)


@dataclass
class Message:
    """Quacks like confluent-kafka's Message."""

    record: Record

    def error(self) -> Any:
        return self.record.error()

    def topic(self) -> str:
        return self.record.topic

    def partition(self) -> int:
        return self.record.partition

    def offset(self) -> int:
        return self.record.offset

    def key(self) -> bytes | None:
        return self.record.key

    def value(self) -> bytes | None:
        return self.record.value


@dataclass
class Metadata:
    partitions: dict[int, object]
    error: object = None


@dataclass
class TopicsMetadata:
    topics: dict[str, Metadata]


@dataclass
class FakeConsumer:
    """A broker's compacted changelog in memory: offsets per partition (gaps allowed), the
    watermarks, and a consumer that delivers from the assigned offsets, then one end-of-
    partition event per partition, a few records per call."""

    logs: dict[tuple[str, int], list[tuple[int, bytes, bytes | None]]]
    ends: dict[tuple[str, int], int]
    per_call: int = 3
    stall: bool = False  # deliver nothing at all, as when the broker is gone
    errors_only: bool = False  # deliver only transport errors, as librdkafka does then
    assigned: dict[tuple[str, int], int] = field(default_factory=dict)
    unassigned: list[tuple[str, int]] = field(default_factory=list)
    most_assigned: int = 0

    def list_topics(self, topic: str, timeout: float) -> TopicsMetadata:
        partitions = {p: object() for t, p in self.ends if t == topic}
        return TopicsMetadata({topic: Metadata(partitions)})

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float) -> tuple[int, int]:
        log = self.logs.get((tp.topic, tp.partition), [])
        end = self.ends[(tp.topic, tp.partition)]
        return (log[0][0] if log else end), end

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.assigned[(tp.topic, tp.partition)] = tp.offset
        self.most_assigned = max(self.most_assigned, len(self.assigned))

    def incremental_unassign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.assigned.pop((tp.topic, tp.partition))
            self.unassigned.append((tp.topic, tp.partition))

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        if self.stall:
            return []
        if self.errors_only:
            return [Message(Record(TOPIC, -1, -1, None, None, KafkaError._TRANSPORT))]
        out: list[Message] = []
        for where, position in list(self.assigned.items()):
            if position is None:
                continue
            pending = [r for r in self.logs.get(where, []) if r[0] >= position][: self.per_call]
            for offset, key, value in pending:
                out.append(Message(Record(where[0], where[1], offset, key, value)))
            if pending:
                self.assigned[where] = pending[-1][0] + 1
            else:
                end = self.ends[where]
                out.append(
                    Message(Record(where[0], where[1], end, None, None, KafkaError._PARTITION_EOF))
                )
                self.assigned[where] = None  # type: ignore[assignment]  # EOF reported once
        return out


def store_at(folder: Path, topic: str = TOPIC) -> TableStore:
    return TableStore(topic, lambda p: folder / f"things-{p}.db", lambda: Options(raw_mode=True))


def test_a_restored_partition_holds_the_changelogs_last_values(tmp_path: Path) -> None:
    log0 = [
        (0, b"a", b"1"),
        (1, b"b", b"1"),
        (2, b"a", b"2"),
        (4, b"c", b"1"),  # offset 3 was compacted away
        (5, b"b", None),  # b deleted
        (6, b"d", b"1"),
        (7, b"d", None),
        (8, b"d", b"2"),  # deleted, then written again
    ]
    consumer = FakeConsumer(
        logs={(TOPIC, 0): log0, (TOPIC, 1): [(0, b"x", b"9")]},
        ends={(TOPIC, 0): 10, (TOPIC, 1): 1, (TOPIC, 2): 0},  # offset 9 of p0 is gone too
    )
    done = restore_from(consumer, [store_at(tmp_path)])
    assert contents(tmp_path / "things-0.db") == {
        b"a": b"2",
        b"c": b"1",
        b"d": b"2",
        OFFSET_KEY: b"9",  # the partition's end minus one: nothing left to read
    }
    assert contents(tmp_path / "things-1.db") == {b"x": b"9", OFFSET_KEY: b"0"}
    assert not (tmp_path / "things-2.db").exists() or contents(tmp_path / "things-2.db") == {}
    assert done.complete
    assert (done.partitions, done.records) == (2, 9)
    assert sorted(consumer.unassigned) == [(TOPIC, 0), (TOPIC, 1)]


def test_a_second_restore_reads_only_what_came_since(tmp_path: Path) -> None:
    log = [(0, b"a", b"1"), (1, b"b", b"1")]
    restore_from(FakeConsumer({(TOPIC, 0): log}, {(TOPIC, 0): 2}), [store_at(tmp_path)])
    later = FakeConsumer({(TOPIC, 0): [*log, (2, b"a", None), (3, b"c", b"1")]}, {(TOPIC, 0): 4})
    done = restore_from(later, [store_at(tmp_path)])
    assert done.records == 2
    assert contents(tmp_path / "things-0.db") == {b"b": b"1", b"c": b"1", OFFSET_KEY: b"3"}
    current = FakeConsumer({(TOPIC, 0): later.logs[(TOPIC, 0)]}, {(TOPIC, 0): 4})
    assert restore_from(current, [store_at(tmp_path)]).partitions == 0


def test_a_database_someone_holds_open_is_left_alone(tmp_path: Path) -> None:
    held = open_db(tmp_path / "things-0.db")  # as another worker process would hold it
    try:
        consumer = FakeConsumer(
            {(TOPIC, 0): [(0, b"a", b"1")], (TOPIC, 1): [(0, b"b", b"1")]},
            {(TOPIC, 0): 1, (TOPIC, 1): 1},
        )
        done = restore_from(consumer, [store_at(tmp_path)])
        assert done.locked == ["things-0.db"]
        assert (done.partitions, done.records) == (1, 1)
        assert held.get(b"a") is None
    finally:
        held.close()
    assert contents(tmp_path / "things-1.db") == {b"b": b"1", OFFSET_KEY: b"0"}


def test_a_stalled_restore_stops_and_keeps_a_consistent_prefix(tmp_path: Path) -> None:
    log = [(n, f"k{n % 3}".encode(), f"v{n}".encode()) for n in range(7)]
    consumer = FakeConsumer({(TOPIC, 0): log}, {(TOPIC, 0): 7}, per_call=4)
    first = consumer.consume  # one call gets through, then the broker goes away

    def once(num_messages: int, timeout: float) -> list[Message]:
        delivered = first(num_messages, timeout)
        consumer.stall = True
        return delivered

    consumer.consume = once  # type: ignore[method-assign]
    done = restore_from(consumer, [store_at(tmp_path)], idle_timeout=0.0)
    assert not done.complete
    assert done.records == 4
    assert contents(tmp_path / "things-0.db") == {
        b"k0": b"v3",
        b"k1": b"v1",
        b"k2": b"v2",
        OFFSET_KEY: b"3",
    }
    # The next restore goes on from offset 4.
    done = restore_from(FakeConsumer({(TOPIC, 0): log}, {(TOPIC, 0): 7}), [store_at(tmp_path)])
    assert done.records == 3
    assert contents(tmp_path / "things-0.db")[OFFSET_KEY] == b"6"


def test_partitions_are_restored_a_window_at_a_time(tmp_path: Path) -> None:
    logs = {
        (TOPIC, p): [(n, f"k{n}".encode(), f"p{p}".encode()) for n in range(5)] for p in range(4)
    }
    consumer = FakeConsumer(logs, dict.fromkeys(logs, 5))
    done = restore_from(consumer, [store_at(tmp_path)], window=2)
    assert consumer.most_assigned == 2
    assert (done.partitions, done.records, done.complete) == (4, 20, True)
    for p in range(4):
        rows = contents(tmp_path / f"things-{p}.db")
        assert rows.pop(OFFSET_KEY) == b"4"
        assert rows == {f"k{n}".encode(): f"p{p}".encode() for n in range(5)}


def test_errors_alone_are_no_progress(tmp_path: Path) -> None:
    consumer = FakeConsumer({(TOPIC, 0): [(0, b"a", b"1")]}, {(TOPIC, 0): 1}, errors_only=True)
    done = restore_from(consumer, [store_at(tmp_path)], idle_timeout=0.0)
    assert not done.complete
    assert done.records == 0


def test_a_partition_missing_from_the_changelogs_metadata_leaves_the_restore_incomplete(
    tmp_path: Path,
) -> None:
    consumer = FakeConsumer({(TOPIC, 0): [(0, b"a", b"1")]}, {(TOPIC, 0): 1})
    done = restore_from(consumer, [store_at(tmp_path)], partitions=[0, 1])

    assert done.complete is False  # partition 1 is unknown: nothing says how far it goes
    assert contents(tmp_path / "things-0.db") == {b"a": b"1", OFFSET_KEY: b"0"}
