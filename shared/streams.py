"""A stream worker on confluent-kafka and RocksDB: batches, tables and partitions that move.

The segmenter and the orchestrator run on this. A worker joins its consumer group on its input
topics (all keyed by contact, all with the same partition count) with the range assignor, so
partition `p` of every input topic and of every table lands on the same worker. Per batch of
records it:

1. hands each processor its records (a processor folds them, produces its outputs and waits
   for their acknowledgement, then writes its tables);
2. produces every table write of the batch to the table's compacted changelog, coalesced per
   key, and waits once for the acknowledgements;
3. applies the writes to the partitions' RocksDB databases, each write batch carrying the
   offset of the changelog it reaches;
4. commits the input offsets past the batch.

A crash anywhere repeats the batch from its first record, never skips one (consumers
de-duplicate by the ids outputs carry). Offsets are committed only by this loop, only past
handled records, and synchronously when partitions are revoked. A partition assigned to the
worker is restored from its changelog to the end (in bulk, `shared.restore`) before any of its
records is handled; records fetched before a rebalance are dropped unless the worker still owns
their partition, and a record is never handled twice by one owner (`Positions`).

Tables address the partition of the record being handled: `focus(partition)` sets it for the
running task (a context variable, so periodic jobs on the same event loop are not affected).
Outside a record (a periodic job), a read looks in every owned partition. docs/stream-processing.md
has the design, its guarantees and the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import shutil
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from rocksdict import AccessType, BlockBasedOptions, Cache, Options, Rdict, WriteBatch

from shared import event_loop
from shared.clock import Clock
from shared.deadletter import through_outages
from shared.heap import collect_less_often, freeze_startup_heap
from shared.kafka import (
    AsyncProducer,
    ProducerWedged,
    Record,
    TransactionAborted,
    TransactionDoomed,
    close_within,
    fatal_error,
    no_transaction_open,
)
from shared.kafka_connection import client_config
from shared.membership import (
    ORPHAN_CHECK_SECONDS,
    ORPHAN_SECONDS,
    CheckBeside,
    Membership,
    Orphan,
    Progress,
    Watermarks,
)
from shared.restore import (
    CURRENT_KEY,
    META_KEYS,
    OFFSET_KEY,
    TableStore,
    encode_offset,
    restore,
)
from shared.settings import StreamSettings
from shared.topics import Topic

log = structlog.get_logger(__name__)

_PARTITION: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "waypost_table_partition", default=None
)
# A worker that stops heartbeating loses its partitions after this long (Kafka's default: 45 s).
SESSION_TIMEOUT_MS = 10_000
# How long a restore that could not finish (the broker gone) waits before it tries again.
RESTORE_RETRY_SECONDS = 2.0
# A partition's database last current longer ago than this is rebuilt from its changelog rather
# than read on: compaction drops tombstones a day (`delete.retention.ms`) after they were
# written, so reading on from an older offset could miss deletions.
STALE_AFTER_SECONDS = 12 * 3600.0
# A block cache shared by every table database of the process.
_BLOCK_CACHE_BYTES = 128 * 2**20
_block_cache: Cache | None = None


def worker_name(settings: StreamSettings) -> str:
    """The replica's name: `worker_id`, else host and process id."""
    return settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"


def transactional_config(app_id: str, settings: StreamSettings) -> dict[str, Any]:
    """Producer settings of a transactional worker. The id names the worker (`worker_id`, else
    host and process): a worker restarted under the same id aborts at once what its
    predecessor left open; otherwise that transaction is aborted after `transaction_timeout_ms`,
    and until then readers of its partitions wait."""
    worker = worker_name(settings)
    return {
        "transactional.id": f"{app_id}-{worker}",
        "transaction.timeout.ms": settings.transaction_timeout_ms,
        # librdkafka: a record may not wait longer than the transaction it belongs to.
        "message.timeout.ms": settings.transaction_timeout_ms,
    }


def focus(partition: int | None) -> None:
    """Make `partition` the one tables read and write in the running task (None: none)."""
    _PARTITION.set(partition)


def focused() -> int | None:
    return _PARTITION.get()


class NotOwned(KeyError):
    """A table was addressed in a partition this worker does not hold."""


class Fenced(BaseException):
    """This worker may no longer act for the batch's partitions: the group moved them on (the
    worker was stopped or cut off past its session: `moved_on`), or the broker aborted the
    transaction for another reason (a rebalance under way, say; the worker may well keep its
    partitions and read the batch again). Nothing of the batch after its last checkpoint is
    kept, and nothing more may be done for it. A BaseException, so that no record handler
    takes it for a record's own failure."""

    def __init__(self, message: str, *, moved_on: bool = False) -> None:
        super().__init__(message)
        self.moved_on = moved_on


def table_options() -> Options:
    """RocksDB options of every table database: raw bytes, bloom filters for the misses most
    reads are, 64 MiB write buffers, one block cache for the process."""
    global _block_cache
    if _block_cache is None:
        _block_cache = Cache(_BLOCK_CACHE_BYTES)
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_write_buffer_size(64 * 2**20)
    options.set_max_write_buffer_number(3)
    options.set_target_file_size_base(64 * 2**20)
    blocks = BlockBasedOptions()
    blocks.set_bloom_filter(10, False)
    blocks.set_block_cache(_block_cache)
    options.set_block_based_table_factory(blocks)
    return options


