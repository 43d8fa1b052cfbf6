"""Ingest throughput benchmark: what the HTTP API costs on top of writing to Kafka directly.

`.venv/bin/python -m bench.ingest [--events N] [--seconds S] [--concurrency C]` starts its own
throw-away stack (Kafka and the ingest service only, on ports 29092/29093 and 28000, state in
`.local/bench-stack`, wiped at the start and stopped at the end) and runs four phases, each
writing fresh events to `waypost.events.v1` (`track` events of the same shape, keyed by userId,
in the first three):

1. raw producer: confluent-kafka with ingest's own producer settings
   (`services.ingest.adapters.publisher.producer_config`: idempotent, acks=all, the same linger),
   producing N records ingest would write, timed until every delivery report arrived. This is
   the ceiling and the baseline of every ratio: the broker and client library, with no HTTP.
2. ingest single: one `POST /v1/track` per event over HTTP/1.1 keep-alive, C requests in flight,
   for S seconds, driven by `wrk` (Debian package; the bench installs it with apt-get when it is
   missing and it runs as root) with a Lua script that POSTs pre-generated JSON bodies. wrk is
   C and uses a fraction of a core, so it measures ingest rather than itself. Without wrk the
   bench says so and falls back to the Python load generator (httpx, one client and connection
   per request slot), which spends about a core of its own at a few thousand requests/s and so
   understates ingest. `--load-generator python` forces the fallback.
3. ingest batch: `POST /v1/batch` with 100 events per request, C requests in flight, for S
   seconds, by wrk going round the N events' batch bodies. Without wrk, N events with the Python
   load generator, which spends about half a core of its own at 50,000 events/s (0.4 to 0.5 of
   a core measured on 2026-12-07), so the batch figure then understates ingest.
4. ingest callbacks: SMS status callbacks ("delivered", form-encoded), one per request, as a
   Twilio-style provider posts them: each with the link token the dispatcher puts in its
   StatusCallback URL and a valid `X-Twilio-Signature`, C in flight for S seconds, by wrk
   (skipped without it). Each publishes one `Message Delivered`.

Each phase first sends a small untimed warm-up (connections, topic metadata). An ingest answer
is a 200 only after Kafka acknowledged every event in it, so events/s is acknowledged throughput;
latency is per request (per batch request in phase 3). A second table shows how many cores the
load generator (this process and wrk), ingest (all its worker processes), Kafka and everything
else on the machine kept busy during each timed phase.

How to read "vs raw": events/s of the phase divided by events/s of the raw producer in the same
run. The raw producer pipelines without limit while HTTP clients wait for each answer (at most C
requests in flight), and the load generator, the ingest workers and the broker share the same
cores, so the ratio is a relative measure for this machine, not a capacity figure.

The run ends by checking the topic's record count (sum of high minus low watermarks) against the
events acknowledged in all phases, warm-ups included. wrk stops on a deadline with up to C
requests unanswered, whose events may or may not have been written, so the count may exceed the
acknowledged events by at most C per wrk run. Any non-200 answer (a callback answers 204),
transport error or failed delivery is counted and printed, and makes the exit status non-zero.
The last line is `RESULT name=value ...` with the figures, for comparing runs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
from confluent_kafka import KafkaError, Message, Producer

from services.ingest.adapters.publisher import producer_config
from services.ingest.domain.calls import Call, encode_call
from services.ingest.settings import DEV_WRITE_KEY, IngestSettings
from shared.kafka import ensure_topics, topic_record_count
from shared.links import LinkClaims, LinkSigner, twilio_signature
from shared.topics import EVENTS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy" / "local"))

import stack  # noqa: E402  (a script, not a package: importable once its folder is on the path)

SMS_AUTH_TOKEN = stack.SANDBOX_SMS_AUTH_TOKEN

HOME = ROOT / ".local" / "bench-stack"
PORTS = stack.Ports(
    kafka=29092,
    kafka_controller=29093,
    mongo=27117,
    smtp=21025,
    outbox=28025,
    ingest=28000,
    admin=28001,
    kafka_sasl=29094,
)
BATCH_SIZE = 100
USERS = 10_000
SOURCE = "dev"  # the source ingest maps the dev write key to
PROGRESS_EVERY = 2.0  # seconds between progress lines
WRK_WARMUP_SECONDS = 1
# Distinct /v1/track bodies wrk cycles through (its runs are timed, not counted).
WRK_BODIES = 20_000


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


# -- the events ----------------------------------------------------------------------------------


def make_call(rng: random.Random, index: int) -> dict[str, Any]:
    """One Segment-style track call, as an SDK would send it (the batch item form)."""
    quantity = rng.randint(1, 3)
    price = round(rng.uniform(5, 200), 2)
    return {
        "type": "track",
        "userId": f"user-{rng.randrange(USERS):05d}",
        "event": "Order Completed",
        "messageId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "timestamp": datetime.now(UTC).isoformat(),
        "properties": {
            "orderId": f"ord-{index:09d}",
            "revenue": round(price * quantity, 2),
            "currency": "EUR",
            "products": [
                {"sku": f"SKU-{rng.randrange(10_000):04d}", "price": price, "quantity": quantity}
            ],
            "coupon": rng.choice([None, "WELCOME10", "SPRING"]),
        },
        "context": {
            "library": {"name": "waypost-bench", "version": "1.0"},
            "ip": "203.0.113.7",
            "locale": "en-GB",
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/124.0",
        },
    }


def wire_record(call: dict[str, Any]) -> tuple[str, bytes]:
    """The (key, value) ingest writes for this call: the normalised wire `Event`."""
    encoded = encode_call(
        Call.model_validate(call),
        message_id=str(call["messageId"]),
        received_at=datetime.now(UTC),
        source=SOURCE,
    )
    return encoded.key, encoded.value


def dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def single_bodies(calls: Sequence[dict[str, Any]]) -> list[tuple[bytes, int]]:
    """`/v1/track` bodies (the route sets the type), each carrying one event."""
    return [(dumps({k: v for k, v in call.items() if k != "type"}), 1) for call in calls]


def batch_bodies(calls: Sequence[dict[str, Any]]) -> list[tuple[bytes, int]]:
    """`/v1/batch` bodies of up to BATCH_SIZE events, with their event counts."""
    bodies = []
    for start in range(0, len(calls), BATCH_SIZE):
        chunk = list(calls[start : start + BATCH_SIZE])
        bodies.append((dumps({"batch": chunk}), len(chunk)))
    return bodies


# -- results -------------------------------------------------------------------------------------


@dataclass
class PhaseResult:
    """One timed phase. `acked` counts events the broker (or ingest's 200) confirmed."""

    name: str
    events: int
    seconds: float = 0.0
    acked: int = 0
    warmup_acked: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    # Percentiles reported by an external load generator (wrk keeps no per-request list).
    reported_ms: dict[float, float] = field(default_factory=dict)
    failures: Counter[str] = field(default_factory=Counter)
    cpu: dict[str, float] = field(default_factory=dict)
    # Requests the load generator left unanswered when it stopped (their events may be written).
    unanswered_max: int = 0

    @property
    def rate(self) -> float:
        return self.acked / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, p: float) -> float | None:
        """Nearest-rank percentile of the request latencies, None when there are none."""
        if p in self.reported_ms:
            return self.reported_ms[p]
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


