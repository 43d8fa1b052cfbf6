"""Spike: the segmenter's per-event work hosted by Quix Streams, against a raw consumer.

One of the candidate frameworks for the stream workers (faust-streaming today, Quix Streams, or a
loop of our own on confluent-kafka + rocksdict). This measures what Quix Streams costs per event
when it runs the segmenter's real fold, on the data of `bench.segmenter`.

The project does not depend on Quix Streams, so it runs from a virtualenv of its own:

    python3.11 -m venv /tmp/quixvenv
    /tmp/quixvenv/bin/pip install quixstreams==3.28.1 -e .   # Quix pins confluent-kafka <2.13
    PYTHONPATH=. /tmp/quixvenv/bin/python -m bench.spikes.quix_segmenter --events 20000

It starts its own throw-away Kafka (ports 39392/39393, state in `.local/bench-quix`, wiped at the
start, stopped at the end, on SIGTERM and on failure too), publishes the 11 aggregates and 20
segments of `bench.segmenter` as `waypost segments publish` would, and writes N storefront events
for M contacts onto `waypost.events.v1`, keyed by contact. Then, in one run:

1. raw read (the baseline): `bench.segmenter.raw_read`, a confluent-kafka consumer decoding each
   event into `shared.contracts.Event`.
2. fold alone: `services.segmenter.domain.contact.apply` over the same events, decoded
   beforehand, each contact's row carried in memory: no Kafka, no store, no JSON of rows.
3. handler alone: what the Quix callback below does per event (decode the event, read the
   contact's links and row, `apply`, encode every output, store the row and membership row),
   against a dict instead of Quix's state and with outputs dropped: the shell's own work.
4. Quix, at-least-once (the default checkpointing, every 5 s): a Quix `Application` over the
   events topic, one stateful callback per message. Its RocksDB state, prefixed by the message
   key, holds the contact's row (the segmenter's `ContactRow` JSON), its membership row and its
   two link rows (`alias`, `forgotten`: in the segmenter both are keyed by a function of the
   contact key, so they live under the message key here). Per event it produces what
   `Contacts._commit` emits: one `ContactEvent` per outcome event to `waypost.contact-events.v1`,
   the profile to `waypost.profiles.v1`, and a `SegmentTimerRequest` to `waypost.segment-timers.v1`
   when the tick moved. Events/s counts from the first record handled to the last (then the
   callback stops the app); "to return" adds the final checkpoint and the close.
5. Quix, exactly-once (`processing_guarantee="exactly-once"`): the same, in a new consumer group
   with its own state.
6. restore: a new app of the at-least-once group on an empty state folder restores its store from
   the changelog topic Quix kept; timed from Quix's "Beginning recovery check" to "Recovery
   process complete", against a raw consumer reading the same changelog to its end.

The framework's own cost per event is 1/(Quix events/s) less the fold's time per event (the
RESULT line), and less the handler's (the table). Quix, Kafka and the bench share this
machine's cores and whatever else runs on it, so the wall-clock figures are relative to this
machine and moment; the table's CPU time per event (this process, all its threads) moves less
when other work takes cores away.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import signal
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from confluent_kafka import OFFSET_BEGINNING, Consumer
from confluent_kafka import TopicPartition as Partition
from quixstreams import Application  # type: ignore[import-not-found]
from quixstreams.context import message_context  # type: ignore[import-not-found]

from bench.ingest import CpuMeter
from bench.segmenter import definitions, preload, raw_read, storefront
from bench.timers import port_in_use, say, table
from services.segmenter.adapters.definitions import LiveDefinitions
from services.segmenter.adapters.members import membership_row
from services.segmenter.domain import contact
from services.segmenter.domain.contact import ContactRow
from services.segmenter.domain.definitions import Definitions
from services.segmenter.domain.relations import (
    fan_out_requests,
    is_fan_out_copy,
    relation_records,
)
from shared.contracts import ContactEvent, Event, SegmentTimerRequest
from shared.kafka import ensure_topics
from shared.system_events import forged
from shared.topics import CONTACT_EVENTS, EVENTS, OBJECT_RELATIONS, PROFILES, SEGMENT_TIMERS

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy" / "local"))

import stack  # noqa: E402  (a script, not a package: importable once its folder is on the path)

HOME = ROOT / ".local" / "bench-quix"
PORTS = stack.Ports(
    39392,
    39393,
    mongo=47392,
    smtp=31225,
    outbox=38225,
    ingest=38200,
    admin=38201,
    kafka_sasl=39394,
)
ALO_GROUP, EOS_GROUP = "bench-quix-segmenter", "bench-quix-segmenter-eos"
# State keys under each contact's prefix (the segmenter's three tables, for one contact).
ROW, MEMBERSHIP, ALIAS, FORGOTTEN = "row", "membership", "alias", "forgotten"

Emit = Callable[[str, str, bytes], None]


class KeyState(Protocol):
    """What the handler needs of a store: Quix's `State` (prefixed by the message key) has it."""

    def get_bytes(self, key: str) -> bytes | None: ...

    def set_bytes(self, key: str, value: bytes) -> None: ...

    def exists(self, key: str) -> bool: ...


