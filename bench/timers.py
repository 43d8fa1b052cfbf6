"""Orchestrator timers benchmark: recovery time, memory per waiting timer, firing lateness.

`.venv/bin/python -m bench.timers [--instances 100000 1000000]` starts its own throw-away Kafka
(ports 29192/29193, state in `.local/bench-timers`, wiped at the start, stopped at the end) and,
for 0 timers (the baseline) and then each requested size N, runs one orchestrator worker
(`python -m services.orchestrator`, its own app id, so its own topics and consumer group):

1. load: N waiting instances are written straight into the worker's changelogs with a raw
   producer, each on its contact's partition, due 1 to 60 days from now: the `timers` row in the
   format of `services/orchestrator/adapters/timers.py`, and the contact's `contacts` row, a
   `ContactState` (`services/orchestrator/domain/state.py`) with its profile and the one instance
   waiting on that timer (same instance id, timer id and due time; about 1.4 KB of JSON).
2. raw read (the baseline for recovery): a raw confluent-kafka consumer reads both changelogs to
   their end.
3. cold start: the worker starts with an empty data folder (a new machine, or a partition move),
   restores both tables when its partitions are assigned (the bulk restore of
   `shared/restore.py`, in `shared/streams.py`) and rebuilds its index. Measured: start to the
   log line `orchestrator.timers_recovered`, the bulk restore's own time (its log line), and the
   worker's RSS (VmRSS) once recovered and its peak before (VmHWM). RSS minus the RSS of the
   0-timer worker, divided by N, is what a waiting instance costs the whole worker (index and
   RocksDB's memtables); the index's own size is logged by the worker.
4. warm restart and firing: the worker is stopped (SIGTERM), a slice of timers due a few seconds
   after it will have recovered is added to the timers changelog (some spread over a window, some
   all due at the same millisecond; timer rows only, so they fire as stray rows), and the worker
   restarts on its local RocksDB. The bench reads `waypost.timers.v1` and measures lateness per
   timer: `fired_at - due_at` from the record, and the time the bench received it minus
   `due_at`. Timers that came due before the worker had recovered are left out of the lateness
   figures (and counted).

Before that, S12 in-process (no Kafka): random timers among the first size's N are restarted to
later due times through `TimerStore.apply` over a RocksDB table, against a raw RocksDB get and
put of the same rows; the index must not grow.

Ratios are against figures of the same run: recovery against the raw read of the same topics,
memory against the 0-timer worker, lateness against the 0-timer worker's firing of the same
slice. The worker, Kafka and the bench share this machine's cores, so figures are relative. The
last line is `RESULT timers=N cold_recovery_s=… warm_recovery_s=… rss_mb=…` for the largest N
(rss_mb: the cold worker's RSS once recovered).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer
from confluent_kafka import TopicPartition as KafkaPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from pydantic import AwareDatetime, TypeAdapter
from rocksdict import Options as RocksOptions
from rocksdict import Rdict

from services.orchestrator.adapters.timers import (
    TimerStore,
    epoch_ms,
    from_epoch_ms,
    timer_key,
    timer_value,
)
from shared.contracts import Profile, TimerFired
from shared.ids import stable_id
from shared.journey_engine.state import ContactState, Instance, PendingTimer, ScheduleTimer
from shared.kafka import ensure_topics
from shared.topics import TIMERS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy" / "local"))

import stack  # noqa: E402  (a script, not a package: importable once its folder is on the path)

HOME = ROOT / ".local" / "bench-timers"
PORTS = stack.Ports(
    kafka=29192,
    kafka_controller=29193,
    mongo=27217,
    smtp=21125,
    outbox=28125,
    ingest=28100,
    admin=28101,
    kafka_sasl=29194,
)
PROGRESS_EVERY = 2.0  # seconds between progress lines
RECOVERED = "orchestrator.timers_recovered"
RESTORED = "stream.tables_restored"  # the bulk restore on assignment (shared/streams.py)


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# -- the rows ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    contact_key: str
    instance_id: str
    timer_id: str
    due_ms: int


def rows(rng: random.Random, prefix: str, count: int, due_ms: Iterator[int]) -> Iterator[Row]:
    for n in range(count):
        yield Row(
            contact_key=f"{prefix}-{n:08d}",
            instance_id=f"{rng.getrandbits(128):032x}",  # stable_id's length and alphabet
            timer_id=f"{rng.getrandbits(128):032x}",
            due_ms=next(due_ms),
        )


def future_due(rng: random.Random, low: int, high: int) -> Iterator[int]:
    while True:
        yield rng.randrange(low, high)


# The journey the loaded instances wait in: a welcome email, then a wait of days.
JOURNEY_ID = "bench-welcome"
_DATETIME: TypeAdapter[datetime] = TypeAdapter(AwareDatetime)


def contact_state(row: Row, entered: datetime) -> ContactState:
    """The orchestrator's `contacts` row of a contact whose one instance waits on `row`'s timer,
    as the engine leaves it after a `Signed Up` event: its profile, the instance with its context
    and pending timer, the entry counts and the handled event id."""
    key = row.contact_key
    signup = f"{key}-signup"
    trigger = {
        "name": "Signed Up",
        "type": "track",
        "message_id": signup,
        "timestamp": entered.isoformat(),
        "properties": {"plan": "trial", "source": "landing"},
        "traits": {},
    }
    profile = Profile(
        contact_key=key,
        user_id=key,
        traits={"email": f"{key}@example.com", "first_name": "Ann", "timezone": "Europe/Paris"},
        first_seen=entered,
        last_seen=entered,
        event_counts={"Signed Up": 1},
        updated_at=entered,
    )
    instance = Instance(
        instance_id=row.instance_id,
        journey_id=JOURNEY_ID,
        journey_version=1,
        contact_key=key,
        step_id="wait-a-while",
        entered_at=entered,
        visits={"hello": 1, "wait-a-while": 1},
        context={"trigger": trigger, "entered_at": entered.isoformat()},
        timer=PendingTimer(
            timer_id=row.timer_id, step_id="wait-a-while", due_at=from_epoch_ms(row.due_ms)
        ),
    )
    return ContactState(
        contact_key=key,
        profile=profile,
        instances={row.instance_id: instance},
        entries={JOURNEY_ID: 1},
        last_entered={JOURNEY_ID: entered},
        handled=(stable_id(signup, length=16),),
    )


class ContactRows:
    """`contact_state(row).model_dump_json()` for many rows, fast: the JSON of one state built
    with marker values, cut at the markers, and joined again around each row's own values.
    `check` compares a row against the model's own serialisation."""

    _MARKERS: ClassVar[dict[str, str]] = {
        "key": "zzcontactzz",
        "instance": "zzinstancezz",
        "timer": "zztimerzz",
        "handled": "zzhandledzz",
    }
    _DUE_MARKER = 32_503_680_000_123  # 3000-01-01T00:00:00.123Z: no loaded timer is due then

    def __init__(self, entered: datetime) -> None:
        self.entered = entered
        marks = self._MARKERS
        marked = contact_state(
            Row(marks["key"], marks["instance"], marks["timer"], self._DUE_MARKER), entered
        )
        text = marked.model_copy(update={"handled": (marks["handled"],)}).model_dump_json()
        due = self._due(self._DUE_MARKER).decode()
        names = {value: name for name, value in marks.items()} | {due: "due"}
        pattern = "(" + "|".join(re.escape(m) for m in sorted(names, key=len, reverse=True)) + ")"
        parts = re.split(pattern, text)
        self._pieces = [p.encode() for p in parts[0::2]]
        self._fields = [names[m] for m in parts[1::2]]

    @staticmethod
    def _due(due_ms: int) -> bytes:
        return _DATETIME.dump_json(from_epoch_ms(due_ms))[1:-1]

    def value(self, row: Row) -> bytes:
        values = {
            "key": row.contact_key.encode(),
            "instance": row.instance_id.encode(),
            "timer": row.timer_id.encode(),
            "handled": stable_id(f"{row.contact_key}-signup", length=16).encode(),
            "due": self._due(row.due_ms),
        }
        out = [self._pieces[0]]
        for name, piece in zip(self._fields, self._pieces[1:], strict=True):
            out.append(values[name])
            out.append(piece)
        return b"".join(out)

    def check(self, row: Row) -> None:
        """The fast row is byte for byte the model's JSON, and its timer is the timer row's."""
        value = self.value(row)
        expected = contact_state(row, self.entered).model_dump_json().encode()
        if value != expected:
            raise AssertionError(f"contact row differs from ContactState:\n{value!r}\n{expected!r}")
        state = ContactState.model_validate_json(value)
        timer = state.instances[row.instance_id].timer
        assert timer is not None
        assert timer.timer_id == row.timer_id
        assert timer_value(epoch_ms(timer.due_at), timer.timer_id) == timer_value(
            row.due_ms, row.timer_id
        )


