"""Segmenter benchmark: throughput with 20 live segments, and event-to-membership latency.

`.venv/bin/python -m bench.segmenter [--events N]` starts its own throw-away Kafka (ports
29292/29293, state in `.local/bench-segmenter`, wiped at the start, stopped at the end), publishes
11 aggregates and 20 segments, and writes N Segment-shaped events for M contacts straight onto
`waypost.events.v1` with a producer, keyed by contact, before any worker runs. Then:

1. raw read (the baseline): a confluent-kafka consumer reads the N events and decodes each into
   `shared.contracts.Event`: the broker, the client and the JSON decode, nothing else. Read five
   times, three before phase 2 and two after it; the median read is the baseline (all five are
   printed). One read takes under a second, and single reads varied by a third on a shared
   machine. The reads after phase 2 run beside the worker, caught up and idle by then.
2. throughput: one segmenter worker (`python -m services.segmenter`; no orchestrator; no document
   store, so its profile view waits for one and stays idle, unless `--docstore`) starts on the
   full topic. The bench polls the offsets group `waypost-segmenter` committed on the events topic
   every 0.2 s. Events/s counts from the first poll that saw a commit (start-up and the first
   commit interval left out) to all N committed; "from process start" includes start-up.
3. latency, at each `--rate` (default 200/s for 20 s): with the worker caught up, contacts that
   already have 2 `Product Viewed` events each get a third at that steady rate, and so enter
   segment `browsers` (views in 7 days >= 3). Per contact: the produce call to the bench
   receiving that `Segment Entered` on `waypost.contact-events.v1`. The baseline is the same paced
   sends to a scratch topic, from the produce call to the bench consuming them: a raw Kafka round
   trip, in the same run. Each run's producer (ingest's settings) is ready before the clock
   starts, and its first second is a warm-up, not counted.

The worker, Kafka and the bench share this machine's cores (and whatever else runs on it: the
"other" CPU column), so the figures are relative to this machine and moment.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    ConsumerGroupTopicPartitions,
    Producer,
)
from confluent_kafka import TopicPartition as Partition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from bench.ingest import CpuMeter, log_tail
from bench.timers import Progress, percentile, port_in_use, say, table
from shared.contracts import ContactEvent, Event
from shared.journeys import SEGMENT_ENTERED
from shared.kafka import ensure_topics
from shared.segment_checks import check_segments, segment_file_from
from shared.segments import PublishedAggregate, PublishedSegment, SegmentFile
from shared.topics import CONTACT_EVENTS, DEFINITIONS, EVENTS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy" / "local"))

import stack  # noqa: E402  (a script, not a package: importable once its folder is on the path)

HOME = ROOT / ".local" / "bench-segmenter"
PORTS = stack.Ports(
    29292,
    29293,
    mongo=27292,
    smtp=21225,
    outbox=28225,
    ingest=28200,
    admin=28201,
    kafka_sasl=29294,
)
GROUP = "waypost-segmenter"
ROUND_TRIP = "bench.segmenter.round-trip"
LATENCY_SEGMENT = "browsers"
RAW, SEGMENTER = "raw Kafka round trip", "event -> Segment Entered"
WARMUP_SECONDS = 1.0
# The raw consumer's reads, before and after the worker's phase; the median is the baseline.
# One read of the pre-loaded events takes well under a second, and on a shared machine single
# reads of one run varied by a third (76,000 to 137,000 events/s within an hour): one read alone
# made the ratio swing more than any change to the worker did.
RAW_BEFORE, RAW_AFTER = 3, 2
DAY = 86_400.0

# In the segment-file format (examples/segments/): windows from 1h to 30d and all time, `where`
# filters, thresholds, all/any/not, traits, tags, segments reading segments, `before ... ago`.
DEFINITIONS_FILE = """
aggregates:
  - {id: views_1h, event: Product Viewed, window: 1h}
  - {id: views_7d, event: Product Viewed, window: 7d}
  - {id: shoe_views_7d, event: Product Viewed, window: 7d, where: {category: shoes}}
  - {id: adds_30d, event: Product Added, window: 30d}
  - {id: checkouts_1d, event: Checkout Started, window: 1d}
  - {id: orders, event: Order Completed}
  - {id: revenue, event: Order Completed, function: sum, property: total}
  - {id: revenue_30d, event: Order Completed, function: sum, property: total, window: 30d}
  - {id: big_orders_30d, event: Order Completed, window: 30d,
     where: {field: event.properties.total, op: gt, value: 200}}
  - {id: last_order_at, event: Order Completed, function: last_at}
  - {id: opens_30d, event: Email Opened, window: 30d}