class DictState:
    """`KeyState` on a dict, one contact at a time (the handler measured without Quix)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], bytes] = {}
        self.prefix = ""

    def get_bytes(self, key: str) -> bytes | None:
        return self.rows.get((self.prefix, key))

    def set_bytes(self, key: str, value: bytes) -> None:
        self.rows[(self.prefix, key)] = value

    def exists(self, key: str) -> bool:
        return (self.prefix, key) in self.rows


@dataclass
class Handler:
    """One event as `Contacts.take`, `handle` and `_commit` treat it, for a store of one contact:
    the same reads, the same fold, the same outputs, the same rows written."""

    defs: Definitions
    rejected: int = 0

    def __call__(self, value: bytes, key: str, partition: int, state: KeyState, emit: Emit) -> None:
        event = Event.model_validate_json(value)
        if event.contact_key != key or forged(event):
            self.rejected += 1  # dead-lettered by the segmenter; none in this data
            return
        now = datetime.now(UTC)
        copy = is_fan_out_copy(event)
        if not copy and fan_out_requests(event, self.defs.object_triggers, now):
            raise RuntimeError("no object triggers are published in this bench")
        if state.exists(FORGOTTEN) or state.exists(ALIAS):
            raise RuntimeError("no contact is merged or forgotten in this bench")
        raw = state.get_bytes(ROW)
        before = ContactRow.model_validate_json(raw) if raw else None
        outcome = contact.apply(before, event, self.defs, now)
        if outcome.duplicate:
            return
        row = outcome.row
        assert row is not None
        for announced in outcome.events:
            emit(
                CONTACT_EVENTS.name,
                key,
                ContactEvent(contact_key=key, event=announced, profile=row.profile).to_wire(),
            )
        emit(PROFILES.name, key, row.profile.to_wire())
        if outcome.retime:
            request = SegmentTimerRequest(contact_key=key, due_at=row.next_tick, requested_at=now)
            emit(SEGMENT_TIMERS.name, key, request.to_wire())
        if not copy:
            for relation in relation_records(event, key, self.defs.object_triggers, now):
                emit(OBJECT_RELATIONS.name, relation.object_key, relation.to_wire())
        state.set_bytes(ROW, row.model_dump_json().encode())
        membership = membership_row(partition, row.evaluated, row.profile.segments)
        if before is None or membership != membership_row(
            partition, before.evaluated, before.profile.segments
        ):
            state.set_bytes(MEMBERSHIP, membership)


# -- 2 and 3: without Kafka -----------------------------------------------------------------------


@dataclass
class Timed:
    """Wall-clock and CPU seconds (this process, all its threads) of one phase."""

    seconds: float
    cpu: float

    @classmethod
    def of(cls, phase: Callable[[], object]) -> Timed:
        cpu, started = time.process_time(), time.perf_counter()
        phase()
        return cls(time.perf_counter() - started, time.process_time() - cpu)


def fold_alone(records: Sequence[tuple[str, bytes]], defs: Definitions) -> Timed:
    """`contact.apply` over the events (decoded beforehand), rows kept in memory."""
    events = [(key, Event.model_validate_json(value)) for key, value in records]
    rows: dict[str, ContactRow | None] = {}

    def fold() -> None:
        for key, event in events:
            outcome = contact.apply(rows.get(key), event, defs, datetime.now(UTC))
            if not outcome.duplicate:
                rows[key] = outcome.row

    return Timed.of(fold)


def handler_alone(
    records: Sequence[tuple[str, bytes]], defs: Definitions, partitions: int
) -> Timed:
    """The Quix callback's own work over the events, on a dict, outputs dropped."""
    handle, state, outputs = Handler(defs), DictState(), 0

    def emit(_topic: str, _key: str, _value: bytes) -> None:
        nonlocal outputs
        outputs += 1

    def run() -> None:
        for key, value in records:
            state.prefix = key
            handle(value, key, zlib.crc32(key.encode()) % partitions, state, emit)

    return Timed.of(run)