def partition_of(contact_key: str, partitions: int) -> int:
    """The partition the services' producers pick for a contact (librdkafka: CRC32 of the key)."""
    return zlib.crc32(contact_key.encode()) % partitions


def produce_rows(
    bootstrap: str,
    app_id: str,
    batch: Iterator[Row],
    total: int,
    partitions: int,
    contacts: ContactRows | None = None,
) -> int:
    """Write each row's timer into the worker's `timers` changelog and, with `contacts`, its
    contact row into the `contacts` changelog, as the worker's tables would (timer row first,
    both on the contact's partition); returns the records acknowledged."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "client.id": "bench-timers-load",
            "acks": "all",
            "linger.ms": 20,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 500_000,
        }
    )
    acked = 0
    failed: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: Any) -> None:
        nonlocal acked
        if err is None:
            acked += 1
        else:
            failed.append(str(err))

    def produce(topic: str, key: bytes, value: bytes, partition: int) -> None:
        while True:
            try:
                producer.produce(
                    topic, value=value, key=key, partition=partition, on_delivery=on_delivery
                )
                return
            except BufferError:
                producer.poll(0.05)

    timers_topic, contacts_topic = changelog(app_id, "timers"), changelog(app_id, "contacts")
    records = total * (2 if contacts else 1)
    progress = Progress(f"load {app_id}", records, "records acknowledged")
    for n, row in enumerate(batch):
        partition = partition_of(row.contact_key, partitions)
        key = timer_key(row.contact_key, row.instance_id)
        produce(timers_topic, key, timer_value(row.due_ms, row.timer_id), partition)
        if contacts is not None:
            if n % 100_000 == 0:
                contacts.check(row)
            produce(contacts_topic, row.contact_key.encode(), contacts.value(row), partition)
        producer.poll(0)
        progress.tick(acked)
    while producer.flush(1.0) > 0:
        progress.tick(acked)
    progress.tick(acked, force=True)
    if failed:
        raise RuntimeError(f"{len(failed)} records not acknowledged, first: {failed[0]}")
    return acked


# -- measuring -----------------------------------------------------------------------------------


class Progress:
    """Prints `done/total` and the rate so far at most every PROGRESS_EVERY seconds."""

    def __init__(self, label: str, total: int, unit: str) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.started = self.last = time.perf_counter()

    def tick(self, done: int, *, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < PROGRESS_EVERY:
            return
        self.last = now
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        say(f"  {self.label}: {done}/{self.total} {self.unit}, {rate:,.0f}/s")


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile, None when there are no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """The process's resident memory now, or with `VmHWM` its peak since it started."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return 0