segments:
  - {id: browsers, condition: {field: aggregates.views_7d, op: gte, value: 3}}
  - {id: hot-now, condition: {field: aggregates.views_1h, op: gte, value: 2}}
  - {id: shoe-fans, condition: {field: aggregates.shoe_views_7d, op: gte, value: 2}}
  - {id: cart-abandoners, condition: {all: [{field: aggregates.adds_30d, op: gte, value: 1},
                                            {field: aggregates.orders, op: eq, value: 0}]}}
  - {id: checkout-abandoners, condition: {all: [
      {field: aggregates.checkouts_1d, op: gte, value: 1}, {not: {segment: buyers}}]}}
  - {id: buyers, condition: {field: aggregates.orders, op: gte, value: 1}}
  - {id: repeat-buyers, condition: {field: aggregates.orders, op: gte, value: 3}}
  - {id: big-spenders, condition: {field: aggregates.revenue_30d, op: gt, value: 300}}
  - {id: ltv-500, condition: {field: aggregates.revenue, op: gte, value: 500}}
  - {id: vip, condition: {any: [{segment: ltv-500},
                                {field: aggregates.big_orders_30d, op: gte, value: 2}]}}
  - {id: lapsed, condition: {all: [{field: aggregates.orders, op: gte, value: 1},
                                   {field: aggregates.last_order_at, op: before, ago: 14d}]}}
  - {id: email-engaged, condition: {field: aggregates.opens_30d, op: gte, value: 2}}
  - {id: dormant, condition: {not: {any: [{field: aggregates.opens_30d, op: gte, value: 1},
                                          {field: aggregates.views_7d, op: gte, value: 1}]}}}
  - {id: pro-plan, condition: {field: traits.plan, op: eq, value: pro}}
  - {id: de-browsing, condition: {all: [{field: traits.country, op: eq, value: DE},
                                        {field: aggregates.views_7d, op: gte, value: 1}]}}
  - {id: fr-or-be, condition: {field: traits.country, op: in, value: [FR, BE]}}
  - {id: tagged-vip, condition: {tag: vip}}
  - {id: marketable-buyers, condition: {all: [{segment: buyers}, {not: {tag: no-marketing}}]}}
  - {id: window-shoppers, condition: {all: [{field: aggregates.views_7d, op: gte, value: 5},
                                            {field: aggregates.orders, op: eq, value: 0}]}}
  - {id: high-intent, condition: {any: [{segment: shoe-fans}, {all: [
      {field: aggregates.adds_30d, op: gte, value: 2},
      {field: aggregates.checkouts_1d, op: gte, value: 1}]}]}}