class Progress:
    """Prints `done/total` and the rate so far at most every PROGRESS_EVERY seconds."""

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = total
        self.started = time.perf_counter()
        self.last = self.started

    def tick(self, done: int, *, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < PROGRESS_EVERY:
            return
        self.last = now
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        say(f"  {self.label}: {done}/{self.total} events acknowledged, {rate:,.0f} events/s")


class CpuMeter:
    """CPU seconds used by process trees (the bench with its wrk, ingest with its workers,
    Kafka) and by the whole machine.

    Read from /proc, so a phase can show who was busy: the load generator shares the cores with
    the system under test, and other work on the machine shows up as "other". A tree's time is
    each live process's own plus what it collected from children it reaped, so a finished wrk
    run counts with the bench and nothing counts twice.
    """

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, roots: dict[str, int | None]) -> None:
        self.roots = roots

    @staticmethod
    def _stat(pid: int) -> list[str] | None:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                return stat.read().rpartition(")")[2].split()
        except OSError:
            return None

    def _tree(self, root: int | None, parents: dict[int, int]) -> float:
        """The root and its descendants, less the other roots' trees (the bench starts the
        servers it measures, so their processes are its descendants too)."""
        if root is None:
            return 0.0
        others = {pid for pid in self.roots.values() if pid is not None and pid != root}
        members = {root}
        grew = True
        while grew:
            grew = False
            for pid, parent in parents.items():
                if parent in members and pid not in members and pid not in others:
                    members.add(pid)
                    grew = True
        total = 0
        for pid in members:
            fields = self._stat(pid)
            if fields is not None:  # utime, stime, cutime, cstime
                total += sum(int(v) for v in fields[11:15])
        return total / self.TICK

    def _machine(self) -> float:
        try:
            with open("/proc/stat") as stat:
                ticks = [int(v) for v in stat.readline().split()[1:]]
        except OSError:
            return 0.0
        return (sum(ticks[:8]) - ticks[3] - ticks[4]) / self.TICK  # all but idle and iowait

    def sample(self) -> dict[str, float]:
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                fields = self._stat(int(entry))
                if fields is not None:
                    parents[int(entry)] = int(fields[1])
        spent = {name: self._tree(pid, parents) for name, pid in self.roots.items()}
        return {**spent, "machine": self._machine()}

    @staticmethod
    def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {name: after[name] - before[name] for name in before}