# -- 4 and 5: the Quix app ------------------------------------------------------------------------


@dataclass
class QuixRun:
    guarantee: str
    handled: int = 0
    outputs: int = 0
    started: float = 0.0  # app.run() called
    first: float = 0.0  # first record handled
    last: float = 0.0  # last record handled
    returned: float = 0.0  # app.run() returned: final checkpoint committed, clients closed
    cpu: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def rate(self) -> float:
        span = self.last - self.first
        return (self.handled - 1) / span if self.handled > 1 and span > 0 else 0.0


def quix_app(bench: stack.Stack, group: str, guarantee: str, state_dir: Path) -> Any:
    return Application(
        broker_address=bench.bootstrap,
        consumer_group=group,
        auto_offset_reset="earliest",
        processing_guarantee=guarantee,
        state_dir=str(state_dir),
        loglevel=None,  # no handler of Quix's own: warnings reach the root logger
    )


def run_quix(
    bench: stack.Stack, defs: Definitions, total: int, guarantee: str, group: str, meter: CpuMeter
) -> QuixRun:
    """Handle the `total` events in a Quix app; stop it from the callback at the last one."""
    result = QuixRun(guarantee)
    app = quix_app(bench, group, guarantee, HOME / f"state-{group}")
    topic = app.topic(EVENTS.name, key_deserializer="str", value_deserializer="bytes")
    sdf = app.dataframe(topic)
    producer = sdf.processing_context.producer
    handle = Handler(defs)
    samples: list[dict[str, float]] = []

    def emit(topic_name: str, key: str, value: bytes) -> None:
        producer.produce(topic=topic_name, key=key, value=value)
        result.outputs += 1

    def on_event(value: bytes, key: str, _timestamp: int, _headers: Any, state: Any) -> None:
        if result.handled == 0:
            samples.append(meter.sample())
            result.first = time.perf_counter()
        handle(value, key, message_context().partition, state, emit)
        result.handled += 1
        if result.handled >= total:
            result.last = time.perf_counter()
            samples.append(meter.sample())
            app.stop()

    sdf.update(on_event, stateful=True, metadata=True)
    result.started = time.perf_counter()
    try:
        app.run()
    except Exception as exc:  # noqa: BLE001 - a failed guarantee is reported, not fatal
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.returned = time.perf_counter()
        restore_sigterm()
    if len(samples) == 2:
        result.cpu = meter.spent(samples[0], samples[1])
    if result.error is None and result.handled < total:
        raise RuntimeError(f"the {guarantee} app stopped at {result.handled}/{total} events")
    if handle.rejected:
        raise RuntimeError(f"{handle.rejected} events rejected")
    return result


# -- 6: restore -----------------------------------------------------------------------------------