class Table(MutableMapping[bytes, bytes]):
    """A table of bytes split by partition: one RocksDB database per owned partition, backed by
    a compacted changelog topic. Writes are staged per partition until the worker has produced
    them to the changelog; reads see the staged writes first."""

    def __init__(self, name: str, changelog: str, folder: Path, *, primary: bool = False) -> None:
        self.name = name
        self.changelog = changelog
        self.folder = folder
        # The table whose rows say a record was handled (the shell's de-duplication state): its
        # changelog is written after every other table's, never before.
        self.primary = primary
        self._dbs: dict[int, Rdict] = {}
        self._staged: dict[int, dict[bytes, bytes | None]] = {}

    # --- where partitions live --------------------------------------------------------------

    def path_of(self, partition: int) -> Path:
        return self.folder / f"{self.name}-{partition}.db"

    def store(self) -> TableStore:
        return TableStore(changelog=self.changelog, path_of=self.path_of, options=table_options)

    def open(self, partition: int) -> None:
        if partition not in self._dbs:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._dbs[partition] = Rdict(
                str(self.path_of(partition)),
                options=table_options(),
                access_type=AccessType.read_write(),
            )

    def close(self, partition: int) -> None:
        self._staged.pop(partition, None)
        db = self._dbs.pop(partition, None)
        if db is not None:
            db.close()

    def drop_if_stale(self, partition: int, now: int, max_age: float) -> bool:
        """Delete the partition's closed database if it was last current with its changelog
        longer than `max_age` seconds ago (or never said when): it is restored from the start."""
        path = self.path_of(partition)
        if partition in self._dbs or not path.exists():
            return False
        try:
            db = Rdict(str(path), options=table_options(), access_type=AccessType.read_only())
        except Exception:  # noqa: BLE001 - rocksdict raises bare Exceptions; the restore decides
            return False
        try:
            raw = db.get(CURRENT_KEY)
        finally:
            db.close()
        if raw is not None and now - int(raw) <= max_age:
            return False
        shutil.rmtree(path)
        return True

    @property
    def partitions(self) -> frozenset[int]:
        return frozenset(self._dbs)

    # --- the mapping ------------------------------------------------------------------------

    def _db(self, partition: int) -> Rdict:
        db = self._dbs.get(partition)
        if db is None:
            raise NotOwned(f"table {self.name}: partition {partition} is not held here")
        return db

    def _read(self, partition: int, key: bytes) -> bytes | None:
        staged = self._staged.get(partition)
        if staged is not None and key in staged:
            return staged[key]
        value: bytes | None = self._db(partition).get(key)
        return value

    def get(self, key: bytes, default: Any = None) -> Any:
        partition = _PARTITION.get()
        if partition is not None:
            value = self._read(partition, key)
            return default if value is None else value
        for held in list(self._dbs):
            value = self._read(held, key)
            if value is not None:
                return value
        return default

    def __getitem__(self, key: bytes) -> bytes:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        result: bytes = value
        return result

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self.get(key) is not None

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self._stage(key, value)

    def __delitem__(self, key: bytes) -> None:
        if key not in self:
            raise KeyError(key)
        self._stage(key, None)

    def _stage(self, key: bytes, value: bytes | None) -> None:
        partition = _PARTITION.get()
        if partition is None:
            raise NotOwned(f"table {self.name}: a write outside a record's partition")
        self._db(partition)
        self._staged.setdefault(partition, {})[key] = value

    def rows(self, partition: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Every row of the owned partitions (or of `partition` alone), undecoded, staged writes
        included (a scan during a batch's changelog wait sees what the batch wrote)."""
        for held in sorted(self._dbs) if partition is None else [partition]:
            staged = self._staged.get(held, {})
            for key, value in self._db(held).items():
                if key not in META_KEYS and key not in staged:
                    yield key, value  # type: ignore[misc]  # raw mode: bytes, whatever the stubs say
            for key, staged_value in list(staged.items()):
                if staged_value is not None:
                    yield key, staged_value

    def rows_from(
        self, partition: int, start: bytes | None, limit: int
    ) -> list[tuple[bytes, bytes]]:
        """Up to `limit` stored rows of `partition`, in key order from `start` on, read at once:
        a scan that yields between its reads holds no iterator over a database that may close
        meanwhile (its partition moving away). Staged writes are left out; [] once the
        partition is not held here."""
        db = self._dbs.get(partition)
        if db is None:
            return []
        found: list[tuple[bytes, bytes]] = []
        for key, value in db.items(from_key=start) if start is not None else db.items():
            if key in META_KEYS:
                continue
            found.append((key, value))  # type: ignore[arg-type]  # raw mode: bytes
            if len(found) >= limit:
                break
        return found

    def __iter__(self) -> Iterator[bytes]:
        return (key for key, _value in self.rows())

    def __len__(self) -> int:
        return sum(1 for _row in self.rows())

    # --- what the worker stores -------------------------------------------------------------

    def staged(self) -> Iterator[tuple[int, bytes, bytes | None]]:
        for partition, writes in self._staged.items():
            for key, value in writes.items():
                yield partition, key, value

    def apply(self, partition: int, through: int | None, current_at: int | None = None) -> None:
        """Write the partition's staged writes, with `through`, the changelog offset they reach,
        and `current_at`, when that was (epoch seconds)."""
        writes = self._staged.pop(partition, None)
        if not writes:
            return
        batch = WriteBatch(raw_mode=True)
        for key, value in writes.items():
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        if through is not None:
            batch.put(OFFSET_KEY, encode_offset(through))
            if current_at is not None:
                batch.put(CURRENT_KEY, encode_offset(current_at))
        self._db(partition).write(batch)

    def discard_staged(self) -> None:
        self._staged.clear()


Process = Callable[[list[Record]], Awaitable[None]]
# When a record may be handled (None: now). A record of a topic consumed with one is held, with
# every later record of its partition, until that time (`StreamWorker.consume`).
Due = Callable[[Record], datetime | None]
Hook = Callable[[frozenset[int]], None]
Job = Callable[[], Awaitable[None]]


@dataclass
class Positions:
    """The next offset this owner handles per topic partition. Records below it were handled
    (they come again when fetched before a rebalance and once more after it) and are dropped."""

    next: dict[tuple[str, int], int] = field(default_factory=dict)

    def start(self, topic: str, partition: int, committed: int) -> None:
        if committed >= 0:
            self.next[(topic, partition)] = committed
        else:
            self.next.pop((topic, partition), None)

    def forget(self, topic: str, partition: int) -> None:
        self.next.pop((topic, partition), None)

    def fresh(self, record: Record) -> bool:
        return record.offset >= self.next.get((record.topic, record.partition), -1)

    def handled(self, records: list[Record]) -> dict[tuple[str, int], int]:
        """Advance past `records`; returns the offsets to commit (next offset per partition)."""
        moved: dict[tuple[str, int], int] = {}
        for record in records:
            where = (record.topic, record.partition)
            moved[where] = max(moved.get(where, 0), record.offset + 1)
        self.next.update(moved)
        return moved


class StreamWorker:
    """One worker of a stream service: its consumer group, tables, processors, periodic jobs.

    Declare tables (`table`), processors (`consume`), hooks run after every change of the
    assignment once the tables are restored (`on_assigned`) or only once the group has handed
    out an assignment (`on_assignment`), and periodic jobs (`every`, run only while the worker
    holds a settled assignment); then `run` until `stop` is set.
    """

    def __init__(
        self,
        app_id: str,
        settings: StreamSettings,
        producer: AsyncProducer,
        clock: Clock,
        *,
        service: str,
        transactional: bool = False,
    ) -> None:
        self.app_id = app_id
        # Each batch is a Kafka transaction: outputs, changelogs and input offsets commit
        # together, only while the group's generation is this worker's (`checkpoint`). The
        # producer must carry a `transactional.id` (`transactional_config`).
        self.transactional = transactional
        self.settings = settings
        # End offsets for the progress check, over a connection of their own (one per worker).
        self._watermarks = Watermarks(client_config(settings.kafka()))
        self.producer = producer
        self.clock = clock
        # `<data dir>/<service>/v1/tables/<table>-<partition>.db`
        self.folder = settings.data_dir / service / "v1" / "tables"
        self.batch_max_records = settings.batch_max_records
        # How long a proof of ownership holds (`prove_owner`): a third of the session timeout.
        self.owner_lease_seconds = SESSION_TIMEOUT_MS / 1000 / 3
        self.batch_max_seconds = settings.batch_max_ms / 1000
        # A worker holding no partition while its inputs wait for a consumer joins again
        # (`shared.membership.Orphan`).
        self.orphan_seconds = ORPHAN_SECONDS
        self.orphan_check_seconds = ORPHAN_CHECK_SECONDS
        self.tables: dict[str, Table] = {}
        self._processors: dict[str, Process] = {}
        self._due: dict[str, Due] = {}
        # Partitions of delayed topics held until a time: (offset to read on from, until).
        self._held: dict[tuple[str, int], tuple[int, datetime]] = {}
        self._hooks: list[Hook] = []
        self._assignment_hooks: list[Hook] = []
        self._jobs: list[tuple[float, Job]] = []
        self._assigned: set[tuple[str, int]] = set()
        self._owned: frozenset[int] = frozenset()
        # When this worker took each partition it holds, without a revocation or a loss since
        # (`held_since`).
        self._held_since: dict[int, datetime] = {}
        self._changes: list[tuple[str, list[tuple[str, int]]]] = []
        self._positions = Positions()
        self._ready = False
        self._consumer: Consumer | None = None
        # The batch being handled, and where each of its partitions started (transactional).
        self._batch_start: dict[tuple[str, int], int] = {}
        # Set when nothing local can be trusted (a wedged producer): join the group again.
        self._reread = False
        self._group: Any = None
        # When ownership of the batch's partitions was last proven (monotonic seconds, taken
        # before the proof was asked for), and the lock that makes one proof serve many. A
        # commit proves it too, and stands for the next batch while no assignment changed
        # since (`_rebalances`, counted by the rebalance callbacks, as of `_proven_through`).
        self._proven_at = float("-inf")
        self._proof: asyncio.Future[None] | None = None
        self._rebalances = 0
        self._proven_through = -1
        self._proving = asyncio.Lock()

    # --- declaring --------------------------------------------------------------------------

    def table(self, name: str, *, primary: bool = False) -> Table:
        """A table; `primary` for the one whose rows record what was handled (written to its
        changelog after the others, so a crash between them repeats the record's work)."""
        table = Table(name, f"{self.app_id}-{name}-changelog", self.folder, primary=primary)
        self.tables[name] = table
        return table

    def changelogs(self) -> list[Topic]:
        return [
            Topic(table.changelog, f"changelog of the {name} table", compacted=True)
            for name, table in self.tables.items()
        ]

    def consume(self, topics: list[str], process: Process, *, due: Due | None = None) -> None:
        """`process` gets each batch's records of `topics`, in offset order per partition.

        With `due` the topics are delayed queues (records of a partition due in offset order,
        such as retries of one delay class): a record not yet due is not handed over; its
        partition is paused and read again from that record once it is due. Nothing waits in
        a batch, and the offsets committed never pass a held record."""
        for topic in topics:
            self._processors[topic] = process
            if due is not None:
                self._due[topic] = due

    def on_assigned(self, hook: Hook) -> None:
        """`hook(owned)` after every change of the assignment, a revocation included (the
        partitions held may then be none until the group hands them out again)."""
        self._hooks.append(hook)

    def on_assignment(self, hook: Hook) -> None:
        """`hook(owned)` only once the group has handed out an assignment: the partitions this
        worker holds for now, not the gap between a revocation (or a loss) and what follows it
        (a rebalance revokes every partition, and often hands the same ones back). It runs
        before the new partitions' tables are restored, which can take long."""
        self._assignment_hooks.append(hook)

    def every(self, seconds: float, job: Job) -> None:
        if self.transactional:
            # A job would produce outside the batches' transactions.
            raise ValueError("periodic jobs are not supported on a transactional worker")
        self._jobs.append((seconds, job))

    # --- state ------------------------------------------------------------------------------

    def owned(self) -> frozenset[int]:
        """The partition numbers this worker holds (the same for every input topic)."""
        return self._owned

    @property
    def ready(self) -> bool:
        return self._ready

    # --- running ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        if self.transactional:
            await self._init_transactions()
        consumer = self._subscribe()
        jobs = [asyncio.create_task(self._every(seconds, job)) for seconds, job in self._jobs]
        try:
            while not stop.is_set():
                messages = await asyncio.to_thread(
                    consumer.consume, self.batch_max_records, self.batch_max_seconds
                )
                if self._changes:
                    await self._settle(consumer)
                self._release_holds(consumer)
                records = self._records(consumer, messages)
                if records:
                    await self._handle(consumer, records)
                if (
                    self._reread
                    or self._membership.lost()
                    or await self._fetch_stalled(consumer)
                    or await self._orphaned(consumer)
                ):
                    consumer = await self._rejoin(consumer)
        finally:
            for job in jobs:
                job.cancel()
            self._ready = False
            await self._progress_check.finish()
            await close_within(consumer)
            for table in self.tables.values():
                for partition in table.partitions:
                    table.close(partition)

    def _subscribe(self) -> Consumer:
        """A new member of the worker's group, subscribed to its input topics."""
        self._membership = Membership(self.app_id)
        self._progress = Progress(self.app_id)
        self._progress_check = CheckBeside()
        self._orphan = Orphan(
            self.app_id, orphan_seconds=self.orphan_seconds, check_seconds=self.orphan_check_seconds
        )
        consumer = Consumer(
            {
                **client_config(self.settings.kafka()),
                "group.id": self.app_id,
                "client.id": self.app_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                # Partition p of every input topic on one worker, with table partition p.
                "partition.assignment.strategy": "range",
                # A killed worker's partitions move after 10 s rather than Kafka's 45 s.
                "session.timeout.ms": SESSION_TIMEOUT_MS,
                "heartbeat.interval.ms": 2_000,
                # A restore of a large table happens between two polls.
                "max.poll.interval.ms": 900_000,
                **self._membership.config(),
            }
        )
        self._consumer = consumer
        consumer.subscribe(
            sorted(self._processors),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        return consumer

    async def _fetch_stalled(self, consumer: Consumer) -> bool:
        """Whether an owned partition has records this consumer stopped fetching
        (`shared.membership.Progress`); checked every few seconds."""
        verdict = self._progress_check.verdict()
        if verdict is not None:
            return verdict
        if self._progress_check.running or not self._progress.due():
            return False
        watched = sorted(
            where
            for where in self._assigned
            if where[1] in self._owned and where not in self._held  # held: paused on purpose
        )
        known = dict(self._positions.next)
        # Beside the loop: the batches go on while the broker answers.
        self._progress_check.start(
            partial(self._progress.stalled, consumer, watched, known, self._watermarks)
        )
        return False

    async def _orphaned(self, consumer: Consumer) -> bool:
        """Whether this worker, holding no partition, is outside a group whose inputs wait
        for a consumer (`shared.membership.Orphan`)."""
        if self._owned:
            self._orphan.holding()
            return False
        if not self._orphan.due():
            return False
        topics = sorted(topic for topic in self._processors if topic not in self._due)
        return await asyncio.to_thread(self._orphan.orphaned, consumer, topics)

    async def _rejoin(self, consumer: Consumer) -> Consumer:
        """Leave the group with the consumer stuck outside it, and join with a new one
        (`shared.membership`): what the old one held is revoked first, like any rebalance."""
        self._reread = False
        # The partitions move at once: no proof of ownership stands past this (`_on_revoke`).
        self._proven_at = float("-inf")
        await self._progress_check.finish()
        await close_within(consumer)
        # Whatever its closing did not revoke (it may have given up) is revoked here.
        self._changes.append(("revoke", sorted(self._assigned)))
        fresh = self._subscribe()
        if self._changes:
            await self._settle(fresh)
        return fresh

    def _records(self, consumer: Consumer, messages: list[Message]) -> list[Record]:
        records = []
        now = self.clock.now() if self._due else None
        # Offsets taken in this call: a record fetched both before and after a rebalance
        # inside one poll is taken once.
        taken: dict[tuple[str, int], int] = {}
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("stream.consume_error", error=str(error))
                continue
            topic, partition = str(message.topic()), int(message.partition() or 0)
            if (topic, partition) not in self._assigned or partition not in self._owned:
                continue  # fetched before its partition was revoked, or not co-partitioned
            key = message.key()
            record = Record(
                topic=topic,
                partition=partition,
                offset=int(message.offset() or 0),
                key=key.decode(errors="replace") if key is not None else None,
                value=message.value() or b"",
            )
            where = (topic, partition)
            if where in self._held:
                continue  # read again from the held record once it is due
            if self._positions.fresh(record) and record.offset >= taken.get(where, -1):
                due = self._due.get(topic)
                until = due(record) if due is not None else None
                if until is not None and now is not None and until > now:
                    self._hold(consumer, where, record.offset, until)
                    continue
                taken[where] = record.offset + 1
                records.append(record)
        return records

    def _hold(
        self, consumer: Consumer, where: tuple[str, int], offset: int, until: datetime
    ) -> None:
        """Pause a delayed topic's partition at `offset` until `until`."""
        tp = TopicPartition(where[0], where[1], offset)
        try:
            consumer.pause([TopicPartition(*where)])
            consumer.seek(tp)  # what was fetched past it is dropped, and fetched again later
        except KafkaException as exc:  # no longer assigned: the next owner reads it
            log.info("stream.hold_skipped", topic=where[0], partition=where[1], error=str(exc))
            return
        self._held[where] = (offset, until)

    def _release_holds(self, consumer: Consumer) -> None:
        """Resume the held partitions whose record is due."""
        if not self._held:
            return
        now = self.clock.now()
        for where, (offset, until) in list(self._held.items()):
            if until > now:
                continue
            del self._held[where]
            try:
                consumer.seek(TopicPartition(where[0], where[1], offset))
                consumer.resume([TopicPartition(*where)])
            except KafkaException as exc:
                log.info(
                    "stream.release_skipped", topic=where[0], partition=where[1], error=str(exc)
                )

    async def _handle(self, consumer: Consumer, records: list[Record]) -> None:
        if self.transactional:
            await self._handle_transaction(consumer, records)
            return
        try:
            await self._process(records)
            await through_outages(self._store, what=self.app_id)
        except BaseException:
            for table in self.tables.values():
                table.discard_staged()
            raise
        offsets = self._positions.handled(records)
        partitions = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            consumer.commit(offsets=partitions, asynchronous=True)
        except KafkaException as exc:  # no longer assigned: the next owner repeats the batch
            log.warning("stream.commit_failed", error=str(exc))

    async def _process(self, records: list[Record]) -> None:
        by_processor: dict[int, tuple[Process, list[Record]]] = {}
        for record in records:
            process = self._processors[record.topic]
            by_processor.setdefault(id(process), (process, []))[1].append(record)
        for process, mine in by_processor.values():
            await process(mine)
            focus(None)

    async def _handle_transaction(self, consumer: Consumer, records: list[Record]) -> None:
        """The batch as one transaction (more than one when a processor checkpoints): outputs,
        changelogs and the offsets past the batch commit together, and only then are the
        writes applied to the databases. A fenced batch keeps nothing after its last
        checkpoint, and its partitions are read again from where it started."""
        start: dict[tuple[str, int], int] = {}
        for record in records:
            start.setdefault((record.topic, record.partition), record.offset)
        self._batch_start = start
        if self._rebalances != self._proven_through:
            self._proven_at = float("-inf")  # the group may have moved partitions since
        # The generation the batch was fetched in: every commit of the batch names it, so a
        # worker that was cut off meanwhile cannot commit it even after it rejoined the group.
        self._group = consumer.consumer_group_metadata()
        committed = False
        try:
            # Inside the `try`: a producer fenced since the last batch raises its fatal error
            # here, and is replaced like one fenced during a batch.
            self.producer.begin_transaction()
            await self._process(records)
            # Inside a transaction an undelivered record cannot be sent again: the transaction
            # is doomed, so the batch is aborted and read again, not retried in place.
            reached = await self._produce_changelogs()
            ends = {(r.topic, r.partition): r.offset + 1 for r in records}
            asked_at, rebalances = time.monotonic(), self._rebalances
            await self._commit(consumer, ends)
            self._proven(asked_at, rebalances)
            committed = True
        except Fenced as exc:
            # Fenced by the group (its proof or commit aborted the transaction already) or by
            # a check of the worker's own (a lapsed lease): either way nothing of the batch
            # may commit, and the next batch cannot begin while its transaction is open.
            await self._proof_settled()
            if await self._abort_doomed(start, pause=False):
                self._abandon(consumer, start, str(exc))
            return
        except ProducerWedged as exc:
            # Not waited for: a proof may be blocked in the same wedged producer. Once its
            # producer is replaced, its next attempt ends it (`AsyncProducer._bound`).
            self._proof_dropped()
            await self._after_wedged(str(exc))
            return
        except TransactionDoomed as exc:
            await self._proof_settled()
            if await self._abort_doomed(start):
                self._abandon(consumer, start, f"transaction doomed: {exc}")
            return
        except BaseException as exc:
            for table in self.tables.values():
                table.discard_staged()
            if fatal_error(exc):
                self._proof_dropped()  # it meets the same fatal error, or the replacement
                await self._after_producer_fenced(start, str(exc))
                return
            await self._proof_settled()
            with contextlib.suppress(KafkaException, TransactionAborted):
                await self.producer.abort_transaction()
            raise
        finally:
            self._batch_start = {}
            if not committed:  # a failed batch proves nothing for the next one
                self._proven_at = float("-inf")
        self._apply(reached)
        self._positions.handled(records)

    async def checkpoint(self) -> None:
        """Commit the batch so far (a transactional worker, inside a processor): its outputs and
        table writes become durable and visible, and the commit proves the group still counts
        this worker as the owner of the batch's partitions. Raises `Fenced` when it does not:
        the caller must then do nothing more for the batch (call no provider, say)."""
        if not self.transactional or self._consumer is None:
            raise RuntimeError("checkpoint needs a transactional worker inside a batch")
        reached = await self._produce_changelogs()  # TransactionDoomed: the batch is aborted
        asked_at, rebalances = time.monotonic(), self._rebalances
        await self._commit(self._consumer, self._batch_start)
        self._proven(asked_at, rebalances)
        self._apply(reached)
        self.producer.begin_transaction()

    async def prove_owner(self, fresh_for: float = 0.0) -> None:
        """Make sure, just before an irreversible effect (a provider call), that the group still
        counts this worker as the owner of the batch's partitions: within `owner_lease_seconds`
        of the last proof that is taken as given; after it, the group coordinator is asked
        again (the batch's start offsets added to the open transaction). Raises `Fenced` when
        it no longer is, as `checkpoint` does. A proof is an earlier call of this, a
        checkpoint, or the commit of an earlier batch when no assignment changed since: the
        group hands partitions on only through this worker's rebalance callbacks (while it
        keeps its session), and the lease is what bounds the session's end.

        A worker stopped (SIGSTOP, a long pause) after a checkpoint and resumed after the
        group moved its partitions on would otherwise call providers for records another
        worker now handles. The lease is well inside the session timeout: a worker that was
        running heartbeated within the last few seconds, so its partitions cannot move
        before the lease ends.

        `fresh_for`: ask again unless the lease has that many seconds left (a step shortly
        before the effect, so that the effect itself finds the lease standing and never waits
        on a proof)."""
        if not self.transactional or self._consumer is None:
            raise RuntimeError("prove_owner needs a transactional worker inside a batch")
        # A proof with `fresh_for` seconds of its lease left stands; checked before waiting
        # on a proof under way too, so a call within the lease never waits on one.
        lease = self.owner_lease_seconds - fresh_for
        if time.monotonic() - self._proven_at < lease:
            return
        async with self._proving:
            if time.monotonic() - self._proven_at < lease:
                return
            asked_at, rebalances = time.monotonic(), self._rebalances
            offsets = [TopicPartition(t, p, o) for (t, p), o in self._batch_start.items()]
            # Shielded: a waiter cancelled with its batch leaves the proof to end on its own
            # (aborting the transaction when refused), and the batch's end waits for it
            # (`_proof_settled`) before it commits or aborts.
            proof = self._proof = asyncio.ensure_future(
                self.producer.prove_offsets(offsets, self._group)
            )
            try:
                await asyncio.shield(proof)
            except TransactionAborted as exc:
                raise Fenced(str(exc), moved_on=exc.moved_on) from exc
            self._proven(asked_at, rebalances)

    async def _proof_settled(self) -> None:
        """The batch's last proof of ownership ended, whoever still awaited it."""
        proof, self._proof = self._proof, None
        if proof is None:
            return
        if not proof.done():
            await asyncio.wait([proof])
        if not proof.cancelled():
            proof.exception()  # its failure was the batch's, or nobody's once it was cut off

    def _proof_dropped(self) -> None:
        """The batch ended without waiting for its last proof of ownership: whatever the proof
        still ends with belongs to no batch, and is only logged."""
        proof, self._proof = self._proof, None
        if proof is not None:
            proof.add_done_callback(_dropped_proof_ended)

    def _proven(self, asked_at: float, rebalances: int) -> None:
        """The group took this worker for its partitions' owner when it was asked at
        `asked_at`, after `rebalances` assignment changes."""
        self._proven_at = asked_at
        self._proven_through = rebalances

    def held_since(self, partition: int) -> datetime | None:
        """When this worker took `partition`, held ever since with no revocation or loss in
        between (None: not held). Whatever another worker did with it, it did before then: a
        worker stopped by the group writes nothing once the partition has moved on (its lease,
        `owner_within_lease`), and a killed one nothing at all."""
        return self._held_since.get(partition)

    def owner_within_lease(self) -> bool:
        """Whether the last proof of ownership (`prove_owner`, a checkpoint) is within its
        lease now: checked again at the last moment before an irreversible effect, after any
        wait that began under the lease (a worker stopped meanwhile finds it lapsed)."""
        return time.monotonic() - self._proven_at < self.owner_lease_seconds

    async def _init_transactions(self) -> None:
        """Register the producer's transactional id (a new producer when the call wedges)."""
        while True:
            try:
                await self.producer.init_transactions()
                return
            except ProducerWedged as exc:
                log.error("stream.producer_wedged", error=str(exc))
                self.producer.renew("wedged")

    async def _after_wedged(self, why: str) -> None:
        """A transactional call never returned: a new producer fences the old one and settles
        the transaction it left open, which may have committed or not. So nothing local is
        trusted: the staged writes are dropped, and the worker joins its group again, which
        restores its tables to their changelogs' ends and reads on from the committed offsets,
        as after a restart."""
        for table in self.tables.values():
            table.discard_staged()
        log.error("stream.producer_wedged", error=why)
        await self._start_over("wedged")

    async def _start_over(self, reason: str) -> None:
        """A new producer of the same transactional id (it fences the old one and settles the
        transaction that one left open); the group joined again, the tables restored."""
        self.producer.renew(reason)
        await self._init_transactions()
        self._reread = True

    async def _after_producer_fenced(self, start: dict[tuple[str, int], int], why: str) -> None:
        """The producer failed for good (a worker stopped past its transaction's timeout comes
        back to find its epoch bumped by the coordinator: librdkafka's fatal error): this
        worker was fenced. Nothing of the batch is kept; a new producer takes the same
        transactional id, and the worker joins its group again and restores its tables, as
        after a restart, rather than ending the process."""
        log.warning("stream.fenced", partitions=sorted({p for _t, p in start}), reason=why)
        await self._start_over("fenced")

    async def _abort_doomed(self, start: dict[tuple[str, int], int], *, pause: bool = True) -> bool:
        """Abort a doomed transaction, asking again while the broker is away (the next batch
        cannot begin before it), then (`pause`) give the broker a moment before the batch is
        read again. False when the producer could not abort it and the worker started over
        instead."""
        while True:
            try:
                await self.producer.abort_transaction()
                break
            except ProducerWedged as exc:
                await self._after_wedged(str(exc))
                return False
            except KafkaException as exc:
                if fatal_error(exc):  # fenced: there is nothing left to abort with it
                    await self._after_producer_fenced(start, str(exc))
                    return False
                if no_transaction_open(exc):
                    # Already aborted by another step of the batch (a proof of ownership the
                    # group refused, say): asking again would be refused the same way forever.
                    log.info("stream.abort_not_needed", error=str(exc))
                    break
                log.warning("stream.abort_retry", error=str(exc))
                await asyncio.sleep(RESTORE_RETRY_SECONDS)
        if pause:
            await asyncio.sleep(RESTORE_RETRY_SECONDS)
        return True

    async def _commit(self, consumer: Consumer, offsets: dict[tuple[str, int], int]) -> None:
        """Commit the open transaction with `offsets` as the group's committed offsets."""
        partitions = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            await self.producer.commit_transaction(partitions, self._group)
        except TransactionAborted as exc:
            raise Fenced(str(exc), moved_on=exc.moved_on) from exc

    def _abandon(self, consumer: Consumer, start: dict[tuple[str, int], int], why: str) -> None:
        """After a fenced batch: drop its staged writes and read its partitions again from the
        batch's first records (a zombie's next commit fails again, until its group has moved
        its partitions and the assignment is settled anew)."""
        for table in self.tables.values():
            table.discard_staged()
        log.warning("stream.fenced", partitions=sorted({p for _t, p in start}), reason=why)
        for (topic, partition), offset in start.items():
            try:
                consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:  # no longer assigned: the next owner reads it
                log.info("stream.seek_skipped", topic=topic, partition=partition, error=str(exc))

    async def _store(self) -> None:
        """Every staged write to its changelog, then into the databases."""
        self._apply(await self._produce_changelogs())

    async def _produce_changelogs(self) -> dict[tuple[str, int], int]:
        """Every staged write to its changelog; the highest offset reached per changelog
        partition. The primary tables' changelogs are written only once every other table's
        are acknowledged: a crash between two changelogs then leaves the record unhandled by
        the primary row, so it is handled again, rather than a primary row saying "handled"
        beside rows that never landed."""
        reached: dict[tuple[str, int], int] = {}
        for primary in (False, True):
            staged = [
                (table.changelog, partition, key, value)
                for table in self.tables.values()
                if table.primary is primary
                for partition, key, value in table.staged()
            ]
            if staged:
                reached.update(await self.producer.send_to_partitions(staged))
        return reached

    def _apply(self, reached: dict[tuple[str, int], int]) -> None:
        """The staged writes into the partitions' databases, with the changelog offsets they
        reach."""
        current_at = self._epoch_seconds()
        for table in self.tables.values():
            for partition in {p for p, _k, _v in table.staged()}:
                table.apply(partition, reached.get((table.changelog, partition)), current_at)

    # --- partitions that move ---------------------------------------------------------------

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._rebalances += 1
        self._changes.append(("assign", [(str(tp.topic), int(tp.partition)) for tp in partitions]))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Called inside `consume`, between batches: what was handled is committed before the
        partitions go, so the next owner starts right after it. No proof of ownership stands
        past it: a call still under way (kept past a failed batch) that has not yet written its
        request writes nothing now (`owner_within_lease`)."""
        self._ready = False
        self._rebalances += 1
        self._proven_at = float("-inf")
        gone = [(str(tp.topic), int(tp.partition)) for tp in partitions]
        if self.transactional:  # its batches committed their offsets themselves
            self._changes.append(("revoke", gone))
            return
        handled = [
            TopicPartition(topic, partition, self._positions.next[(topic, partition)])
            for topic, partition in gone
            if (topic, partition) in self._positions.next
        ]
        if handled:
            try:
                consumer.commit(offsets=handled, asynchronous=False)
            except KafkaException as exc:
                log.warning("stream.commit_on_revoke_failed", error=str(exc))
        self._changes.append(("revoke", gone))

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions this member lost (its session timed out, a broker outage included): like a
        revocation, settled by the assignment that follows. A lone worker gets them all back,
        and its calls kept past the failed batch conclude that batch when it is read again
        (those that had not written their request yet write nothing now, as after a
        revocation)."""
        self._ready = False
        self._rebalances += 1
        self._proven_at = float("-inf")
        self._changes.append(("revoke", [(str(tp.topic), int(tp.partition)) for tp in partitions]))

    async def _settle(self, consumer: Consumer) -> None:
        """Apply the assignment changes seen in the last poll: close what was revoked, restore
        and open what was assigned, start each new partition at its committed offset, run the
        hooks (the assignment hooks first, before any table is restored)."""
        started = time.perf_counter()
        changes, self._changes = self._changes, []
        interrupted: set[int] = set()
        added: set[tuple[str, int]] = set()
        # Whether the group has settled who holds what: an assignment (not a revocation after
        # it, which another assignment follows).
        handed_out = bool(changes) and changes[-1][0] == "assign"
        for kind, partitions in changes:
            if kind == "assign":
                self._assigned.update(partitions)
                added.update(partitions)
            else:
                self._assigned.difference_update(partitions)
                added.difference_update(partitions)
                interrupted.update(p for _t, p in partitions)
                for topic, partition in partitions:
                    self._positions.forget(topic, partition)
                    self._held.pop((topic, partition), None)
        by_topic: dict[str, set[int]] = {topic: set() for topic in self._processors}
        for topic, partition in self._assigned:
            by_topic.setdefault(topic, set()).add(partition)
        # Only partition numbers held for every input topic are handled (and their tables
        # opened): two workers must never write one table partition.
        owned = frozenset(set.intersection(*by_topic.values())) if by_topic else frozenset()
        if any(held != owned for held in by_topic.values()):
            assignment = {t: sorted(p) for t, p in by_topic.items()}
            log.error("stream.not_copartitioned", assignment=assignment)
        # Revoked or lost in between, a partition is taken anew: another worker may have held it.
        now = self.clock.now()
        self._held_since = {
            p: now if p in interrupted else self._held_since.get(p, now) for p in owned
        }
        if handed_out:
            for hook in self._assignment_hooks:
                hook(owned)
        for table in self.tables.values():
            for partition in table.partitions:
                if partition in interrupted or partition not in owned:
                    table.close(partition)
        fresh = sorted(p for p in owned if any(p not in t.partitions for t in self.tables.values()))
        if fresh:
            for table in self.tables.values():
                for partition in fresh:
                    table.close(partition)
                    if table.drop_if_stale(partition, self._epoch_seconds(), STALE_AFTER_SECONDS):
                        log.info(
                            "stream.stale_table_dropped", table=table.name, partition=partition
                        )
            await self._restore(fresh)
            for table in self.tables.values():
                for partition in fresh:
                    table.open(partition)
        if added:
            tps = [TopicPartition(t, p) for t, p in sorted(added)]
            delayed = [tp for tp in tps if tp.topic in self._due]
            if delayed:  # a partition held by a previous owner of this consumer starts unpaused
                with contextlib.suppress(KafkaException):
                    consumer.resume(delayed)
            committed = await self._committed(consumer, tps)
            for tp in committed:
                self._positions.start(str(tp.topic), int(tp.partition), int(tp.offset))
        self._owned = owned
        for hook in self._hooks:
            hook(owned)
        self._ready = bool(owned)
        log.info(
            "stream.assigned",
            partitions=sorted(owned),
            restored=fresh,
            seconds=round(time.perf_counter() - started, 3),
        )

    async def _committed(
        self, consumer: Consumer, partitions: list[TopicPartition]
    ) -> list[TopicPartition]:
        """The group's committed offsets, asked again while the broker does not answer."""
        while True:
            try:
                committed: list[TopicPartition] = await asyncio.to_thread(
                    consumer.committed, partitions, 30.0
                )
                return committed
            except KafkaException as exc:
                log.warning("stream.committed_unavailable", error=str(exc))
                await asyncio.sleep(RESTORE_RETRY_SECONDS)

    async def _restore(self, partitions: list[int]) -> None:
        """The tables' partitions up to the end of their changelogs, however long the broker
        takes: a partition is never handled on a partial table."""
        stores = [table.store() for table in self.tables.values()]
        while True:
            try:
                done = await asyncio.to_thread(
                    restore,
                    self.settings.kafka(),
                    stores,
                    client_id=f"{self.app_id}-restore",
                    # A transactional worker's changelogs hold aborted writes: never restored.
                    read_committed=self.transactional,
                    partitions=partitions,
                    current_at=self._epoch_seconds(),
                )
            except KafkaException as exc:  # the broker gone before the reading started
                log.warning("stream.restore_failed", partitions=partitions, error=str(exc))
                await asyncio.sleep(RESTORE_RETRY_SECONDS)
                continue
            log.info(
                "stream.tables_restored",
                partitions=partitions,
                read=done.partitions,
                records=done.records,
                megabytes=round(done.bytes / 2**20, 1),
                seconds=round(done.seconds, 3),
                complete=done.complete,
                locked=done.locked,
            )
            if done.complete and not done.locked:
                return
            await asyncio.sleep(RESTORE_RETRY_SECONDS)

    def _epoch_seconds(self) -> int:
        return int(self.clock.now().timestamp())

    async def _every(self, seconds: float, job: Job) -> None:
        while True:
            await asyncio.sleep(seconds)
            if not self._ready:
                continue
            try:
                await job()
            except Exception:
                log.exception("stream.job_failed", job=getattr(job, "__qualname__", repr(job)))


def run_stream_worker(worker: StreamWorker) -> None:
    """Run `worker` until SIGTERM or SIGINT; the current batch finishes first."""
    import signal

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        log.info("stream.heap_frozen", objects=freeze_startup_heap())
        collect_less_often()
        await worker.run(stop)

    event_loop.run(main(), worker.settings.event_loop)


def _dropped_proof_ended(proof: asyncio.Future[None]) -> None:
    error = None if proof.cancelled() else proof.exception()
    log.info("stream.dropped_proof_ended", error=None if error is None else repr(error))