# -- phase 1: the raw producer -------------------------------------------------------------------


def run_raw(
    bootstrap: str,
    linger_ms: float,
    warmup: Sequence[tuple[str, bytes]],
    records: Sequence[tuple[str, bytes]],
    meter: CpuMeter,
) -> PhaseResult:
    """Produce with ingest's producer settings; time until every delivery report arrived."""
    result = PhaseResult("raw producer", len(records))
    producer = Producer(producer_config(bootstrap, "bench-raw", linger_ms))
    delivered = 0

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        nonlocal delivered
        if err is None:
            delivered += 1
        else:
            result.failures[f"delivery failed: {err}"] += 1

    def produce_all(batch: Sequence[tuple[str, bytes]], progress: Progress | None) -> None:
        for key, value in batch:
            while True:
                try:
                    producer.produce(
                        EVENTS.name, value=value, key=key.encode(), on_delivery=on_delivery
                    )
                    break
                except BufferError:  # local queue full: serve delivery reports, then retry
                    producer.poll(0.05)
            producer.poll(0)
            if progress is not None:
                progress.tick(delivered)
        while producer.flush(1.0) > 0:
            if progress is not None:
                progress.tick(delivered)

    produce_all(warmup, None)
    result.warmup_acked, delivered = delivered, 0
    progress = Progress(result.name, len(records))
    cpu = meter.sample()
    started = time.perf_counter()
    produce_all(records, progress)
    result.seconds = time.perf_counter() - started
    result.cpu = meter.spent(cpu, meter.sample())
    result.acked = delivered
    progress.tick(delivered, force=True)
    return result


# -- phase 2: single calls driven by wrk ---------------------------------------------------------

# The parts both wrk scripts share: each thread starts from its own offset in the request file
# (the script's first argument) and goes round it; one `WRK {json}` line is printed at the end.
WRK_SETUP = """
local requests, count, position = {}, 0, 0
local threads, started = {}, 0

function setup(thread)
  thread:set("offset", started)
  started = started + 1
  table.insert(threads, thread)
end
"""
WRK_DONE = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests":%d,"duration_us":%d,"status":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"timeout":%d,"p50_us":%d,"p95_us":%d,"p99_us":%d,"max_us":%d}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
"""

# Phases 2 and 3: POSTs the bodies of the file (one JSON body a line) to the path given as the
# script's third argument (/v1/track or /v1/batch).
WRK_SCRIPT = (
    WRK_SETUP
    + """
function init(args)
  for line in io.lines(args[1]) do
    count = count + 1
    requests[count] = line
  end
  position = (offset * 7919) % count
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = args[2]
  wrk.path = args[3]
end

function request()
  position = position % count + 1
  return wrk.format(nil, nil, nil, requests[position])
end
"""
    + WRK_DONE
)

# Phase 4: one signed SMS status callback per request, as a provider posts them. Each line of
# the request file is "path<TAB>X-Twilio-Signature<TAB>form body".
WRK_CALLBACK_SCRIPT = (
    WRK_SETUP
    + """