def raw_read(bootstrap: str, topics: Sequence[str], partitions: int) -> tuple[int, float]:
    """Read topics from the beginning to their current end; returns (records, seconds)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "bench-timers-raw-read",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            # Prefetch deep enough that the reader never waits on a fetch: with librdkafka's
            # default (100k messages) reading 1M rows took 6x longer.
            "queued.min.messages": 1_000_000,
        }
    )
    try:
        ends = {}
        for topic in topics:
            for p in range(partitions):
                tp = KafkaPartition(topic, p)
                low, high = consumer.get_watermark_offsets(tp, timeout=10)
                if high > low:
                    ends[(topic, p)] = high
        started = time.perf_counter()
        consumer.assign([KafkaPartition(t, p, OFFSET_BEGINNING) for t, p in ends])
        records = 0
        pending = set(ends)
        progress = Progress("raw read", sum(ends.values()), "records")
        while pending:
            for msg in consumer.consume(5000, 0.02):
                error = msg.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        raise RuntimeError(f"raw read failed: {error}")
                    continue
                records += 1
                tp = (str(msg.topic()), int(msg.partition() or 0))
                if (msg.offset() or 0) + 1 >= ends[tp]:
                    pending.discard(tp)
            progress.tick(records)
        return records, time.perf_counter() - started
    finally:
        consumer.close()


class FiredTimers:
    """Reads `waypost.timers.v1` from its current end in a thread; keeps the first record per
    instance of interest and when the bench received it."""

    def __init__(self, bootstrap: str, partitions: int, instances: set[str]) -> None:
        self.instances = instances
        self.first: dict[str, tuple[TimerFired, datetime]] = {}
        self.repeats = 0
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": "bench-timers-fired",
                "enable.auto.commit": False,
            }
        )
        # From each partition's current end, looked up now: nothing fired before start() counts.
        ends = []
        for p in range(partitions):
            tp = KafkaPartition(TIMERS.name, p)
            ends.append(KafkaPartition(TIMERS.name, p, self._consumer.get_watermark_offsets(tp)[1]))
        self._consumer.assign(ends)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="bench-fired", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def count(self) -> int:
        with self._lock:
            return len(self.first)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        self._consumer.close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            messages = self._consumer.consume(1000, 0.1)
            received = datetime.now(UTC)
            for msg in messages:
                if msg.error() is not None:
                    continue
                fired = TimerFired.model_validate_json(msg.value() or b"")
                if fired.instance_id not in self.instances:
                    continue
                with self._lock:
                    if fired.instance_id in self.first:
                        self.repeats += 1
                    else:
                        self.first[fired.instance_id] = (fired, received)


# -- the worker ----------------------------------------------------------------------------------


@dataclass
class Worker:
    """One orchestrator worker process with its own app id, data folder and log."""

    bench: stack.Stack
    app_id: str
    log: Path
    process: subprocess.Popen[bytes] | None = None
    started_wall: datetime = field(default_factory=lambda: datetime.now(UTC))
    # The last bulk restore line of the current run, if the worker logged one.
    restored: dict[str, Any] | None = None
    _read: int = 0

    def start(self) -> None:
        env = {
            **self.bench.env(),
            "WAYPOST_APP_ID": self.app_id,
            "WAYPOST_DATA_DIR": str(self.bench.home / "data" / self.app_id),
            "WAYPOST_LOG_FORMAT": "json",
        }
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._read = self.log.stat().st_size if self.log.exists() else 0
        self.started_wall = datetime.now(UTC)
        self.restored = None
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [stack.PYTHON, "-m", "services.orchestrator"],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def lines(self) -> Iterator[dict[str, Any]]:
        """New JSON log lines since the last call."""
        with self.log.open("rb") as log:
            log.seek(self._read)
            chunk = log.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._read += len(complete)
        for raw in complete.splitlines():
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                if isinstance(line, dict):
                    yield line

    def wait_recovered(self, expected: int, timeout: float) -> tuple[dict[str, Any], float]:
        """The recovery log line with `expected` timers, and seconds from start to it."""
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.tail()}")
            for line in self.lines():
                if line.get("event") == RESTORED:
                    self.restored = line
                if line.get("event") == RECOVERED:
                    if line.get("pending") == expected:
                        at = datetime.fromisoformat(line["timestamp"])
                        return line, (at - self.started_wall).total_seconds()
                    say(f"  recovered with {line.get('pending')} timers, waiting for {expected}")
            if time.monotonic() - last >= PROGRESS_EVERY:
                last = time.monotonic()
                elapsed = (datetime.now(UTC) - self.started_wall).total_seconds()
                say(
                    f"  recovering: {elapsed:.0f}s, "
                    f"worker RSS {rss_bytes(self.pid) / 2**20:.0f} MiB"
                )
            time.sleep(0.05)
        raise TimeoutError(f"no {RECOVERED} pending={expected} after {timeout}s:\n{self.tail()}")

    def stop(self, timeout: float = 60.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(OSError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            say("  worker did not stop on SIGTERM; killing it")
            with contextlib.suppress(OSError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"


# -- one size ------------------------------------------------------------------------------------


@dataclass
class SizeResult:
    timers: int
    raw_records: int = 0
    raw_seconds: float = 0.0
    cold_seconds: float = 0.0
    cold_restore_seconds: float | None = None
    cold_rebuild_seconds: float = 0.0
    cold_rss: int = 0
    cold_peak_rss: int = 0
    index_bytes: int = 0
    warm_seconds: float = 0.0
    warm_restore_seconds: float | None = None
    warm_rebuild_seconds: float = 0.0
    warm_rss: int = 0
    warm_peak_rss: int = 0
    slice_total: int = 0
    slice_fired: int = 0
    early: int = 0
    repeats: int = 0
    lateness: dict[str, list[float]] = field(default_factory=dict)


def restore_seconds(line: dict[str, Any] | None) -> float | None:
    return float(line.get("seconds", 0.0)) if line is not None else None


def seconds(value: float | None) -> str:
    return f"{value:.2f}s" if value is not None else "-"


def changelog(app_id: str, table: str) -> str:
    """The changelog topic of a worker's table, as `shared.streams.StreamWorker` names it."""
    return f"{app_id}-{table}-changelog"