class RecoveryTimes(logging.Handler):
    """Notes when Quix's recovery manager logs its start and its end."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.began: float | None = None
        self.done: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Beginning recovery check"):
            self.began = time.perf_counter()
        elif message.startswith("Recovery process complete"):
            self.done = time.perf_counter()


def changelog_read(bench: stack.Stack, group: str) -> tuple[int, int, float]:
    """Records and bytes (keys and values) in the changelog topics Quix keeps for `group`'s
    store, and the seconds a raw consumer takes to read them to their end."""
    consumer = Consumer(
        {
            "bootstrap.servers": bench.bootstrap,
            "group.id": "bench-quix-changelog",
            "enable.auto.commit": False,
            "queued.min.messages": 1_000_000,
        }
    )
    try:
        # Quix names them changelog__<group>--<stream id>--<store>.
        prefix = f"changelog__{group}--"
        topics = [t for t in consumer.list_topics(timeout=10).topics if t.startswith(prefix)]
        ends = {
            (name, p): consumer.get_watermark_offsets(Partition(name, p), 10)[1]
            for name in topics
            for p in range(bench.partitions)
        }
        pending = {tp for tp, end in ends.items() if end > 0}
        started, size = time.perf_counter(), 0
        consumer.assign([Partition(name, p, OFFSET_BEGINNING) for name, p in pending])
        while pending:
            messages = consumer.consume(5000, 0.05)
            for msg in messages:
                if msg.error() is not None:
                    raise RuntimeError(f"changelog read failed: {msg.error()}")
                size += len(msg.key() or b"") + len(msg.value() or b"")
                tp = (msg.topic() or "", msg.partition() or 0)
                if (msg.offset() or 0) + 1 >= ends[tp]:
                    pending.discard(tp)
            if not messages:  # a transaction marker may hold the last offset: ask the position
                positions = consumer.position([Partition(name, p) for name, p in pending])
                pending -= {
                    (tp.topic, tp.partition)
                    for tp in positions
                    if tp.offset >= ends[(tp.topic, tp.partition)]
                }
        return sum(ends.values()), size, time.perf_counter() - started
    finally:
        consumer.close()


@dataclass
class Restore:
    seconds: float  # Quix: "Beginning recovery check" to "Recovery process complete"
    records: int
    size: int  # keys and values
    raw_seconds: float  # a raw consumer reading the same changelog


def run_restore(bench: stack.Stack, group: str) -> Restore:
    """A new app of `group` with an empty state folder restores its store from the changelog."""
    records, size, raw_seconds = changelog_read(bench, group)
    state_dir = HOME / f"state-{group}-restored"
    shutil.rmtree(state_dir, ignore_errors=True)
    times = RecoveryTimes()
    recovery = logging.getLogger("quixstreams.state.recovery")
    recovery.setLevel(logging.INFO)
    recovery.addHandler(times)
    try:
        app = quix_app(bench, group, "at-least-once", state_dir)
        sdf = app.dataframe(
            app.topic(EVENTS.name, key_deserializer="str", value_deserializer="bytes")
        )
        sdf.update(lambda _v, _k, _t, _h, _s: None, stateful=True, metadata=True)
        app.run(timeout=2.0)  # stops 2 s after recovery, with nothing left to read
    finally:
        recovery.removeHandler(times)
        restore_sigterm()
    if times.began is None or times.done is None:
        raise RuntimeError("Quix logged no recovery")
    return Restore(times.done - times.began, records, size, raw_seconds)


# -- the run --------------------------------------------------------------------------------------


def restore_sigterm() -> None:
    """A SIGTERM ends the run like Ctrl-C: through `main`'s finally, which stops Kafka. (Quix's
    `run` installs handlers of its own; they only stop its loop.)"""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def start_kafka(bench: stack.Stack) -> None:
    bench.down()  # a previous run that was killed may have left its Kafka behind
    shutil.rmtree(bench.home, ignore_errors=True)
    busy = [p for p in (PORTS.kafka, PORTS.kafka_controller) if port_in_use(p)]
    if busy:
        raise RuntimeError(f"ports {busy} are already in use; the spike needs them free")
    if not (stack.KAFKA_LIBS.exists() and any(stack.KAFKA_LIBS.iterdir())):
        raise RuntimeError(f"no Kafka in {stack.KAFKA_LIBS}: run `make setup` first")
    say(f"starting Kafka on {bench.bootstrap} (state in {bench.home}) ...")
    bench.start_kafka()
    bench.wait_kafka()
    ensure_topics(bench.bootstrap, bench.partitions)


def live_definitions(bootstrap: str) -> Definitions:
    """The segmenter's `Definitions`, built by `LiveDefinitions` from the published records."""
    live = LiveDefinitions(bootstrap)
    live.start()
    try:
        return live.current()
    finally:
        live.stop()


def us(seconds: float, events: int) -> float:
    return seconds / events * 1e6