function init(args)
  for line in io.lines(args[1]) do
    local path, signature, body = line:match("^([^\\t]+)\\t([^\\t]+)\\t(.*)$")
    count = count + 1
    requests[count] = wrk.format("POST", path, {
      ["Content-Type"] = "application/x-www-form-urlencoded",
      ["X-Twilio-Signature"] = signature,
      ["User-Agent"] = "TwilioProxy/1.1",
    }, body)
  end
  position = (offset * 7919) % count
end

function request()
  position = position % count + 1
  return requests[position]
end
"""
    + WRK_DONE
)


def callback_requests(settings: IngestSettings, public_url: str, n: int) -> list[str]:
    """`n` status callbacks ("delivered") for distinct messages, each with the link token the
    dispatcher would have put in the message's StatusCallback URL and the signature the provider
    would compute over that URL and the form (shared.links)."""
    signer = LinkSigner(settings.link_secret.get_secret_value(), public_url)
    run = uuid.uuid4().hex[:8]
    issued = int(time.time())
    lines = []
    for index in range(n):
        claims = LinkClaims(
            kind="sms_status",
            message_id=f"bench-{run}-{index}",
            contact_key=f"user-{index % USERS}",
            is_user=True,
            channel="sms",
            template_id="bench-sms",
            issued_at=issued,
        )
        path = f"/v1/sms/status/{signer.token(claims)}"
        sid = f"SM{uuid.uuid4().hex}"
        params = {
            "AccountSid": "ACbench",
            "ApiVersion": "2010-04-01",
            "From": "+15005550006",
            "MessageSid": sid,
            "MessageStatus": "delivered",
            "SmsSid": sid,
            "SmsStatus": "delivered",
            "To": f"+1555{index % 10_000_000:07d}",
        }
        signature = twilio_signature(public_url + path, params, SMS_AUTH_TOKEN)
        lines.append(f"{path}\t{signature}\t{urlencode(params)}")
    return lines


def find_wrk() -> str | None:
    """wrk's path; installs the Debian package when it is missing and we may (root, apt-get)."""
    path = shutil.which("wrk")
    if path is not None:
        return path
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        say("wrk is not installed, and installing it needs root and apt-get")
        return None
    say("wrk is not installed: installing the Debian package with apt-get ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def apt_get(*command: str) -> bool:
        done = subprocess.run(
            ["apt-get", *command], env=env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            say(f"  apt-get {' '.join(command)} failed: {done.stderr.strip()[-300:]}")
        return done.returncode == 0

    # A fresh machine may have no package lists yet: update them once and try again.
    if not apt_get("install", "-y", "-q", "wrk") and apt_get("update", "-q"):
        apt_get("install", "-y", "-q", "wrk")
    return shutil.which("wrk")


class Wrk:
    """Runs wrk with one of its Lua scripts and the request file it reads, C connections, one
    thread: `Wrk.tracking` POSTs /v1/track bodies, `Wrk.callbacks` SMS status callbacks."""

    def __init__(
        self,
        wrk: str,
        url: str,
        script: str,
        name: str,
        lines: bytes,
        concurrency: int,
        *extra: str,
        events_per_request: int = 1,
    ) -> None:
        HOME.mkdir(parents=True, exist_ok=True)
        self.script = HOME / f"{name}.lua"
        self.script.write_text(script)
        self.body_file = HOME / f"{name}-requests.txt"
        self.body_file.write_bytes(lines)
        self.argv = [wrk, "-t1", f"-c{concurrency}", "--timeout", "30s", "-s", str(self.script)]
        self.args = [url, "--", str(self.body_file), *extra]
        self.concurrency = concurrency
        self.events_per_request = events_per_request

    @classmethod
    def tracking(
        cls,
        wrk: str,
        url: str,
        bodies: Sequence[tuple[bytes, int]],
        concurrency: int,
        path: str = "/v1/track",
    ) -> Wrk:
        """wrk posting `bodies` to `path`; every body must carry the same number of events."""
        counts = {count for _body, count in bodies}
        if len(counts) != 1:
            raise ValueError(f"wrk's bodies must carry one number of events, not {counts}")
        lines = b"\n".join(body for body, _count in bodies) + b"\n"
        authorization = "Basic " + base64.b64encode(f"{DEV_WRITE_KEY}:".encode()).decode()
        name = path.rsplit("/", 1)[-1]
        return cls(
            wrk,
            url,
            WRK_SCRIPT,
            name,
            lines,
            concurrency,
            authorization,
            path,
            events_per_request=counts.pop(),
        )

    @classmethod
    def callbacks(cls, wrk: str, url: str, lines: Sequence[str], concurrency: int) -> Wrk:
        """wrk posting the SMS status callbacks of `callback_requests`."""
        data = ("\n".join(lines) + "\n").encode()
        return cls(wrk, url, WRK_CALLBACK_SCRIPT, "callbacks", data, concurrency)

    def run(self, seconds: int) -> dict[str, int]:
        """wrk's report: requests, duration_us, error counts and latency percentiles (µs)."""
        argv = [*self.argv, f"-d{seconds}s", *self.args]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        for line in done.stdout.splitlines():
            if line.startswith("WRK "):
                report: dict[str, int] = json.loads(line[4:])
                return report
        raise RuntimeError(f"wrk gave no report (exit {done.returncode}): {done.stderr[-500:]}")

    def acknowledged(self, report: dict[str, int], into: PhaseResult) -> int:
        """Events of the requests answered 200; errors are recorded as failures of `into`."""
        for kind in ("status", "connect", "read", "write", "timeout"):
            if report[kind]:
                label = "non-2xx/3xx answers" if kind == "status" else f"{kind} errors"
                into.failures[f"wrk: {label}"] += report[kind]
        into.unanswered_max += self.concurrency * self.events_per_request
        return (report["requests"] - report["status"]) * self.events_per_request


def run_wrk(wrk: Wrk, seconds: int, meter: CpuMeter, name: str = "ingest single") -> PhaseResult:
    """wrk's requests (POST /v1/track or /v1/batch, or callbacks) for a warm-up second, then
    `seconds` timed."""
    result = PhaseResult(name, 0)
    result.warmup_acked = wrk.acknowledged(wrk.run(WRK_WARMUP_SECONDS), result)
    cpu = meter.sample()
    report = wrk.run(seconds)
    result.cpu = meter.spent(cpu, meter.sample())
    result.seconds = report["duration_us"] / 1e6
    result.acked = wrk.acknowledged(report, result)
    result.events = result.acked
    result.reported_ms = {p: report[f"p{p}_us"] / 1000 for p in (50, 95, 99)}
    say(f"  {name}: {result.acked} events acknowledged in {result.seconds:.1f}s")
    return result


# -- phase 3, and phase 2 without wrk: ingest over HTTP with httpx ------------------------------


async def run_http(
    name: str,
    url: str,
    path: str,
    warmup: Sequence[tuple[bytes, int]],
    bodies: Sequence[tuple[bytes, int]],
    concurrency: int,
    meter: CpuMeter,
    *,
    shared_pool: bool = False,
) -> PhaseResult:
    """POST every body with `concurrency` requests in flight over keep-alive connections."""
    result = PhaseResult(name, sum(count for _body, count in bodies))

    # One client per worker, one keep-alive connection each, unless --shared-pool: httpx's pool
    # re-checks every connection on each request (encode/httpx#3215), so one client with C
    # connections spends more CPU than the ingest service and measures the load generator.
    def client(connections: int) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=url,
            auth=httpx.BasicAuth(DEV_WRITE_KEY, ""),
            headers={"content-type": "application/json"},
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            timeout=httpx.Timeout(60.0),
        )

    clients = [client(concurrency)] if shared_pool else [client(1) for _ in range(concurrency)]

    async def send_all(batch: Sequence[tuple[bytes, int]], timed: bool) -> int:
        acked = 0
        pending = iter(range(len(batch)))  # shared by the workers: each index is taken once

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal acked
            for index in pending:
                body, count = batch[index]
                started = time.perf_counter()
                try:
                    answer = await client.post(path, content=body)
                except httpx.HTTPError as exc:
                    result.failures[f"{type(exc).__name__}: {exc}"] += 1
                    continue
                if timed:
                    result.latencies_ms.append((time.perf_counter() - started) * 1000)
                if answer.status_code == 200:
                    acked += count
                else:
                    result.failures[f"HTTP {answer.status_code}: {answer.text[:200]}"] += 1

        async def report(progress: Progress) -> None:
            while True:
                await asyncio.sleep(PROGRESS_EVERY)
                progress.tick(acked, force=True)

        reporter = None
        if timed:
            reporter = asyncio.create_task(report(Progress(name, result.events)))
        try:
            await asyncio.gather(*(worker(clients[i % len(clients)]) for i in range(concurrency)))
        finally:
            if reporter is not None:
                reporter.cancel()
        return acked

    try:
        result.warmup_acked = await send_all(warmup, timed=False)
        cpu = meter.sample()
        started = time.perf_counter()
        result.acked = await send_all(bodies, timed=True)
        result.seconds = time.perf_counter() - started
        result.cpu = meter.spent(cpu, meter.sample())
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    say(f"  {name}: {result.acked}/{result.events} events acknowledged in {result.seconds:.1f}s")
    return result


# -- the stack -----------------------------------------------------------------------------------


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def start_stack(bench: stack.Stack) -> None:
    """Kafka and ingest only, on the bench ports, from an empty state folder."""
    bench.down()  # a previous run that was killed may have left its processes behind
    shutil.rmtree(bench.home, ignore_errors=True)
    busy = [p for p in (PORTS.kafka, PORTS.kafka_controller, PORTS.ingest) if port_in_use(p)]
    if busy:
        raise RuntimeError(f"ports {busy} are already in use; the bench needs them free")
    stack.setup()
    say(f"starting Kafka on {bench.bootstrap} (state in {bench.home}) ...")
    bench.start_kafka()
    bench.wait_kafka()
    created = ensure_topics(bench.bootstrap, bench.partitions)
    say(f"topics ready ({len(created)} created, {bench.partitions} partitions)")
    say(f"starting ingest on {bench.ingest_url} ...")
    bench.start_service("ingest")
    bench.wait_service("ingest")
    say("stack ready")


# -- the report ----------------------------------------------------------------------------------


def print_table(results: Sequence[PhaseResult]) -> None:
    base = results[0].rate if results and results[0].rate > 0 else None
    header = ("phase", "events", "seconds", "events/s", "vs raw", "p50 ms", "p95 ms", "p99 ms")
    rows = [header]
    for r in results:
        ratio = f"{r.rate / base:.3f}" if base else "-"
        pcts = [r.percentile(p) for p in (50, 95, 99)]
        rows.append(
            (
                r.name,
                f"{r.acked}" if r.acked == r.events else f"{r.acked}/{r.events}",
                f"{r.seconds:.2f}",
                f"{r.rate:,.0f}",
                ratio,
                *(f"{v:.1f}" if v is not None else "-" for v in pcts),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
        print("  ".join(cells), flush=True)
        if n == 0:
            print("  ".join("-" * w for w in widths), flush=True)


def print_cpu(results: Sequence[PhaseResult]) -> None:
    """Who used the cores during each timed phase, in CPU seconds per wall second."""
    cores = os.cpu_count() or 1
    say(f"CPU during each timed phase, in cores busy on average ({cores} cores on this machine):")
    header = ("phase", "bench", "ingest", "kafka", "other", "idle", "ingest µs/event")
    rows = [header]
    for r in results:
        if r.seconds <= 0 or not r.cpu:
            continue
        ours = r.cpu["bench"] + r.cpu["ingest"] + r.cpu["kafka"]
        other = max(0.0, r.cpu["machine"] - ours)
        idle = max(0.0, cores * r.seconds - r.cpu["machine"])
        values = (r.cpu["bench"], r.cpu["ingest"], r.cpu["kafka"], other, idle)
        measured = r.acked and r.name.startswith("ingest")
        per_event = f"{r.cpu['ingest'] / r.acked * 1e6:.0f}" if measured else "-"
        rows.append((r.name, *(f"{v / r.seconds:.2f}" for v in values), per_event))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)]
        print("  ".join(cells), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    defaults = IngestSettings()
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--events",
        type=int,
        default=200_000,
        help="events of the raw phase, and the batch bodies the batch phase goes round",
    )
    parser.add_argument(
        "--seconds",
        type=int,
        default=10,
        help="duration of each phase wrk drives (single calls, batches, callbacks)",
    )
    parser.add_argument("--concurrency", type=int, default=32, help="HTTP requests in flight")
    parser.add_argument("--warmup", type=int, default=500, help="untimed events per phase")
    parser.add_argument(
        "--warmup-seconds",
        type=int,
        default=10,
        help="untimed single calls before the first phase, so the broker's JIT has settled",
    )
    parser.add_argument("--partitions", type=int, default=6, help="partitions per topic")
    parser.add_argument(
        "--workers",
        type=int,
        default=defaults.ingest_workers,
        help="ingest worker processes (WAYPOST_INGEST_WORKERS; 0: one per core)",
    )
    parser.add_argument(
        "--linger-ms",
        type=float,
        default=defaults.ingest_linger_ms,
        help="producer linger of ingest and of the raw producer (WAYPOST_INGEST_LINGER_MS)",
    )
    parser.add_argument(
        "--load-generator",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="single calls with wrk (installed when missing), or the Python client",
    )
    parser.add_argument(
        "--shared-pool",
        action="store_true",
        help="one httpx client with C pooled connections instead of one client per request "
        "slot (shows the httpx pool overhead, encode/httpx#3215)",
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the event generator")
    args = parser.parse_args(argv)
    if args.events < 1 or args.concurrency < 1 or args.seconds < 1:
        parser.error("--events, --seconds and --concurrency must be positive")
    if args.warmup < 0 or args.warmup_seconds < 0:
        parser.error("--warmup and --warmup-seconds must not be negative")

    wrk_path = None if args.load_generator == "python" else find_wrk()
    if wrk_path is None and args.load_generator == "wrk":
        parser.error("wrk is not installed and could not be installed")
    if wrk_path is None:
        say(
            "NOTE: single calls use the Python load generator, which spends about a core of "
            "its own at a few thousand requests/s: the single-call figures understate ingest"
        )

    rng = random.Random(args.seed)
    counter = iter(range(10**9))

    def calls(n: int) -> list[dict[str, Any]]:
        return [make_call(rng, next(counter)) for _ in range(n)]

    settings = IngestSettings(ingest_workers=args.workers)
    say(
        f"{args.events} events per counted phase, single calls for {args.seconds}s "
        f"({'wrk' if wrk_path else 'Python client'}), concurrency {args.concurrency}, warm-up "
        f"{args.warmup}, {settings.worker_count()} ingest workers, linger {args.linger_ms} ms, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}"
    )
    raw_warmup = [wire_record(c) for c in calls(args.warmup)]
    raw_records = [wire_record(c) for c in calls(args.events)]
    single_warmup = single_bodies(calls(args.warmup))
    single = single_bodies(calls(WRK_BODIES if wrk_path else args.events))
    batch_warmup, batches = batch_bodies(calls(args.warmup)), batch_bodies(calls(args.events))
    say(
        f"record value {len(raw_records[0][1])} bytes on the topic, /v1/track body "
        f"{len(single[0][0])} bytes, /v1/batch body {len(batches[0][0]):,} bytes"
    )

    bench = stack.Stack(
        home=HOME,
        ports=PORTS,
        partitions=args.partitions,
        extra_env={
            "WAYPOST_INGEST_WORKERS": str(args.workers),
            "WAYPOST_INGEST_LINGER_MS": str(args.linger_ms),
        },
    )
    results: list[PhaseResult] = []
    warm = PhaseResult("warm-up", 0)
    try:
        start_stack(bench)
        meter = CpuMeter(
            {"bench": os.getpid(), "ingest": bench.pid("ingest"), "kafka": bench.pid("kafka")}
        )
        wrk = (
            Wrk.tracking(wrk_path, bench.ingest_url, single, args.concurrency) if wrk_path else None
        )
        # A fresh broker spends its first half minute compiling its hot paths (the JIT): its
        # CPU per request falls by three to four times. Every phase should meet a warm one.
        say(f"warm-up: single calls for {args.warmup_seconds}s, untimed (broker JIT, workers)")
        if args.warmup_seconds == 0:
            pass
        elif wrk is not None:
            warm.acked = wrk.acknowledged(wrk.run(args.warmup_seconds), warm)
        else:
            warm_calls = single_bodies(calls(200 * args.warmup_seconds))
            warm.acked = asyncio.run(
                run_http(
                    "warm-up",
                    bench.ingest_url,
                    "/v1/track",
                    [],
                    warm_calls,
                    args.concurrency,
                    meter,
                )
            ).acked
        say("phase 1/4: raw producer")
        results.append(run_raw(bench.bootstrap, args.linger_ms, raw_warmup, raw_records, meter))
        say(f"phase 2/4: ingest single, POST /v1/track, {args.concurrency} in flight")
        if wrk is not None:
            results.append(run_wrk(wrk, args.seconds, meter))
        else:
            results.append(
                asyncio.run(
                    run_http(
                        "ingest single",
                        bench.ingest_url,
                        "/v1/track",
                        single_warmup,
                        single,
                        args.concurrency,
                        meter,
                        shared_pool=args.shared_pool,
                    )
                )
            )
        say(
            f"phase 3/4: ingest batch, POST /v1/batch x{BATCH_SIZE} events, "
            f"{args.concurrency} in flight"
        )
        whole = [body for body in batches if body[1] == BATCH_SIZE]
        if wrk_path is not None and whole:
            batch_wrk = Wrk.tracking(
                wrk_path, bench.ingest_url, whole, args.concurrency, path="/v1/batch"
            )
            results.append(run_wrk(batch_wrk, args.seconds, meter, "ingest batch"))
        else:
            results.append(
                asyncio.run(
                    run_http(
                        "ingest batch",
                        bench.ingest_url,
                        "/v1/batch",
                        batch_warmup,
                        batches,
                        args.concurrency,
                        meter,
                        shared_pool=args.shared_pool,
                    )
                )
            )
        if wrk_path is not None:
            say(
                f"phase 4/4: ingest SMS status callbacks, one signed form POST each, "
                f"{args.concurrency} in flight"
            )
            callbacks = callback_requests(settings, bench.ingest_url, WRK_BODIES)
            results.append(
                run_wrk(
                    Wrk.callbacks(wrk_path, bench.ingest_url, callbacks, args.concurrency),
                    args.seconds,
                    meter,
                    "ingest callbacks",
                )
            )
        else:
            say("phase 4/4: SMS status callbacks skipped: they are posted by wrk only")
        retained = topic_record_count(bench.bootstrap, EVENTS.name)
    except BaseException:
        say(f"aborted; last lines of the ingest log:\n{log_tail(bench.logfile('ingest'))}")
        raise
    finally:
        say("stopping the bench stack")
        bench.stop("ingest")
        bench.stop("kafka")

    print(flush=True)
    print_table(results)
    print(flush=True)
    print_cpu(results)
    print(flush=True)

    status = 0
    for r in (warm, *results):
        total = sum(r.failures.values())
        if total:
            status = 1
            say(f"FAILURES in {r.name}: {total}")
            for message, count in r.failures.most_common(20):
                say(f"  {count} x {message}")
    if status:
        say(f"last lines of the ingest log:\n{log_tail(bench.logfile('ingest'))}")
    else:
        say("failures: none (every HTTP answer was 200, every delivery report succeeded)")

    acknowledged = sum(r.acked + r.warmup_acked for r in (warm, *results))
    unanswered = sum(r.unanswered_max for r in (warm, *results))
    detail = " + ".join(f"{r.name} {r.warmup_acked}+{r.acked}" for r in (warm, *results))
    consistent = acknowledged <= retained <= acknowledged + unanswered
    leeway = f" (+ up to {unanswered} requests wrk left unanswered)" if unanswered else ""
    say(
        f"topic check {'OK' if consistent else 'MISMATCH'}: {EVENTS.name} holds {retained} "
        f"records; acknowledged {acknowledged}{leeway} (warm-up+timed: {detail})"
    )
    if not consistent:
        status = 1

    raw, single_phase, batch_phase = results[:3]
    callback_phase = results[3] if len(results) > 3 else None
    p99 = single_phase.percentile(99)
    figures = {
        "single_req_per_s": f"{single_phase.rate:.0f}",
        "single_p99_ms": f"{p99:.1f}" if p99 is not None else "nan",
        "batch_events_per_s": f"{batch_phase.rate:.0f}",
        "raw_producer_events_per_s": f"{raw.rate:.0f}",
        "batch_ratio": f"{batch_phase.rate / raw.rate:.3f}" if raw.rate else "nan",
    }
    if callback_phase is not None:
        callback_p99 = callback_phase.percentile(99)
        figures["callback_req_per_s"] = f"{callback_phase.rate:.0f}"
        figures["callback_p99_ms"] = f"{callback_p99:.1f}" if callback_p99 is not None else "nan"
        figures["callback_vs_single"] = (
            f"{callback_phase.rate / single_phase.rate:.3f}" if single_phase.rate else "nan"
        )
    print("RESULT " + " ".join(f"{name}={value}" for name, value in figures.items()), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