"""
# The storefront: event (or call type) and weight.
MIX = {
    "Product Viewed": 45,
    "Product Added": 15,
    "Email Opened": 15,
    "Checkout Started": 8,
    "Order Completed": 7,
    "identify": 5,
    "page": 5,
}


def definitions() -> SegmentFile:
    """The definitions above, checked as `waypost segments check` would."""
    parsed, problems = segment_file_from(yaml.safe_load(DEFINITIONS_FILE))
    problems += check_segments(parsed) if parsed is not None else []
    if parsed is None or problems:
        raise ValueError("; ".join(map(str, problems)))
    return parsed


def make_event(rng: random.Random, key: str, name: str, at: datetime) -> Event:
    """One storefront event of contact `key`, as ingest writes it."""
    fields: dict[str, Any] = {"type": "track", "event": name}
    if name in ("Product Viewed", "Product Added"):
        category = rng.choice(["shoes", "bags", "hats", "coats"])
        fields["properties"] = {"sku": f"SKU-{rng.randrange(2000):04d}", "category": category}
    elif name in ("Checkout Started", "Order Completed"):
        fields["properties"] = {"total": round(rng.uniform(10, 400), 2), "currency": "EUR"}
    elif name == "Email Opened":
        # Reported by the dispatcher (a Waypost source): the write key may not send it.
        fields["properties"] = {"campaign": f"spring-{rng.randrange(20)}"}
        fields["source"] = "waypost-dispatcher"
    elif name == "identify":
        traits = {
            "country": rng.choice(["DE", "FR", "BE", "GB"]),
            "plan": rng.choice(["free", "pro"]),
        }
        fields = {"type": "identify", "traits": traits}
    else:
        fields = {"type": "page", "name": rng.choice(["Home", "Pricing", "Sale"])}
    message_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    received = max(at, datetime.now(UTC))
    return Event(**fields, user_id=key, message_id=message_id, timestamp=at, received_at=received)


def storefront(rng: random.Random, count: int, contacts: int) -> list[tuple[str, bytes]]:
    """`count` events over `contacts` (a few much busier than most), up to 60 days old, most
    within the last week."""
    now = datetime.now(UTC)
    out = []
    for _ in range(count):
        key = f"c-{int(contacts * rng.random() ** 2):06d}"
        at = now - timedelta(seconds=min(rng.expovariate(1 / (5 * DAY)), 60 * DAY))
        name = rng.choices(list(MIX), list(MIX.values()))[0]
        out.append((key, make_event(rng, key, name, at).to_wire()))
    return out


def producer(bootstrap: str, **extra: Any) -> Producer:
    """Ingest's producer settings (idempotent, acks=all, linger.ms=2) unless overridden."""
    config = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 2,
        "queue.buffering.max.messages": 500_000,
    }
    return Producer({**config, **extra})


def preload(bootstrap: str, defs: SegmentFile, records: Sequence[tuple[str, bytes]]) -> None:
    """The definitions, as `waypost segments publish` writes them, then the events."""
    now = datetime.now(UTC)
    loader = producer(bootstrap, **{"linger.ms": 20})
    published: list[PublishedAggregate | PublishedSegment] = [
        *(PublishedAggregate(aggregate=a, published_at=now) for a in defs.aggregates),
        *(PublishedSegment(segment=s, published_at=now) for s in defs.segments),
    ]
    for record in published:
        loader.produce(DEFINITIONS.name, key=record.key, value=record.model_dump_json())
    progress = Progress("load", len(records), "events written")
    for n, (key, value) in enumerate(records):
        while True:
            try:
                loader.produce(EVENTS.name, value=value, key=key.encode())
                break
            except BufferError:
                loader.poll(0.05)
        loader.poll(0)
        progress.tick(n)
    if loader.flush(60) != 0:
        raise RuntimeError("events not acknowledged")
    progress.tick(len(records), force=True)


# -- 1 and 2: throughput -------------------------------------------------------------------------