def create_changelogs(bootstrap: str, app_id: str, partitions: int) -> None:
    """The orchestrator's changelogs as the worker declares them: compacted, one partition per
    source partition."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = [
        NewTopic(changelog(app_id, table), partitions, 1, config={"cleanup.policy": "compact"})
        for table in ("timers", "contacts")
    ]
    for future in admin.create_topics(new, operation_timeout=30).values():
        future.result()


def run_size(bench: stack.Stack, args: argparse.Namespace, timers: int) -> SizeResult:
    result = SizeResult(timers)
    app_id = f"bench-timers-{timers}"
    rng = random.Random(args.seed + timers)
    create_changelogs(bench.bootstrap, app_id, args.partitions)

    now = epoch_ms(datetime.now(UTC))
    day = 86_400_000
    if timers:
        bulk = rows(rng, f"c{timers}", timers, future_due(rng, now + day, now + 60 * day))
        contacts = ContactRows(from_epoch_ms(now))
        produce_rows(bench.bootstrap, app_id, bulk, timers, args.partitions, contacts)
        result.raw_records, result.raw_seconds = raw_read(
            bench.bootstrap,
            [changelog(app_id, "timers"), changelog(app_id, "contacts")],
            args.partitions,
        )
        say(f"  raw read: {result.raw_records} records in {result.raw_seconds:.2f}s")

    worker = Worker(bench, app_id, bench.home / "logs" / f"{app_id}.log")
    say(f"  cold start: worker {app_id} on an empty data folder")
    worker.start()
    try:
        line, result.cold_seconds = worker.wait_recovered(timers, args.timeout)
        result.cold_rebuild_seconds = float(line.get("seconds", 0.0))
        result.cold_restore_seconds = restore_seconds(worker.restored)
        result.index_bytes = int(line.get("index_bytes", 0))
        settle_until = time.monotonic() + args.settle
        while time.monotonic() < settle_until:
            time.sleep(0.1)  # let the worker finish starting up before reading its memory
        result.cold_rss = rss_bytes(worker.pid)
        result.cold_peak_rss = rss_bytes(worker.pid, "VmHWM")
        say(
            f"  recovered {timers} timers in {result.cold_seconds:.2f}s (bulk restore "
            f"{seconds(result.cold_restore_seconds)}, index rebuild "
            f"{result.cold_rebuild_seconds:.2f}s), RSS {result.cold_rss / 2**20:.0f} MiB"
        )
    finally:
        worker.stop()

    # The slice comes due after the warm restart will have recovered (a cold start is slower).
    due0 = epoch_ms(datetime.now(UTC)) + int((result.cold_seconds + args.margin) * 1000)
    window = int(args.spread_seconds * 1000)
    spread = list(
        rows(
            rng,
            f"s{timers}",
            args.spread,
            (due0 + window * n // max(1, args.spread) for n in range(args.spread)),
        )
    )
    burst = list(
        rows(rng, f"b{timers}", args.burst, (due0 + window // 2 for _ in range(args.burst)))
    )
    kinds = {r.instance_id: "spread" for r in spread} | {r.instance_id: "burst" for r in burst}
    result.slice_total = len(kinds)
    produce_rows(bench.bootstrap, app_id, iter(spread + burst), len(kinds), args.partitions)

    fired = FiredTimers(bench.bootstrap, args.partitions, set(kinds))
    fired.start()
    say(
        f"  warm restart: {len(kinds)} more timers, "
        f"due from {args.margin + result.cold_seconds:.0f}s on"
    )
    worker.start()
    try:
        line, result.warm_seconds = worker.wait_recovered(timers + len(kinds), args.timeout)
        recovered_at = worker.started_wall + timedelta(seconds=result.warm_seconds)
        result.warm_rebuild_seconds = float(line.get("seconds", 0.0))
        result.warm_restore_seconds = restore_seconds(worker.restored)
        result.warm_rss = rss_bytes(worker.pid)
        result.warm_peak_rss = rss_bytes(worker.pid, "VmHWM")
        say(
            f"  recovered {timers + len(kinds)} timers in {result.warm_seconds:.2f}s "
            f"(bulk restore {seconds(result.warm_restore_seconds)}, "
            f"index rebuild {result.warm_rebuild_seconds:.2f}s), "
            f"RSS {result.warm_rss / 2**20:.0f} MiB"
        )
        last_due = max((r.due_ms for r in spread + burst), default=due0)
        deadline = time.monotonic() + (last_due - epoch_ms(datetime.now(UTC))) / 1000 + args.timeout
        progress = Progress("firing", len(kinds), "timers received")
        while fired.count() < len(kinds) and time.monotonic() < deadline:
            progress.tick(fired.count())
            time.sleep(0.05)
        progress.tick(fired.count(), force=True)
    finally:
        fired.stop()
        worker.stop()

    result.slice_fired = len(fired.first)
    result.repeats = fired.repeats
    for kind in ("spread", "burst"):
        result.lateness[f"{kind} fired_at"] = []
        result.lateness[f"{kind} received"] = []
    for instance_id, (record, received) in fired.first.items():
        if record.due_at < recovered_at:
            result.early += 1  # came due while the worker was still recovering
            continue
        kind = kinds[instance_id]
        result.lateness[f"{kind} fired_at"].append(
            (record.fired_at - record.due_at).total_seconds() * 1000
        )
        result.lateness[f"{kind} received"].append(
            (received - record.due_at).total_seconds() * 1000
        )
    return result


# -- S12: restarts in-process -------------------------------------------------------------------


@dataclass
class RestartResult:
    timers: int
    restarts: int
    apply_seconds: float
    raw_seconds: float
    indexed_before: int
    indexed_after: int


def s12_restarts(path: Path, timers: int, restarts: int, seed: int) -> RestartResult:
    """S12 without Kafka: restart random timers to later due times through `TimerStore.apply`
    over a RocksDB table, against a raw RocksDB get and put of the same rows (the table's own
    cost). The worker adds the changelog write to both."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    rng = random.Random(seed)
    db = Rdict(str(path / "raw"), options=RocksOptions(raw_mode=True))
    table = Rdict(str(path / "timers"), options=RocksOptions(raw_mode=True))
    try:
        store = TimerStore(table)  # type: ignore[arg-type]  # Rdict is a bytes mapping
        start = datetime.now(UTC) + timedelta(days=1)
        live = list(rows(rng, "s12", timers, itertools.repeat(0)))  # due: `start` below
        for row in live:
            store.apply(ScheduleTimer(row.contact_key, row.instance_id, row.timer_id, start))
        commands = []
        for n in range(restarts):
            row = live[rng.randrange(timers)]
            due = start + timedelta(days=60, milliseconds=n)
            commands.append(ScheduleTimer(row.contact_key, row.instance_id, f"{n:032x}", due))
        pairs = [
            (timer_key(c.contact_key, c.instance_id), timer_value(epoch_ms(c.due_at), c.timer_id))
            for c in commands
        ]
        for key, value in pairs[: min(timers, len(pairs))]:
            db[key] = value  # the raw table holds the same rows before the timed writes
        indexed_before = store.indexed
        started = time.perf_counter()
        for command in commands:
            store.apply(command)
        apply_seconds = time.perf_counter() - started
        started = time.perf_counter()
        for key, value in pairs:
            db.get(key)
            db[key] = value
        raw_seconds = time.perf_counter() - started
        return RestartResult(
            timers, restarts, apply_seconds, raw_seconds, indexed_before, store.indexed
        )
    finally:
        db.close()
        table.close()
        shutil.rmtree(path, ignore_errors=True)


