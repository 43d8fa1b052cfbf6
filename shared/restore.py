"""Bulk restore of a stream worker's RocksDB tables from their changelogs.

`shared.streams` calls it for the partitions a worker is assigned, before it handles any of
their records. It reads each partition of each table's changelog with one plain consumer, from
the offset its local database already holds to the end, and writes the records in RocksDB write
batches that carry that offset in the same database. docs/stream-processing.md ("Recovery") has
the design and the figures.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
from confluent_kafka import Consumer, KafkaError, TopicPartition
from rocksdict import AccessType, Options, Rdict, WriteBatch

from shared.kafka_connection import KafkaConnection, client_config

log = structlog.get_logger(__name__)

# Where each partition's database keeps the offset of the last changelog record applied there:
# ASCII decimal under this key (the key Faust used, so databases written before stay valid).
OFFSET_KEY = b"__faust\x00offset__"
# When the database was last known current with its changelog (epoch seconds, ASCII). Compaction
# drops a changelog's tombstones a day after they were written (`delete.retention.ms`), so a
# database older than that cannot catch up by reading on: it is rebuilt (`shared.streams`).
CURRENT_KEY = b"__waypost\x00current__"
# Keys that are bookkeeping, not rows.
META_KEYS = frozenset({OFFSET_KEY, CURRENT_KEY})
# Records taken from the consumer per call; each call ends with one write batch per partition.
CONSUME_BATCH = 20_000
# How long a call waits for a full batch: at a partition's end, a batch is never full.
CONSUME_WAIT_SECONDS = 0.05
# Partitions restored at once (see `restore_from`).
WINDOW = 2
# A restore that receives nothing for this long stops; the worker tries again later.
IDLE_TIMEOUT_SECONDS = 30.0
# Broker answers the restore waits for before it starts reading (metadata, watermarks).
REQUEST_TIMEOUT_SECONDS = 10.0


def persisted_offset(raw: bytes | None) -> int | None:
    """The offset a partition's database holds records up to."""
    return int(raw) if raw is not None else None


def encode_offset(offset: int) -> bytes:
    return str(offset).encode()


def start_offset(persisted: int | None, low: int, high: int) -> int | None:
    """The first changelog offset to read for a database that holds records up to `persisted`
    (None: nothing yet), given the partition's low and high watermarks. None when there is
    nothing to read, also when the database claims offsets the topic does not have (a recreated
    topic): the database is left as it is."""
    start = low if persisted is None else max(persisted + 1, low)
    return start if start < high else None


@dataclass(frozen=True)
class TableStore:
    """A table's changelog topic, where each of its partitions lives on disk, and how it is
    opened (RocksDB options and access type)."""

    changelog: str
    path_of: Callable[[int], Path]
    options: Callable[[], Options]
    access_type: Callable[[], AccessType] = AccessType.read_write

    def open(self, path: Path) -> Rdict:
        return Rdict(str(path), options=self.options(), access_type=self.access_type())


@dataclass
class Restored:
    """What one restore did."""

    partitions: int = 0  # partitions read (the others were current, empty or locked)
    locked: list[str] = field(default_factory=list)  # databases another owner held open
    records: int = 0
    bytes: int = 0
    seconds: float = 0.0
    complete: bool = True  # every partition read reached the end of its changelog
    by_topic: dict[str, int] = field(default_factory=dict)


class PartitionWriter:
    """Applies one changelog partition's records to its database, in order, in write batches.

    Every batch carries the offset of its last record under `OFFSET_KEY`, so whenever the
    restore stops (a crash, the broker gone) the database is a prefix of the changelog that says
    how far it goes, which the next restore resumes from.
    """

    def __init__(self, topic: str, db: Rdict, current_at: int | None = None) -> None:
        self.topic = topic
        self.db = db
        self.current_at = current_at  # when the restore started (epoch seconds), if told
        self.batch = WriteBatch(raw_mode=True)
        self.offset: int | None = None  # the last offset in `batch`
        self.records = 0

    def put(self, key: bytes, value: bytes | None, offset: int) -> None:
        """Stage one changelog record: a value is written, a tombstone (None) deletes."""
        if value is None:
            self.batch.delete(key)
        else:
            self.batch.put(key, value)
        self.offset = offset
        self.records += 1

    def write(self, through: int | None = None) -> None:
        """Write the staged records with the offset they reach, or `through` when later (the
        end of the partition: offsets in between hold no record)."""
        offset = self.offset if through is None else max(through, self.offset or -1)
        if offset is None:
            return
        self.batch.put(OFFSET_KEY, encode_offset(offset))
        if self.current_at is not None:
            self.batch.put(CURRENT_KEY, encode_offset(self.current_at))
        self.db.write(self.batch)
        self.batch = WriteBatch(raw_mode=True)
        self.offset = None

    def close(self) -> None:
        self.db.close()