def raw_read(bootstrap: str, partitions: int) -> float:
    """Seconds to read the events topic to its end, decoding every value into an `Event`."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "bench-segmenter-raw",
            "enable.auto.commit": False,
            "queued.min.messages": 1_000_000,
        }
    )
    try:
        ends = {
            p: consumer.get_watermark_offsets(Partition(EVENTS.name, p), 10)[1]
            for p in range(partitions)
        }
        pending = {p for p, end in ends.items() if end > 0}
        started, read = time.perf_counter(), 0
        consumer.assign([Partition(EVENTS.name, p, OFFSET_BEGINNING) for p in pending])
        progress = Progress("raw read", sum(ends.values()), "events decoded")
        while pending:
            for msg in consumer.consume(5000, 0.05):
                if msg.error() is not None:
                    raise RuntimeError(f"raw read failed: {msg.error()}")
                Event.model_validate_json(msg.value() or b"")
                read += 1
                if (msg.offset() or 0) + 1 >= ends[msg.partition() or 0]:
                    pending.discard(msg.partition() or 0)
            progress.tick(read)
        return time.perf_counter() - started
    finally:
        consumer.close()


@dataclass
class Throughput:
    startup: float  # process start to the first poll that saw a commit
    counted: int  # events committed after that poll
    seconds: float  # from that poll to the one that saw all committed
    total_seconds: float  # from process start
    cpu: dict[str, float]  # CPU seconds while counted


def run_segmenter(bench: stack.Stack, total: int, timeout: float) -> Throughput:
    """Start the worker on the loaded topic; follow its committed offsets to the end."""
    admin = AdminClient({"bootstrap.servers": bench.bootstrap})
    request = [
        ConsumerGroupTopicPartitions(
            GROUP, [Partition(EVENTS.name, p) for p in range(bench.partitions)]
        )
    ]
    started = time.perf_counter()
    bench.start_service("segmenter")
    meter = CpuMeter({name: bench.pid(name) for name in ("segmenter", "kafka", "ferretdb")})
    first: tuple[float, int, dict[str, float]] | None = None
    progress = Progress("segmenter", total, "events committed")
    while True:
        if bench.pid("segmenter") is None:
            raise RuntimeError("the segmenter exited")
        answer = admin.list_consumer_group_offsets(request)[GROUP].result(timeout=10)
        done, now = sum(max(tp.offset, 0) for tp in answer.topic_partitions), time.perf_counter()
        if first is None and done > 0:
            first = (now, done, meter.sample())
            say(f"  first commit seen {now - started:.1f}s after start, at {done} events")
        if done >= total:
            break
        if now - started > timeout:
            raise TimeoutError(f"{done}/{total} events committed after {timeout:.0f}s")
        progress.tick(done)
        time.sleep(0.2)
    assert first is not None
    cpu = meter.spent(first[2], meter.sample())
    return Throughput(first[0] - started, total - first[1], now - first[0], now - started, cpu)


# -- 3. latency ----------------------------------------------------------------------------------


class Arrivals:
    """Reads a topic from its end in a thread; notes when the first record per wanted key that
    `match`es arrived."""

    def __init__(
        self, bench: stack.Stack, topic: str, wanted: set[str], match: Callable[[bytes], bool]
    ) -> None:
        self.wanted, self.match = wanted, match
        self.first: dict[str, float] = {}
        self._consumer = Consumer(
            {
                "bootstrap.servers": bench.bootstrap,
                "group.id": "bench-segmenter",
                "enable.auto.commit": False,
            }
        )
        self._consumer.assign([Partition(topic, p, OFFSET_END) for p in range(bench.partitions)])
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            messages = self._consumer.consume(1000, 0.01)
            received = time.perf_counter()
            for msg in messages:
                key = (msg.key() or b"").decode()
                if key in self.wanted and key not in self.first and self.match(msg.value() or b""):
                    self.first[key] = received

    def stop(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.first) < len(self.wanted) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stopping.set()
        self._thread.join(10)
        self._consumer.close()


def any_record(_value: bytes) -> bool:
    return True


def entered(value: bytes) -> bool:
    """A `Segment Entered` for the latency segment (cheap test first: most records are not)."""
    if SEGMENT_ENTERED.encode() not in value:
        return False
    return any(
        event.event == SEGMENT_ENTERED and event.properties.get("segment") == LATENCY_SEGMENT
        for event in ContactEvent.model_validate_json(value).events
    )


def paced(
    bench: stack.Stack, topic: str, keys: Sequence[str], rate: float, arrivals: Arrivals
) -> tuple[list[float], int]:
    """One `Product Viewed` per key at `rate`/s; milliseconds from produce call to arrival
    (after the warm-up), and how many never arrived."""
    rng, sender = random.Random(f"{topic}-{rate}"), producer(bench.bootstrap)
    # Ready before the clock runs: topic metadata known, idempotent producer id acquired.
    sender.list_topics(topic, timeout=10)
    sender.produce(ROUND_TRIP, value=b"", key=b"warm-up")
    sender.flush(10)
    sent: dict[str, float] = {}
    start = time.perf_counter()
    for n, key in enumerate(keys):
        time.sleep(max(0.0, start + n / rate - time.perf_counter()))
        value = make_event(rng, key, "Product Viewed", datetime.now(UTC)).to_wire()
        sent[key] = time.perf_counter()
        sender.produce(topic, value=value, key=key.encode())
        sender.poll(0)
    sender.flush(30)
    arrivals.stop(timeout=60)
    counted = keys[int(rate * WARMUP_SECONDS) :]
    got = [(arrivals.first[k] - sent[k]) * 1000 for k in counted if k in arrivals.first]
    return got, len(counted) - len(got)


def latency_at(
    bench: stack.Stack, rate: float, keys: list[str]
) -> tuple[dict[str, list[float]], int]:
    """The raw round trip, then event to `Segment Entered`, for the same keys at one rate."""
    wanted = set(keys)
    to_topic = Arrivals(bench, ROUND_TRIP, wanted, any_record)
    raw, lost = paced(bench, ROUND_TRIP, keys, rate, to_topic)
    to_segment = Arrivals(bench, CONTACT_EVENTS.name, wanted, entered)
    segmenter, gone = paced(bench, EVENTS.name, keys, rate, to_segment)
    return {RAW: raw, SEGMENTER: segmenter}, lost + gone


# -- the run -------------------------------------------------------------------------------------


def start_kafka(bench: stack.Stack, docstore: bool) -> None:
    bench.down()  # a previous run that was killed may have left its processes behind
    shutil.rmtree(bench.home, ignore_errors=True)
    busy = [p for p in (PORTS.kafka, PORTS.kafka_controller, PORTS.mongo) if port_in_use(p)]
    if busy:
        raise RuntimeError(f"ports {busy} are already in use; the bench needs them free")
    stack.setup()
    say(f"starting Kafka on {bench.bootstrap} (state in {bench.home}) ...")
    bench.start_kafka()
    if docstore:
        bench.start_ferretdb()
        bench.wait_mongo()
    bench.wait_kafka()
    ensure_topics(bench.bootstrap, bench.partitions)
    admin = AdminClient({"bootstrap.servers": bench.bootstrap})
    admin.create_topics([NewTopic(ROUND_TRIP, bench.partitions, 1)])[ROUND_TRIP].result(30)


def times(value: float | None, base: float | None) -> str:
    return f"{value / base:.3g}" if value is not None and base else "-"


def report(
    events: int, raw_seconds: float, seg: Throughput, latency: dict[float, dict[str, list[float]]]
) -> None:
    say("throughput in events/s, against a raw consumer reading and decoding the same events")
    raw_rate = events / raw_seconds
    rows = [["path", "events", "seconds", "events/s", "vs raw"]]
    for name, count, seconds in (
        ("raw consumer + Event decode", events, raw_seconds),
        ("segmenter, from first commit", seg.counted, seg.seconds),
        ("segmenter, from process start", events, seg.total_seconds),
    ):
        rate = count / seconds
        rows.append([name, f"{count:,}", f"{seconds:.2f}", f"{rate:,.0f}", times(rate, raw_rate)])
    table(rows)
    busy = {k: v / seg.seconds for k, v in seg.cpu.items() if v and k != "machine"}
    other = max(0.0, seg.cpu["machine"] / seg.seconds - sum(busy.values()))
    say(
        f"worker start-up to the first commit seen: {seg.startup:.1f}s; cores busy while "
        f"counted: {', '.join(f'{k} {v:.2f}' for k, v in busy.items())}, other {other:.2f} "
        f"(of {os.cpu_count()})"
    )
    print(flush=True)
    say("latency in ms: produce call to the bench receiving the record")
    rows = [["rate/s", "path", "n", "p50", "p95", "p99", "max", "p50 vs raw", "p99 vs raw"]]
    for rate, paths in latency.items():
        raw = paths[RAW]
        for name, values in paths.items():
            p = [percentile(values, q) for q in (50, 95, 99, 100)]
            cells = [f"{v:.1f}" if v is not None else "-" for v in p]
            ratios = [times(p[0], percentile(raw, 50)), times(p[2], percentile(raw, 99))]
            rows.append([f"{rate:g}", name, str(len(values)), *cells, *ratios])
    table(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=40_000, help="events pre-loaded (N)")
    parser.add_argument("--contacts", type=int, default=3_000, help="storefront contacts (M)")
    parser.add_argument("--rate", type=float, nargs="+", default=[200.0], help="latency: events/s")
    parser.add_argument("--seconds", type=float, default=20.0, help="latency: seconds per rate")
    parser.add_argument("--partitions", type=int, default=6, help="partitions per topic")
    parser.add_argument("--docstore", action="store_true", help="run FerretDB (profile view)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for phase 2")
    parser.add_argument("--seed", type=int, default=7, help="seed of the event generator")
    args = parser.parse_args(argv)
    span = args.seconds + WARMUP_SECONDS
    keys = {r: [f"lat{r:g}-{n:06d}" for n in range(int(r * span))] for r in args.rate}
    primed = 2 * sum(map(len, keys.values()))
    if args.events <= primed or args.contacts < 1 or min(args.rate) <= 0:
        parser.error(f"--events must exceed {primed} (2 per latency contact)")
    defs = definitions()
    say(
        f"{args.events:,} events: {args.events - primed:,} for {args.contacts:,} contacts, "
        f"{primed:,} priming {primed // 2:,} latency contacts; {len(defs.aggregates)} "
        f"aggregates, {len(defs.segments)} segments; {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    rng, now = random.Random(args.seed), datetime.now(UTC)
    records = [
        (k, make_event(rng, k, "Product Viewed", now).to_wire())
        for ks in keys.values()
        for k in ks
        for _ in range(2)
    ]
    records += storefront(rng, args.events - primed, args.contacts)
    rng.shuffle(records)

    bench = stack.Stack(home=HOME, ports=PORTS, partitions=args.partitions)
    # A SIGTERM ends the run like Ctrl-C does: through the finally below, which stops the stack.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    latency: dict[float, dict[str, list[float]]] = {}
    missing = 0
    try:
        start_kafka(bench, args.docstore)
        preload(bench.bootstrap, defs, records)
        say(f"1/3: raw consumer reading and decoding the events (baseline), {RAW_BEFORE} reads")
        raw_reads = [raw_read(bench.bootstrap, args.partitions) for _ in range(RAW_BEFORE)]
        say(f"2/3: one segmenter worker on the {args.events:,} events")
        seg = run_segmenter(bench, args.events, args.timeout)
        say(f"   raw consumer again, {RAW_AFTER} reads (baseline)")
        raw_reads += [raw_read(bench.bootstrap, args.partitions) for _ in range(RAW_AFTER)]
        raw_seconds = statistics.median(raw_reads)
        for rate in args.rate:
            say(f"3/3: latency at {rate:g}/s for {span:g}s: raw round trip, then the segmenter")
            latency[rate], lost = latency_at(bench, rate, keys[rate])
            missing += lost
    except BaseException:
        say(f"aborted; last lines of the segmenter log:\n{log_tail(bench.logfile('segmenter'))}")
        raise
    finally:
        say("stopping the bench stack")
        bench.down()
    print(flush=True)
    report(args.events, raw_seconds, seg, latency)
    say(
        "raw consumer reads (s, the median is the baseline): "
        + ", ".join(f"{seconds:.2f}" for seconds in raw_reads)
    )
    if missing:
        say(f"MISSING: {missing} latency records never arrived")
    segmenter_rate, raw_rate = seg.counted / seg.seconds, args.events / raw_seconds
    first = latency[args.rate[0]][SEGMENTER] if args.rate else []
    p99 = percentile(first, 99) if first else None
    print(
        f"RESULT segmenter_events_per_s={segmenter_rate:.1f} "
        f"raw_consumer_events_per_s={raw_rate:.1f} ratio={segmenter_rate / raw_rate:.5f} "
        f"p99_entered_ms={p99 if p99 is not None else -1:.1f} latency_rate={args.rate[0]:g}",
        flush=True,
    )
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