# -- the stack and the report --------------------------------------------------------------------


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_kafka(bench: stack.Stack) -> None:
    bench.down()  # a previous run that was killed may have left its Kafka behind
    shutil.rmtree(bench.home, ignore_errors=True)
    busy = [p for p in (PORTS.kafka, PORTS.kafka_controller) if port_in_use(p)]
    if busy:
        raise RuntimeError(f"ports {busy} are already in use; the bench needs them free")
    stack.setup()
    say(f"starting Kafka on {bench.bootstrap} (state in {bench.home}) ...")
    bench.start_kafka()
    bench.wait_kafka()
    created = ensure_topics(bench.bootstrap, bench.partitions)
    say(f"topics ready ({len(created)} created, {bench.partitions} partitions)")
    join_a_group(bench.bootstrap)


def join_a_group(bootstrap: str, timeout: float = 60.0) -> None:
    """The broker creates its group coordinator's topic on the first join; do it before any
    worker is timed, so the baseline's start-up does not pay for it."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-timers-warm-up"})
    try:
        consumer.subscribe([TIMERS.name])
        deadline = time.monotonic() + timeout
        while not consumer.assignment():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no partitions assigned after {timeout}s")
            consumer.poll(0.1)
    finally:
        consumer.close()


def table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        print("  ".join(cells), flush=True)
        if n == 0:
            print("  ".join("-" * w for w in widths), flush=True)


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}" if base > 0 else "-"


def report(base: SizeResult, results: Sequence[SizeResult], s12: RestartResult) -> None:
    say(
        "recovery: worker start to `timers_recovered`, against a raw read of the same "
        "changelogs (timers and contacts)"
    )
    rows_: list[list[str]] = [
        [
            "timers",
            "raw read s",
            "cold start s",
            "vs raw",
            "cold - empty s",
            "vs raw",
            "restore s",
            "vs raw",
            "rebuild s",
            "warm start s",
            "restore s",
            "rebuild s",
        ]
    ]
    for r in [base, *results]:
        work = r.cold_seconds - base.cold_seconds
        restore = r.cold_restore_seconds
        rows_.append(
            [
                f"{r.timers:,}",
                f"{r.raw_seconds:.2f}" if r.timers else "-",
                f"{r.cold_seconds:.2f}",
                ratio(r.cold_seconds, r.raw_seconds) if r.timers else "-",
                f"{work:.2f}" if r.timers else "-",
                ratio(work, r.raw_seconds) if r.timers else "-",
                f"{restore:.2f}" if restore is not None else "-",
                ratio(restore, r.raw_seconds) if r.timers and restore is not None else "-",
                f"{r.cold_rebuild_seconds:.3f}",
                f"{r.warm_seconds:.2f}",
                f"{r.warm_restore_seconds:.2f}" if r.warm_restore_seconds is not None else "-",
                f"{r.warm_rebuild_seconds:.3f}",
            ]
        )
    table(rows_)
    print(flush=True)
    say(
        "memory: worker RSS once recovered, against the worker with 0 timers; "
        "peak: the highest RSS before that (VmHWM)"
    )
    rows_ = [
        [
            "timers",
            "cold MiB",
            "vs empty",
            "bytes/timer",
            "cold peak MiB",
            "warm MiB",
            "bytes/timer",
            "warm peak MiB",
            "index b/t",
        ]
    ]
    for r in [base, *results]:
        cold, warm = r.cold_rss - base.cold_rss, r.warm_rss - base.warm_rss
        rows_.append(
            [
                f"{r.timers:,}",
                f"{r.cold_rss / 2**20:.0f}",
                ratio(r.cold_rss, base.cold_rss),
                f"{cold / r.timers:.0f}" if r.timers else "-",
                f"{r.cold_peak_rss / 2**20:.0f}",
                f"{r.warm_rss / 2**20:.0f}",
                f"{warm / r.timers:.0f}" if r.timers else "-",
                f"{r.warm_peak_rss / 2**20:.0f}",
                f"{r.index_bytes / r.timers:.0f}" if r.timers else "-",
            ]
        )
    table(rows_)
    print(flush=True)
    say(
        f"S12 restarts in-process: {s12.restarts:,} restarts to later times among "
        f"{s12.timers:,} timers, against a raw RocksDB get and put of the same rows"
    )
    rows_ = [["path", "us/restart", "vs raw", "index entries before", "after"]]
    rows_.append(
        [
            "TimerStore.apply",
            f"{s12.apply_seconds / s12.restarts * 1e6:.2f}",
            ratio(s12.apply_seconds, s12.raw_seconds),
            f"{s12.indexed_before:,}",
            f"{s12.indexed_after:,}",
        ]
    )
    rows_.append(["raw get + put", f"{s12.raw_seconds / s12.restarts * 1e6:.2f}", "1.00", "", ""])
    table(rows_)
    print(flush=True)
    say("firing lateness in ms (due_at to fired_at, and to the bench receiving the record)")
    rows_ = [["timers", "slice", "n", "p50", "p95", "p99", "max", "p99 vs empty"]]
    for r in [base, *results]:
        for name, values in r.lateness.items():
            pcts = [percentile(values, p) for p in (50, 95, 99, 100)]
            base_p99 = percentile(base.lateness.get(name, []), 99)
            rows_.append(
                [
                    f"{r.timers:,}",
                    name,
                    str(len(values)),
                    *(f"{v:.0f}" if v is not None else "-" for v in pcts),
                    ratio(pcts[2], base_p99) if pcts[2] is not None and base_p99 else "-",
                ]
            )
    table(rows_)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--instances", type=int, nargs="+", default=[100_000], help="sizes N to run"
    )
    parser.add_argument("--partitions", type=int, default=6, help="partitions per topic")
    parser.add_argument(
        "--spread", type=int, default=5000, help="slice timers spread over a window"
    )
    parser.add_argument("--spread-seconds", type=float, default=10.0, help="the spread window")
    parser.add_argument("--burst", type=int, default=5000, help="slice timers due at one instant")
    parser.add_argument(
        "--margin",
        type=float,
        default=5.0,
        help="seconds between the expected recovery and the first due slice timer",
    )
    parser.add_argument(
        "--settle", type=float, default=3.0, help="seconds after recovery before reading RSS"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for a recovery or for firing"
    )
    parser.add_argument(
        "--restarts", type=int, default=200_000, help="S12 restarts timed in-process"
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the row generator")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.instances) or args.restarts < 1:
        parser.error("--instances and --restarts must be positive")
    if args.spread < 0 or args.burst < 0:
        parser.error("--spread and --burst must not be negative")

    bench = stack.Stack(home=HOME, ports=PORTS, partitions=args.partitions)
    say(
        f"sizes {args.instances}, slice {args.spread} spread over {args.spread_seconds:.0f}s + "
        f"{args.burst} at one instant, {args.partitions} partitions, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    results: list[SizeResult] = []
    say(f"S12 restarts in-process ({args.restarts:,} among {args.instances[0]:,} timers) ...")
    s12 = s12_restarts(HOME / "s12", args.instances[0], args.restarts, args.seed)
    try:
        start_kafka(bench)
        say("baseline: a worker with 0 timers")
        base = run_size(bench, args, 0)
        for n in args.instances:
            say(f"size {n:,}")
            results.append(run_size(bench, args, n))
    finally:
        say("stopping the bench Kafka")
        bench.stop("kafka")

    print(flush=True)
    report(base, results, s12)
    print(flush=True)
    status = 0
    for r in [base, *results]:
        if r.slice_fired != r.slice_total:
            status = 1
            say(
                f"MISSING: {r.timers:,} timers: "
                f"{r.slice_total - r.slice_fired} slice timers never fired"
            )
        if r.early:
            say(
                f"note: {r.timers:,} timers: {r.early} slice timers came due before "
                "the worker had recovered (left out of the lateness figures)"
            )
        if r.repeats:
            say(
                f"note: {r.timers:,} timers: "
                f"{r.repeats} slice timers fired more than once (re-armed)"
            )
    if not status:
        say("every slice timer fired")
    largest = max(results, key=lambda r: r.timers)
    print(
        f"RESULT timers={largest.timers} cold_recovery_s={largest.cold_seconds:.2f} "
        f"warm_recovery_s={largest.warm_seconds:.2f} rss_mb={largest.cold_rss / 2**20:.0f}",
        flush=True,
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