class ChangelogConsumer(Protocol):
    """The part of confluent-kafka's `Consumer` the restore uses."""

    def list_topics(self, topic: str, timeout: float) -> Any: ...
    def get_watermark_offsets(self, partition: TopicPartition, timeout: float) -> Any: ...
    def incremental_assign(self, partitions: list[TopicPartition]) -> None: ...
    def incremental_unassign(self, partitions: list[TopicPartition]) -> None: ...
    def consume(self, num_messages: int, timeout: float) -> list[Any]: ...


def restore(
    kafka: KafkaConnection | str,
    stores: Sequence[TableStore],
    *,
    client_id: str,
    read_committed: bool = False,
    window: int = WINDOW,
    idle_timeout: float = IDLE_TIMEOUT_SECONDS,
    partitions: Collection[int] | None = None,
    current_at: int | None = None,
) -> Restored:
    """Bring the partition databases of `stores` (those numbered in `partitions`, else all) up
    to the end of their changelogs, reading with a consumer of its own that joins no group and
    commits nothing."""
    consumer = Consumer(
        {
            **client_config(kafka),
            "client.id": client_id,
            # Required by the client, though only assigned partitions are read, never committed.
            "group.id": f"{client_id}-unused",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed" if read_committed else "read_uncommitted",
            # Prefetch deep and fetch big, so the reader, not the broker, is the limit (the
            # queue's cap, librdkafka's default 64 MiB, holds per assigned partition).
            "queued.min.messages": 1_000_000,
            "max.partition.fetch.bytes": 16 * 2**20,
            "fetch.max.bytes": 64 * 2**20,
            # At a partition's end the broker answers at once, so its end is known at once
            # (it would hold the fetch for 500 ms, per partition in the window).
            "fetch.wait.max.ms": 10,
        }
    )
    try:
        return restore_from(
            consumer,
            stores,
            window=window,
            idle_timeout=idle_timeout,
            partitions=partitions,
            current_at=current_at,
        )
    finally:
        consumer.close()
        release_freed_memory()