def report(
    events: int,
    raw: Timed,
    fold: Timed,
    handler: Timed,
    runs: Sequence[QuixRun],
    restore: Restore | None,
) -> None:
    say(
        "events/s and wall-clock us/event; 'less fold' and 'less handler' subtract their "
        "us/event; CPU us/event is this process's (all threads); cores busy while counted"
    )
    raw_rate = events / raw.seconds
    rows = [["path", "events/s", "vs raw", "us/event", "less fold", "less handler", "CPU us/event"]]

    def row(name: str, rate: float, cpu: float | None) -> list[str]:
        per = 1e6 / rate if rate else 0.0
        return [
            name,
            f"{rate:,.0f}",
            f"{rate / raw_rate:.3f}",
            f"{per:.0f}",
            f"{per - us(fold.seconds, events):.0f}",
            f"{per - us(handler.seconds, events):.0f}",
            f"{us(cpu, events):.0f}" if cpu is not None else "-",
        ]

    rows.append(row("raw consumer + Event decode", raw_rate, raw.cpu))
    rows.append(row("fold alone (contact.apply)", events / fold.seconds, fold.cpu))
    rows.append(row("handler alone (dict state)", events / handler.seconds, handler.cpu))
    for run in runs:
        if run.error is not None:
            rows.append([f"Quix {run.guarantee}", "failed", "-", "-", "-", "-", "-"])
            continue
        rows.append(row(f"Quix {run.guarantee}, first to last", run.rate, run.cpu.get("quix")))
        rows.append(
            row(f"Quix {run.guarantee}, to return", events / (run.returned - run.first), None)
        )
    table(rows)
    for run in runs:
        if run.error is not None:
            say(f"Quix {run.guarantee} failed: {run.error}")
            continue
        span = run.last - run.first
        busy = {k: v / span for k, v in run.cpu.items() if k != "machine"}
        other = max(0.0, run.cpu.get("machine", 0.0) / span - sum(busy.values()))
        say(
            f"Quix {run.guarantee}: {run.outputs:,} records produced; start-up to the first "
            f"event {run.first - run.started:.1f}s; last event to run() returning "
            f"{run.returned - run.last:.1f}s; cores busy: "
            f"{', '.join(f'{k} {v:.2f}' for k, v in busy.items())}, other {other:.2f} "
            f"(of {os.cpu_count()})"
        )
    if restore is not None:
        r = restore
        say(
            f"restore from the changelog: {r.records:,} records ({r.size / 1e6:.1f} MB of keys "
            f"and values) in {r.seconds:.2f}s = {r.records / r.seconds:,.0f} records/s; a raw "
            f"consumer reads them in {r.raw_seconds:.2f}s ({r.seconds / r.raw_seconds:.1f}x)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=20_000, help="events pre-loaded (N)")
    parser.add_argument("--contacts", type=int, default=3_000, help="storefront contacts (M)")
    parser.add_argument("--partitions", type=int, default=6, help="partitions per topic")
    parser.add_argument("--seed", type=int, default=7, help="seed of the event generator")
    parser.add_argument("--no-eos", action="store_true", help="skip the exactly-once run")
    args = parser.parse_args(argv)
    published = definitions()
    records = storefront(random.Random(args.seed), args.events, args.contacts)
    say(
        f"{args.events:,} events for {args.contacts:,} contacts; {len(published.aggregates)} "
        f"aggregates, {len(published.segments)} segments; {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    bench = stack.Stack(home=HOME, ports=PORTS, partitions=args.partitions)
    restore_sigterm()
    runs: list[QuixRun] = []
    restore: Restore | None = None
    try:
        start_kafka(bench)
        preload(bench.bootstrap, published, records)
        defs = live_definitions(bench.bootstrap)
        say(f"definitions {defs.digest}: {len(defs.aggregates)} aggregates computed")
        meter = CpuMeter({"quix": os.getpid(), "kafka": bench.pid("kafka")})
        say("1/6: raw consumer reading and decoding the events (baseline)")
        cpu = time.process_time()
        raw = Timed(raw_read(bench.bootstrap, args.partitions), 0.0)
        raw.cpu = time.process_time() - cpu  # with the consumer's start and close
        say("2/6: the fold alone")
        fold = fold_alone(records, defs)
        say("3/6: the handler alone, on a dict")
        handler = handler_alone(records, defs, args.partitions)
        say("4/6: Quix, at-least-once")
        runs.append(run_quix(bench, defs, args.events, "at-least-once", ALO_GROUP, meter))
        if not args.no_eos:
            say("5/6: Quix, exactly-once")
            runs.append(run_quix(bench, defs, args.events, "exactly-once", EOS_GROUP, meter))
        say("6/6: Quix restoring the at-least-once store from its changelog")
        restore = run_restore(bench, ALO_GROUP)
    finally:
        say("stopping the spike's Kafka")
        bench.down()
    print(flush=True)
    report(args.events, raw, fold, handler, runs, restore)
    alo = runs[0].rate
    eos = runs[1].rate if len(runs) > 1 and runs[1].error is None else -1.0
    raw_rate = args.events / raw.seconds
    fold_us = us(fold.seconds, args.events)
    print(
        f"RESULT quix_events_per_s={alo:.1f} quix_eos_events_per_s={eos:.1f} "
        f"raw_consumer_events_per_s={raw_rate:.1f} ratio={alo / raw_rate:.5f} "
        f"fold_us_per_event={fold_us:.1f} "
        f"framework_overhead_us_per_event={1e6 / alo - fold_us:.1f}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