def release_freed_memory() -> None:
    """Hand the heap pages freed since to the OS (glibc's `malloc_trim`; nothing elsewhere).
    A restore goes through gigabytes of short-lived buffers, and glibc kept about 190 MiB of
    them for a restore of 1.4 GB, which the worker would have carried for good."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def restore_from(
    consumer: ChangelogConsumer,
    stores: Sequence[TableStore],
    *,
    window: int = WINDOW,
    idle_timeout: float = IDLE_TIMEOUT_SECONDS,
    partitions: Collection[int] | None = None,
    current_at: int | None = None,
) -> Restored:
    """The restore over a given consumer, `window` partitions at a time: a partition's database
    is opened, and the partition assigned, when it enters the window, and closed at its end.

    librdkafka prefetches up to 64 MiB per assigned partition and RocksDB fills 64 MiB memtables
    per database before it flushes one, so the window bounds the restore's memory. Restoring 1M
    contacts and their timers (12 partitions, 1.4 GB): all partitions at once peaked at 860-930
    MiB of RSS, four at a time at 730-760 MiB, two at 510 MiB, one at 430-440 MiB; two were as
    fast as all at once (19-21 s against 20-23 s), one took 29-30 s. Should reading stall (the
    broker gone), the restore stops and says so (`complete` False).
    """
    started = time.perf_counter()
    result = Restored()
    pending: deque[tuple[TableStore, int]] = deque()
    for store in stores:
        topic = consumer.list_topics(store.changelog, timeout=REQUEST_TIMEOUT_SECONDS).topics.get(
            store.changelog
        )
        known = set(topic.partitions) if topic is not None and topic.error is None else set()
        wanted = known if partitions is None else set(partitions)
        if not wanted <= known:
            # The changelog's metadata lacks a partition asked for: nothing can say how far it
            # goes, so the restore is not complete (the caller tries again).
            log.warning("worker.restore_metadata_incomplete", changelog=store.changelog)
            result.complete = False
        pending.extend((store, partition) for partition in sorted(wanted & known))
    active: dict[tuple[str, int], PartitionWriter] = {}
    try:
        while pending or active:
            while pending and len(active) < max(1, window):
                store, partition = pending.popleft()
                _enter(consumer, store, partition, active, result, current_at)
            if active and not _read(consumer, active, result, idle_timeout):
                result.complete = False
                return result
    finally:
        for writer in active.values():
            writer.write()  # what an unfinished read staged
            _finish(writer, result)
        result.seconds = time.perf_counter() - started
    return result


def _enter(
    consumer: ChangelogConsumer,
    store: TableStore,
    partition: int,
    active: dict[tuple[str, int], PartitionWriter],
    result: Restored,
    current_at: int | None,
) -> None:
    """Open a partition's database and assign the partition from where the database ends,
    unless it is current. A database another owner holds open is left alone."""
    path = store.path_of(partition)
    try:
        db = store.open(path)
    except Exception as exc:  # rocksdict raises bare Exceptions
        if "lock" not in str(exc).lower():
            raise
        result.locked.append(path.name)  # the caller tries again once the holder let go
        return
    writer = PartitionWriter(store.changelog, db, current_at)
    try:
        tp = TopicPartition(store.changelog, partition)
        low, high = consumer.get_watermark_offsets(tp, timeout=REQUEST_TIMEOUT_SECONDS)
        start = start_offset(persisted_offset(db.get(OFFSET_KEY)), low, high)
    except BaseException:
        db.close()
        raise
    if start is None:
        db.close()
        return
    active[(store.changelog, partition)] = writer
    result.partitions += 1
    consumer.incremental_assign([TopicPartition(store.changelog, partition, start)])


def _finish(writer: PartitionWriter, result: Restored) -> None:
    writer.close()
    result.records += writer.records
    result.by_topic[writer.topic] = result.by_topic.get(writer.topic, 0) + writer.records


def _read(
    consumer: ChangelogConsumer,
    active: dict[tuple[str, int], PartitionWriter],
    result: Restored,
    idle_timeout: float,
) -> bool:
    """Consume, writing after each batch, until a partition reports its end (it leaves the
    window); False if no record and no end came for `idle_timeout` seconds (errors, such as
    a broker that is down, do not count)."""
    eof = KafkaError._PARTITION_EOF
    last_progress = time.monotonic()
    while True:
        messages = consumer.consume(CONSUME_BATCH, CONSUME_WAIT_SECONDS)
        touched: set[tuple[str, int]] = set()
        ended: list[tuple[tuple[str, int], int]] = []
        size = 0
        for message in messages:
            error = message.error()
            where = (message.topic(), message.partition())
            if error is not None:
                if error.code() == eof:
                    ended.append((where, message.offset()))
                else:
                    log.warning("worker.restore_error", error=str(error))
                continue
            writer = active.get(where)
            key = message.key()
            if writer is None or key is None:
                continue  # a partition already finished, or a record no table row could be
            value = message.value()
            writer.put(key, value, message.offset())
            size += len(key) + (len(value) if value is not None else 0)
            touched.add(where)
        result.bytes += size
        if touched or ended:
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress > idle_timeout:
            log.warning("worker.restore_stalled", partitions=sorted(active))
            return False
        for where in touched:
            active[where].write()
        for where, end in ended:
            writer = active.pop(where, None)
            if writer is not None:
                writer.write(through=end - 1)  # everything below the end offset is applied
                _finish(writer, result)
                consumer.incremental_unassign([TopicPartition(*where)])
        if ended:
            return True
