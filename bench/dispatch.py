"""Dispatcher benchmark: one worker's sends per second to SMTP and to an HTTP provider.

`.venv/bin/python -m bench.dispatch [--messages N] [--latency-ms 0,50] [--in-flight C]` starts
its own throw-away stack (Kafka 29392/29393, FerretDB 27392, the sandbox with SMTP on 21325 and
its HTTP providers on 28325, dispatcher metrics 29465; state in `.local/bench-dispatch`, wiped at
the start, stopped at the end) and ONE dispatcher worker (`python -m services.dispatcher`, at most
C sends in flight: `WAYPOST_MAX_IN_FLIGHT`, which the worker triples for SMS and push unless
`--in-flight-http` says otherwise). The broker compiles with the JVM's quick compiler only
(`--broker-jit quick`, `-XX:TieredStopAtLevel=1`): started fresh, with the default tiers it spent
a third of a core on compiling through the first minute of the worker's traffic, which no
baseline pays (they do not use Kafka). No ingest, segmenter or orchestrator: send requests
go straight onto `waypost.send-requests.v1`, keyed by contact. Every request has its own contact
(so no frequency cap or per-contact ordering applies) and a message id unique to the run; the
templates are ready documents in the `templates` collection. Runs: email (SMTP), then SMS
(the sandbox's Twilio-style HTTP API) and push (its FCM HTTP v1 API) once per `--latency-ms`,
the delay the sandbox adds to every provider answer (`POST /control/latency`; SMTP has none).
Each run, on a reset sandbox:

1. baseline: the client library alone sends N messages at the same concurrency (an asyncio
   semaphore of C): aiosmtplib over reused connections (at most C, as the worker's session
   pool), a MIME message of the worker's shape (text + tracked HTML, List-Unsubscribe), built
   before the clock starts;
   the worker's provider client (`services.dispatcher.channels.http.ProviderClient`, aiohttp,
   a connection per send in flight), posting the worker's form (To, From, Body, a signed
   StatusCallback) with Basic auth, or the worker's FCM message with a bearer token fetched
   once before the clock starts (the worker's token source, `FcmAccessToken`). 20 sequential
   sends come first (a warm-up; their
   median is the "idle" provider latency, one call at a time). The sandbox holds its SMS status
   callbacks back for an hour in both phases (`WAYPOST_SMS_CALLBACK_DELAY`): sending thousands
   of them made the sandbox itself the limit of the baseline.
2. dispatcher: the N requests are produced with the worker stopped, then the worker starts. The
   bench polls the offsets the group `waypost-dispatcher` committed on the requests topic every
   0.2 s until all N are committed (and, while any ledger entry waits for a retry, the ledger).
   The worker's own timestamps of the final states in the ledger (`messages`: sent, failed,
   skipped, unknown) give the span; start-up and the first send are left out. A phase in which
   nothing is committed for `--stall` seconds ends as STALLED: the worker is stopped and FerretDB
   restarted (its data kept) so that the later runs still measure something.
3. exactly once: the sandbox outbox must then hold exactly N new messages of the channel, one
   per expected recipient (no duplicates, none missing); the "ledger" column counts the run's
   entries by state. Warnings and errors the worker logged meanwhile are summed up by kind.

Messages/s in both is the messages concluded after the first one, divided by the time from the
first to the last conclusion. "ratio" is dispatcher/baseline: 1.00 would mean the worker adds
nothing to the provider round trips (Kafka transactions, its RocksDB ledger, rendering and MIME
building, link signing, its events); 0.2 means it sustains a fifth of what the client library
alone pushes to the same sandbox. The baseline's median call latency (client side, under load,
and idle) shows what the sandbox's latency setting added. The worker, the sandbox, FerretDB,
Kafka and the bench share this machine's cores (and whatever else runs on it: the "other" CPU
column), so figures are relative to this machine and moment. The worker's ledger is a table of
its own; the `messages` collection the bench reads is its view, written in bulk a moment later,
and the bench waits for it to show every message.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.policy
import os
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
from confluent_kafka import Consumer, KafkaError, KafkaException
from confluent_kafka import TopicPartition as Partition
from prometheus_client.parser import text_string_to_metric_families

from bench.ingest import CpuMeter, log_tail
from bench.segmenter import producer
from bench.timers import Progress, percentile, port_in_use, say, table
from services.dispatcher.adapters.metrics import TRY_STEPS
from services.dispatcher.channels.http import ProviderClient, basic_auth
from services.dispatcher.channels.push.adapter import FcmAccessToken
from services.dispatcher.channels.push.domain import PushContent, fcm_request_body
from services.dispatcher.settings import DispatcherSettings
from shared import event_loop
from shared.clock import SystemClock
from shared.contracts import Channel, Profile, SendRequest
from shared.docstore import connect_blocking
from shared.kafka import ensure_topics, topic_record_count
from shared.links import LinkClaims, LinkSigner, track_email, urls_written_in
from shared.settings import CommonSettings
from shared.topics import SEND_REQUESTS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy" / "local"))

import stack  # noqa: E402  (a script, not a package: importable once its folder is on the path)

HOME = ROOT / ".local" / "bench-dispatch"
PORTS = stack.Ports(
    kafka=29392,
    kafka_controller=29393,
    postgres=25392,
    mongo=27392,
    smtp=21325,
    outbox=28325,
    ingest=28300,  # nothing listens: the SMS status callbacks it would get are held back
    admin=28301,
    dispatcher_metrics=29465,
    kafka_sasl=29394,
)
GROUP = "waypost-dispatcher"
DATABASE = "waypost"
FINAL = ("sent", "failed", "skipped", "unknown")
PROBES = 20  # sequential sends before each baseline: warm-up and idle latency
# The bench's broker starts fresh. With the JVM's full JIT, its C2 compiler thread took 0.10 to
# 0.34 of a core through the first minute of dispatcher traffic, and still 0.03 to 0.10 after
# 40,000 emails of warm-up; the timed phases then measured the broker's start-up as much as the
# worker. "quick" compiles with C1 only (docs/delivery.md has the figures of both).
BROKER_JIT = {"quick": ("-XX:TieredStopAtLevel=1",), "full": ()}
# The sandbox holds every SMS status callback this long; /control/reset drops them between runs.
# Sent (one shared httpx pool), thousands of queued callbacks slowed the sandbox from about 900
# to 35 SMS/s on this machine: they, not the client, would set the baseline. Delivery reports
# are the provider's work after the send, not part of it; neither phase has them now.
SMS_CALLBACK_DELAY = 3600
POLL_SECONDS = 0.2
COORDINATOR_STARTING = (
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError._TIMED_OUT,
)
# The worker's defaults (DispatcherSettings, CommonSettings): the baseline sends the same shapes.
EMAIL_FROM = "Waypost <hello@waypost.local>"
MESSAGE_ID_DOMAIN = "waypost.local"
SMS_FROM = "+15005550006"
SMS_ACCOUNT = "ACwaypostsandbox"
SMS_TOKEN = "waypost-sandbox-sms-token"  # noqa: S105  (the sandbox's public default)
LINK_SECRET = "waypost-dev-link-secret"  # noqa: S105  (the development default)
UNFOLDED = email.policy.SMTP.clone(max_line_length=998)

FIRST_NAME = "Ana"
LINK = "https://shop.example/spring?utm_source=waypost"
TEMPLATES: dict[Channel, dict[str, str]] = {
    "email": {
        "subject": "Spring picks for {{ contact.first_name }}",
        "text": (
            "Hi {{ contact.first_name }},\n\nOur spring collection is in: light jackets, "
            "linen shirts and the sneakers you looked at.\n\nSee them: " + LINK + "\n\n"
            "Acme Outfitters, 1 Market Street\n"
        ),
        "html": (
            "<html><body><p>Hi {{ contact.first_name }},</p><p>Our spring collection is in: "
            "light jackets, linen shirts and the sneakers you looked at.</p>"
            '<p><a href="' + LINK + '">See the collection</a></p>'
            "<p>Acme Outfitters, 1 Market Street</p></body></html>"
        ),
    },
    "sms": {
        "subject": "",
        "text": "Acme: hi {{ contact.first_name }}, spring is in store. Reply STOP to opt out.",
        "html": "",
    },
    "push": {
        "subject": "Spring picks for {{ contact.first_name }}",
        "text": "Light jackets, linen shirts and the sneakers you looked at.",
        "html": "",
    },
}


def rendered(source: str) -> str:
    """What the worker's renderer makes of the templates above (one variable)."""
    return source.replace("{{ contact.first_name }}", FIRST_NAME)


@dataclass(frozen=True)
class Run:
    channel: Channel
    latency_ms: float | None  # None: SMTP, where the sandbox adds none
    index: int

    @property
    def tag(self) -> str:
        return self.channel if self.latency_ms is None else f"{self.channel}-{self.latency_ms:g}ms"

    @property
    def label(self) -> str:
        return "-" if self.latency_ms is None else f"{self.latency_ms:g} ms"

    @property
    def journey_id(self) -> str:
        return f"bench-dispatch-{self.tag}"

    def recipient(self, kind: str, n: int) -> str:
        """Distinct per run, per phase (`kind`: base, idle, worker) and message."""
        if self.channel == "email":
            return f"{kind}-{self.tag}-{n:06d}@bench.example"
        if self.channel == "push":  # a device's registration token
            return f"bench-device-{kind}-{self.index:02d}-{n:07d}"
        prefix = {"base": 1, "idle": 2, "worker": 3}[kind]
        return f"+1555{prefix}{self.index:02d}{n:07d}"


# -- the messages --------------------------------------------------------------------------------


def claims(run: Run, message_id: str, contact_key: str) -> LinkClaims:
    return LinkClaims(
        kind="unsubscribe",
        message_id=message_id,
        contact_key=contact_key,
        is_user=True,
        channel=run.channel,
        template_id=f"bench-{run.channel}",
        journey_id=run.journey_id,
        step_id="send",
        issued_at=int(time.time()),
    )


def mime_message(signer: LinkSigner, run: Run, n: int, kind: str) -> tuple[str, bytes]:
    """A message of the worker's shape to one recipient, as the bytes sent in DATA."""
    to = run.recipient(kind, n)
    message_id = f"{kind}-{run.tag}-{n:06d}"
    base = claims(run, message_id, f"{kind}-{run.tag}-c{n:06d}")
    template = TEMPLATES["email"]
    html, text = track_email(
        rendered(template["html"]),
        rendered(template["text"]),
        signer,
        base,
        opens=True,
        clicks=True,
        template_urls=urls_written_in(template["text"], template["html"]),
    )
    msg = EmailMessage(policy=UNFOLDED)
    msg["From"] = EMAIL_FROM
    msg["To"] = to
    msg["Subject"] = rendered(template["subject"])
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = f"<{message_id}@{MESSAGE_ID_DOMAIN}>"
    msg["X-Waypost-Message-Id"] = message_id
    msg["List-Unsubscribe"] = f"<{signer.unsubscribe_url(base)}>"
    msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg.set_content(text)
    if html:
        msg.add_alternative(html, subtype="html")
    return to, msg.as_bytes(policy=UNFOLDED)


def sms_form(signer: LinkSigner, run: Run, n: int, kind: str) -> dict[str, str]:
    """The form the worker posts: To, From, Body and a signed status callback."""
    message_id = f"{kind}-{run.tag}-{n:06d}"
    base = claims(run, message_id, f"{kind}-{run.tag}-c{n:06d}")
    callback = signer.sms_status_url(replace(base, kind="sms_status"))
    return {
        "To": run.recipient(kind, n),
        "Body": rendered(TEMPLATES["sms"]["text"]).strip(),
        "From": SMS_FROM,
        "StatusCallback": callback,
    }


def fcm_body(run: Run, n: int, kind: str) -> bytes:
    """The FCM message the worker posts for one device."""
    template = TEMPLATES["push"]
    content = PushContent(
        title=rendered(template["subject"]), body=rendered(template["text"]).strip()
    )
    return fcm_request_body(run.recipient(kind, n), content, f"{kind}-{run.tag}-{n:06d}")


def send_requests(run: Run, count: int) -> list[tuple[str, bytes]]:
    """N requests, one contact each, with message ids unique to the run."""
    now = datetime.now(UTC)
    out = []
    for n in range(count):
        key = f"worker-{run.tag}-c{n:06d}"
        address = {"email": "email", "sms": "phone", "push": "push_token"}[run.channel]
        profile = Profile(
            contact_key=key,
            user_id=key,
            traits={address: run.recipient("worker", n), "first_name": FIRST_NAME},
            first_seen=now,
            last_seen=now,
            updated_at=now,
        )
        request = SendRequest(
            message_id=f"worker-{run.tag}-{n:06d}",
            contact_key=key,
            channel=run.channel,
            template_id=f"bench-{run.channel}",
            journey_id=run.journey_id,
            journey_version=1,
            instance_id=f"{run.tag}-{n:06d}",
            step_id="send",
            requested_at=now,
            profile=profile,
        )
        out.append((key, request.to_wire()))
    return out


# -- results -------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One timed phase: messages concluded after the first, over the first-to-last span."""

    counted: int = 0
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    cpu_seconds: float = 0.0  # wall time the CPU figures cover
    cpu_messages: int = 0  # messages concluded while the CPU figures were taken
    failures: Counter[str] = field(default_factory=Counter)

    @property
    def rate(self) -> float | None:
        return self.counted / self.seconds if self.seconds > 0 else None


@dataclass
class Outbox:
    count: int
    duplicates: int
    missing: int
    unexpected: int

    def ok(self, expected: int) -> bool:
        return self.count == expected and not (self.duplicates or self.missing or self.unexpected)

    def describe(self, expected: int) -> str:
        if self.ok(expected):
            return f"{self.count} ok"
        return (
            f"{self.count}/{expected}: {self.duplicates} dup, {self.missing} missing, "
            f"{self.unexpected} other"
        )


@dataclass
class RunResult:
    run: Run
    messages: int
    baseline: Phase = field(default_factory=Phase)
    latencies_ms: list[float] = field(default_factory=list)
    idle_ms: list[float] = field(default_factory=list)
    baseline_outbox: Outbox | None = None
    dispatcher: Phase = field(default_factory=Phase)
    states: Counter[str] = field(default_factory=Counter)
    outbox: Outbox | None = None
    startup: float = 0.0  # worker start to its first commit seen
    stalled: int | None = None  # requests committed when nothing more was for --stall seconds
    worker_log: Counter[str] = field(default_factory=Counter)  # warnings and errors, by kind
    steps: dict[str, float] = field(default_factory=dict)  # mean seconds per try, by step


# -- the sandbox ---------------------------------------------------------------------------------


def control(bench: stack.Stack, latency_ms: float | None) -> None:
    """An empty outbox, no rules, then the run's provider latency."""
    httpx.post(f"{bench.outbox_url}/control/reset", timeout=30).raise_for_status()
    seconds = (latency_ms or 0.0) / 1000
    answer = httpx.post(
        f"{bench.outbox_url}/control/latency", json={"seconds": seconds}, timeout=30
    )
    answer.raise_for_status()


def outbox_check(bench: stack.Stack, channel: str, expected: set[str]) -> Outbox:
    """What the outbox holds of `channel`, against the recipients that should each have one."""
    answer = httpx.get(f"{bench.outbox_url}/messages", params={"channel": channel}, timeout=120)
    answer.raise_for_status()
    messages = answer.json()["messages"]
    seen = Counter(addr for m in messages for addr in m.get("to", []))
    return Outbox(
        count=len(messages),
        duplicates=sum(c - 1 for c in seen.values() if c > 1),
        missing=len(expected - set(seen)),
        unexpected=len(set(seen) - expected),
    )


# -- 1. the baseline -----------------------------------------------------------------------------


Send = Callable[[], Awaitable[object]]


async def fan_out(
    label: str, sends: Sequence[Send], in_flight: int, phase: Phase | None
) -> tuple[list[float], list[float]]:
    """Run `sends` with at most `in_flight` at once; completion times and latencies (ms)."""
    gate = asyncio.Semaphore(in_flight)
    done_at: list[float] = []
    latencies: list[float] = []
    progress = Progress(label, len(sends), "sent") if phase is not None else None

    async def one(send: Send) -> None:
        async with gate:
            started = time.perf_counter()
            try:
                await send()
            except Exception as exc:  # counted and reported (or raised, when probing)
                if phase is not None:
                    phase.failures[f"{type(exc).__name__}: {exc}"[:200]] += 1
                else:
                    raise
                return
            now = time.perf_counter()
            done_at.append(now)
            latencies.append((now - started) * 1000)
            if progress is not None:
                progress.tick(len(done_at))

    if phase is None:  # one at a time
        for send in sends:
            await one(send)
    else:
        await asyncio.gather(*(one(send) for send in sends))
    if progress is not None:
        progress.tick(len(done_at), force=True)
    return done_at, latencies


async def baseline(
    bench: stack.Stack, run: Run, messages: int, in_flight: int, meter: CpuMeter
) -> tuple[Phase, list[float], list[float]]:
    """The probes, then N sends through the client library alone, timed."""
    signer = LinkSigner(LINK_SECRET, bench.ingest_url)
    phase = Phase()
    client: ProviderClient | None = None
    # SMTP sessions reused across messages, as the worker's pool does: at most one per send in
    # flight, opened when first needed.
    parked: list[aiosmtplib.SMTP] = []
    opened: list[aiosmtplib.SMTP] = []
    if run.channel == "email":
        sender = "hello@waypost.local"

        async def session() -> aiosmtplib.SMTP:
            if parked:
                return parked.pop()
            smtp = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=bench.ports.smtp, start_tls=False, timeout=30
            )
            await smtp.connect()
            opened.append(smtp)
            return smtp

        def mail(to: str, raw: bytes) -> Send:
            async def send() -> None:
                smtp = await session()
                await smtp.sendmail(sender, [to], raw)
                parked.append(smtp)  # a session that failed is not used again

            return send

        probes = [mail(*mime_message(signer, run, n, "idle")) for n in range(PROBES)]
        built = [mime_message(signer, run, n, "base") for n in range(messages)]
        say(f"  {len(built[0][1]):,} bytes per message in DATA")
        sends = [mail(to, raw) for to, raw in built]
    elif run.channel == "push":
        # The worker's client, and its token source: one token, fetched before the clock starts.
        client = ProviderClient(max_connections=in_flight, timeout=15.0)
        settings = DispatcherSettings(
            fcm_base_url=bench.outbox_url, fcm_service_account_file=bench.fcm_service_account
        )
        tokens = FcmAccessToken(settings, client, SystemClock())
        bearer = await tokens.get()
        project = tokens.account().project_id
        push_url = f"{bench.outbox_url}/v1/projects/{project}/messages:send"
        push_headers = {
            "Authorization": f"Bearer {bearer}",
            "Content-Type": "application/json; charset=UTF-8",
        }
        push_client = client

        def push(body: bytes) -> Send:
            async def send() -> None:
                answer = await push_client.post(push_url, data=body, headers=push_headers)
                if answer.status_code != 200:
                    raise RuntimeError(f"HTTP {answer.status_code}: {answer.content[:120]!r}")

            return send

        probes = [push(fcm_body(run, n, "idle")) for n in range(PROBES)]
        sends = [push(fcm_body(run, n, "base")) for n in range(messages)]
    else:
        # The worker's client and pool: a connection per send in flight, all kept alive.
        client = ProviderClient(max_connections=in_flight, timeout=15.0)
        url = f"{bench.outbox_url}/2010-04-01/Accounts/{SMS_ACCOUNT}/Messages.json"
        headers = {
            "Accept": "application/json",
            "Authorization": basic_auth(SMS_ACCOUNT, SMS_TOKEN),
        }
        http = client

        def post(form: dict[str, str]) -> Send:
            async def send() -> None:
                answer = await http.post(url, data=form, headers=headers)
                if answer.status_code != 201:
                    raise RuntimeError(f"HTTP {answer.status_code}: {answer.content[:120]!r}")

            return send

        probes = [post(sms_form(signer, run, n, "idle")) for n in range(PROBES)]
        sends = [post(sms_form(signer, run, n, "base")) for n in range(messages)]
    try:
        _, idle = await fan_out("probe", probes, 1, None)
        before = meter.sample()
        started = time.perf_counter()
        done_at, latencies = await fan_out("baseline", sends, in_flight, phase)
        phase.cpu_seconds = time.perf_counter() - started
        phase.cpu = meter.spent(before, meter.sample())
        phase.cpu_messages = len(done_at)
    finally:
        if client is not None:
            await client.aclose()
        for smtp in opened:
            if smtp.is_connected:
                with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                    await smtp.quit()
    if len(done_at) > 1:
        phase.counted, phase.seconds = len(done_at) - 1, max(done_at) - min(done_at)
    return phase, latencies, idle


# -- 2. the dispatcher ---------------------------------------------------------------------------


def produce(bench: stack.Stack, records: Sequence[tuple[str, bytes]]) -> None:
    sender = producer(bench.bootstrap)
    progress = Progress("produce", len(records), "requests written")
    for n, (key, value) in enumerate(records):
        while True:
            try:
                sender.produce(SEND_REQUESTS.name, value=value, key=key.encode())
                break
            except BufferError:
                sender.poll(0.05)
        sender.poll(0)
        progress.tick(n)
    if sender.flush(60) != 0:
        raise RuntimeError("send requests not acknowledged")
    progress.tick(len(records), force=True)


class Committed:
    """The offsets the worker's group committed on the requests topic, summed.

    Read by a consumer that carries the group's id but never subscribes, so it never joins the
    group: an offset fetch only. (AdminClient.list_consumer_group_offsets crashed the process
    with a segmentation fault while the group did not exist yet.) It reads uncommitted: a
    reader of committed records asks for stable offsets only, and the broker answers that
    with an error for as long as a transaction holds offsets of the partition (a batch whose
    first call proved ownership, up to its end); so the last committed offsets, at once.
    """

    def __init__(self, bench: stack.Stack) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": bench.bootstrap,
                "group.id": GROUP,
                "enable.auto.commit": False,
                "isolation.level": "read_uncommitted",
            }
        )
        self._partitions = [Partition(SEND_REQUESTS.name, p) for p in range(bench.partitions)]

    def __call__(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            try:
                answer = self._consumer.committed(self._partitions, timeout=10)
                return sum(max(tp.offset, 0) for tp in answer)
            except KafkaException as exc:
                # A fresh broker answers "not coordinator" until its offsets topic is loaded.
                error = exc.args[0]
                transient = error.retriable() or error.code() in COORDINATOR_STARTING
                if not transient or time.monotonic() > deadline:
                    raise
                time.sleep(POLL_SECONDS)

    def close(self) -> None:
        self._consumer.close()


# How long the ledger's view may take to show what the worker committed.
VIEW_CATCH_UP_SECONDS = 60.0


def final_times(db: Any, run: Run) -> tuple[Counter[str], list[datetime]]:
    """Ledger states of the run's entries, and when each final one got there."""
    fields = {"state": 1, **{f"{s}_at": 1 for s in FINAL}}
    states: Counter[str] = Counter()
    times: list[datetime] = []
    for doc in db.messages.find({"journey_id": run.journey_id}, fields):
        state = str(doc.get("state"))
        states[state] += 1
        at = doc.get(f"{state}_at") if state in FINAL else None
        if isinstance(at, datetime):
            times.append(at)
    return states, times


def log_notes(path: Path, offset: int) -> Counter[str]:
    """Warning and error lines the worker logged after `offset`, by event (and, for dead
    letters and failures, the exception)."""
    notes: Counter[str] = Counter()
    try:
        with path.open("rb") as log:
            log.seek(offset)
            lines = log.read().decode(errors="replace").splitlines()
    except OSError:
        return notes
    for line in lines:
        level = line.partition("[")[2].partition("]")[0].strip()
        if level not in ("warning", "error", "critical"):
            continue
        event = line.partition("]")[2].split()[0] if line.partition("]")[2].split() else "?"
        reason = line.partition('reason="')[2].partition(":")[0]
        if "SQLITE_BUSY" in line:
            reason = f"{reason or 'error'}: database is locked (SQLITE_BUSY)"
        notes[f"{level} {event}" + (f" ({reason})" if reason else "")] += 1
    return notes


def dispatcher(bench: stack.Stack, db: Any, run: Run, args: argparse.Namespace) -> RunResult:
    """Produce the requests, start the worker, follow it to the end (or a stall), stop it."""
    result = RunResult(run, args.messages)
    produce(bench, send_requests(run, args.messages))
    target = topic_record_count(bench.bootstrap, SEND_REQUESTS.name)
    committed = Committed(bench)
    already = committed()
    phase = result.dispatcher
    logfile = bench.logfile("dispatcher")
    offset = logfile.stat().st_size if logfile.exists() else 0
    started = time.perf_counter()
    bench.start_service("dispatcher")
    try:
        meter = CpuMeter(
            {
                "bench": os.getpid(),
                "worker": bench.pid("dispatcher"),
                **{n: bench.pid(n) for n in ("sandbox", "ferretdb", "kafka")},
            }
        )
        first: tuple[float, int, dict[str, float]] | None = None
        progress = Progress("dispatcher", args.messages, "requests committed")
        moved = (started, 0)  # when the committed count last changed, and to what
        while True:
            if bench.pid("dispatcher") is None:
                raise RuntimeError("the dispatcher exited")
            done, now = committed() - already, time.perf_counter()
            if first is None and done > 0:
                first = (now, done, meter.sample())
                result.startup = now - started
                say(f"  first commit seen {result.startup:.1f}s after start, at {done} requests")
            if done >= target - already:
                break
            if done != moved[1]:
                moved = (now, done)
            elif now - moved[0] > args.stall:
                result.stalled = done
                say(f"  STALLED: nothing committed for {args.stall:.0f}s, at {done} requests")
                break
            if now - started > args.timeout:
                raise TimeoutError(f"{done}/{args.messages} committed after {args.timeout:.0f}s")
            progress.tick(done)
            time.sleep(POLL_SECONDS)
        progress.tick(done, force=True)
        if first is not None:
            phase.cpu = meter.spent(first[2], meter.sample())
            phase.cpu_seconds, phase.cpu_messages = now - first[0], done - first[1]
        # Committed means handled: only an entry waiting for a retry can still move (one left
        # in requested or sending had its request dead-lettered, see the worker log). The
        # `messages` collection is the worker's view of its ledger, written in bulk a moment
        # after the ledger itself: it is read until it shows every message concluded.
        view_deadline = time.perf_counter() + VIEW_CATCH_UP_SECONDS
        while result.stalled is None:
            result.states, _ = final_times(db, run)
            if time.perf_counter() - started > args.timeout:
                break
            if result.states.get("retrying"):
                say(f"  ledger: {dict(result.states)}; waiting for the retries")
            elif sum(result.states[s] for s in FINAL) >= args.messages:
                break
            elif time.perf_counter() > view_deadline:
                say(f"  ledger view: {dict(result.states)} after {VIEW_CATCH_UP_SECONDS:.0f}s")
                break
            time.sleep(0.5)
    finally:
        committed.close()
        result.steps = try_steps(bench, run.channel)
        bench.stop("dispatcher")
        result.worker_log = log_notes(logfile, offset)
    if result.stalled is not None:
        # A store that stopped answering: its data survives a restart, and the next runs need
        # a store that answers.
        say("  restarting FerretDB (see its log for the operations that were waiting)")
        bench.stop("ferretdb")
        bench.start_ferretdb()
        bench.wait_mongo()
    result.states, times = final_times(db, run)
    if len(times) > 1:
        phase.counted = len(times) - 1
        phase.seconds = (max(times) - min(times)).total_seconds()
    return result


def worker_metrics(bench: stack.Stack, timeout: float = 10.0) -> str:
    """The dispatcher worker's Prometheus metrics as text; empty when they cannot be read."""
    url = f"http://127.0.0.1:{bench.ports.dispatcher_metrics}/metrics"
    try:
        return httpx.get(url, timeout=timeout).text
    except httpx.HTTPError:
        return ""


def try_steps(bench: stack.Stack, channel: str) -> dict[str, float]:
    """Mean seconds a try of `channel` spent in each step (`TRY_STEPS`), from the worker's
    `waypost_dispatcher_try_step_seconds`; empty when its metrics cannot be read."""
    text = worker_metrics(bench)
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "waypost_dispatcher_try_step_seconds":
            continue
        for sample in family.samples:
            if sample.labels.get("channel") != channel:
                continue
            step = sample.labels.get("step", "")
            if sample.name.endswith("_sum"):
                sums[step] = sample.value
            elif sample.name.endswith("_count"):
                counts[step] = sample.value
    return {step: sums[step] / counts[step] for step in TRY_STEPS if counts.get(step)}


# -- the run -------------------------------------------------------------------------------------


def start_stack(bench: stack.Stack) -> None:
    """Kafka, FerretDB and the sandbox on the bench ports, from an empty state folder."""
    bench.down()  # a previous run that was killed may have left its processes behind
    shutil.rmtree(bench.home, ignore_errors=True)
    ports = bench.ports
    wanted = (
        ports.kafka,
        ports.kafka_controller,
        ports.postgres,
        ports.mongo,
        ports.smtp,
        ports.outbox,
    )
    busy = [p for p in (*wanted, ports.ingest, ports.dispatcher_metrics) if port_in_use(p)]
    if busy:
        raise RuntimeError(f"ports {busy} are already in use; the bench needs them free")
    stack.setup()
    say(f"starting Kafka on {bench.bootstrap}, FerretDB, the sandbox (state in {bench.home}) ...")
    bench.start_kafka()
    bench.start_ferretdb()
    bench.start_sandbox()
    bench.wait_kafka()
    bench.wait_mongo()
    bench.wait_http(f"{bench.outbox_url}/health")
    created = ensure_topics(bench.bootstrap, bench.partitions)
    say(f"topics ready ({len(created)} created, {bench.partitions} partitions)")


def store_templates(db: Any) -> None:
    """Ready templates, as publishing a journey file leaves them."""
    for channel, template in TEMPLATES.items():
        db.templates.replace_one(
            {"_id": f"bench-{channel}"},
            {"channel": channel, **template, "status": "ready"},
            upsert=True,
        )


def in_flight(run: Run, args: argparse.Namespace) -> int:
    """Sends in flight for the run's channel: the worker's limit for it (as its settings make
    it from C and `--in-flight-http`: three times C for SMS and push when not given), and the
    baseline's."""
    http: int | None = args.in_flight_http
    settings = DispatcherSettings(
        max_in_flight=args.in_flight, max_in_flight_sms=http, max_in_flight_push=http
    )
    return settings.in_flight(run.channel)


def in_flight_said(args: argparse.Namespace) -> str:
    email, sms, push = (in_flight(Run(c, None, 0), args) for c in ("email", "sms", "push"))
    return f"{email} (SMS {sms}, push {push})"


def one_run(bench: stack.Stack, db: Any, run: Run, args: argparse.Namespace) -> RunResult:
    say(f"{run.tag}: baseline, the client library alone, {in_flight(run, args)} in flight")
    meter = CpuMeter(
        {"bench": os.getpid(), **{n: bench.pid(n) for n in ("sandbox", "ferretdb", "kafka")}}
    )
    control(bench, run.latency_ms)
    # On the loop the worker runs on (`WAYPOST_EVENT_LOOP`): the client library at its best.
    base, latencies_ms, idle_ms = event_loop.run(
        baseline(bench, run, args.messages, in_flight(run, args), meter),
        CommonSettings().event_loop,
    )
    expected = {run.recipient("base", n) for n in range(args.messages)}
    expected |= {run.recipient("idle", n) for n in range(PROBES)}
    base_outbox = outbox_check(bench, run.channel, expected)
    say(f"{run.tag}: one dispatcher worker on {args.messages} requests")
    control(bench, run.latency_ms)
    result = dispatcher(bench, db, run, args)
    result.baseline, result.latencies_ms, result.idle_ms = base, latencies_ms, idle_ms
    result.baseline_outbox = base_outbox
    expected = {run.recipient("worker", n) for n in range(args.messages)}
    result.outbox = outbox_check(bench, run.channel, expected)
    say(
        f"  ledger {ledger_cell(result)}; outbox {result.outbox.describe(args.messages)}; "
        f"{fmt(result.baseline.rate)} vs {fmt(result.dispatcher.rate)} messages/s"
    )
    return result


def ledger_cell(r: RunResult) -> str:
    cell = ", ".join(f"{n} {state}" for state, n in r.states.most_common()) or "empty"
    return f"STALLED at {r.stalled}; {cell}" if r.stalled is not None else cell


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return format(value, spec) if value is not None else "-"


def per(value: float | None, divisor: float, scale: float = 1.0) -> float | None:
    return value * scale / divisor if value is not None and divisor > 0 else None


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}" if value is not None and base else "-"


def report(results: Sequence[RunResult], messages: int, in_flight: str) -> None:
    say(
        f"sends per second, {messages:,} messages per phase, {in_flight} in flight: one dispatcher "
        "worker against the client library alone (baseline), same sandbox, same run"
    )
    rows = [
        [
            "channel",
            "latency added",
            "baseline msg/s",
            "dispatcher msg/s",
            "ratio",
            "worker cores",
            "worker CPU ms/msg",
            "client CPU ms/msg",
            "ledger",
            "outbox",
        ]
    ]
    for r in results:
        base, disp = r.baseline, r.dispatcher
        worker, client = disp.cpu.get("worker"), base.cpu.get("bench")
        rows.append(
            [
                r.run.channel,
                r.run.label,
                fmt(base.rate),
                fmt(disp.rate),
                ratio(disp.rate, base.rate),
                fmt(per(worker, disp.cpu_seconds), ".2f"),
                fmt(per(worker, disp.cpu_messages, 1000), ".2f"),
                fmt(per(client, base.cpu_messages, 1000), ".2f"),
                ledger_cell(r),
                r.outbox.describe(messages) if r.outbox else "-",
            ]
        )
    table(rows)
    print(flush=True)
    say("provider call latency in the baseline, client side, in ms (one send: connect to QUIT")
    say("for SMTP, one POST for SMS or push); idle: 20 sends one at a time; loaded: C at a time")
    rows = [["channel", "latency added", "idle p50", "loaded p50", "loaded p95", "loaded p99"]]
    for r in results:
        loaded = [percentile(r.latencies_ms, q) for q in (50, 95, 99)]
        rows.append(
            [
                r.run.channel,
                r.run.label,
                fmt(percentile(r.idle_ms, 50), ".1f"),
                *(fmt(v, ".1f") for v in loaded),
            ]
        )
    table(rows)
    print(flush=True)
    cores = os.cpu_count() or 1
    say(f"cores busy on average during each timed phase ({cores} on this machine)")
    names = ("bench", "worker", "sandbox", "ferretdb", "kafka")
    rows = [["run", "phase", *names, "other", "idle"]]
    for r in results:
        for label, phase in (("baseline", r.baseline), ("dispatcher", r.dispatcher)):
            if phase.cpu_seconds <= 0 or not phase.cpu:
                continue
            ours = sum(phase.cpu.get(n, 0.0) for n in names)
            machine = phase.cpu["machine"]
            values = [phase.cpu.get(n) for n in names]
            values += [max(0.0, machine - ours), max(0.0, cores * phase.cpu_seconds - machine)]
            cells = [fmt(v / phase.cpu_seconds, ".2f") if v is not None else "-" for v in values]
            rows.append([r.run.tag, label, *cells])
    table(rows)
    print(flush=True)
    say("where a try's time goes in the worker, mean ms per try (waypost_dispatcher_try_step_")
    say("seconds): a call slot, staging (SMTP), the round that marks it sending, the call, and")
    say("back in after the answer")
    rows = [["run", *TRY_STEPS, "slot held"]]
    for r in results:
        if r.steps:
            held = sum(r.steps.get(step, 0.0) for step in ("stage", "mark", "call", "back"))
            cells = [fmt(r.steps[s] * 1000, ".1f") if s in r.steps else "-" for s in TRY_STEPS]
            rows.append([r.run.tag, *cells, fmt(held * 1000, ".1f")])
    table(rows)
    print(flush=True)
    sms = [r for r in results if r.run.channel == "sms"]
    if len(sms) > 1:
        base = percentile(sms[0].idle_ms, 50)
        for r in sms[1:]:
            idle = percentile(r.idle_ms, 50)
            if idle is not None and base is not None:
                say(
                    f"the sandbox's {r.run.label} setting added {idle - base:.1f} ms to an idle "
                    f"SMS call (p50 {base:.1f} -> {idle:.1f} ms)"
                )
    for r in results:
        say(
            f"{r.run.tag}: first to last conclusion {r.baseline.seconds:.2f}s baseline, "
            f"{r.dispatcher.seconds:.2f}s dispatcher; worker start to its first commit seen "
            f"{r.startup:.1f}s (left out)"
        )
        for note, count in r.worker_log.most_common():
            say(f"  worker log: {count} x {note}")


def problems(results: Sequence[RunResult], messages: int) -> list[str]:
    found = []
    for r in results:
        failures = sum(r.baseline.failures.values())
        if failures:
            top = "; ".join(f"{n} x {k}" for k, n in r.baseline.failures.most_common(3))
            found.append(f"{r.run.tag}: {failures} baseline sends failed ({top})")
        if r.baseline_outbox and not r.baseline_outbox.ok(messages + PROBES):
            found.append(
                f"{r.run.tag}: baseline outbox {r.baseline_outbox.describe(messages + PROBES)}"
            )
        if r.stalled is not None:
            found.append(f"{r.run.tag}: the worker stalled at {r.stalled}/{messages} committed")
        if r.states.get("sent", 0) != messages:
            found.append(f"{r.run.tag}: ledger {ledger_cell(r)}, not {messages} sent")
        if r.outbox is None or not r.outbox.ok(messages):
            found.append(f"{r.run.tag}: outbox {r.outbox.describe(messages) if r.outbox else '-'}")
    return found


def latencies(value: str) -> list[float]:
    out: list[float] = []
    for part in value.split(","):
        ms = float(part)
        if ms < 0:
            raise argparse.ArgumentTypeError("latencies must not be negative")
        if ms not in out:
            out.append(ms)
    return out


def channel_list(value: str) -> list[str]:
    chosen = [part.strip() for part in value.split(",") if part.strip()]
    unknown = sorted(set(chosen) - {"email", "sms", "push"})
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"channels are email, sms and push; not {', '.join(unknown) or 'none'}"
        )
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--messages", type=int, default=3000, help="messages per phase (N)")
    parser.add_argument(
        "--latency-ms",
        type=latencies,
        default=[0.0, 50.0],
        help="provider latencies the sandbox adds, comma separated (HTTP only)",
    )
    parser.add_argument("--in-flight", type=int, default=64, help="sends in flight (C)")
    parser.add_argument(
        "--broker-jit",
        choices=sorted(BROKER_JIT),
        default="quick",
        help="the bench broker's JIT: C1 only (quick), or the JVM's default tiers (full)",
    )
    parser.add_argument(
        "--in-flight-http",
        type=int,
        default=None,
        help="sends in flight for SMS and push (WAYPOST_MAX_IN_FLIGHT_SMS, _PUSH); unset, the "
        "worker's defaults: 3 C for SMS and push",
    )
    parser.add_argument("--partitions", type=int, default=6, help="partitions per topic")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per phase")
    parser.add_argument(
        "--stall",
        type=float,
        default=120.0,
        help="seconds without a request committed before a phase counts as stalled",
    )
    parser.add_argument(
        "--channels",
        type=channel_list,
        default=["email", "sms", "push"],
        help="channels to run, comma separated (email, sms, push), for A/B runs of one",
    )
    args = parser.parse_args(argv)
    if args.messages < 2 or args.in_flight < 1 or (args.in_flight_http or 1) < 1:
        parser.error("--messages must be at least 2, --in-flight and --in-flight-http positive")
    runs = [Run("email", None, 0)] if "email" in args.channels else []
    for channel in ("sms", "push"):
        if channel in args.channels:
            runs += [Run(channel, ms, n + 1) for n, ms in enumerate(args.latency_ms)]
    say(
        f"{args.messages:,} messages per phase, {in_flight_said(args)} in flight, runs "
        f"{', '.join(r.tag for r in runs)}, broker JIT {args.broker_jit}; "
        f"{os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    bench = stack.Stack(
        home=HOME,
        ports=PORTS,
        partitions=args.partitions,
        kafka_jvm_options=BROKER_JIT[args.broker_jit],
        extra_env={
            # Read by the worker.
            "WAYPOST_MAX_IN_FLIGHT": str(args.in_flight),
            "WAYPOST_MAX_IN_FLIGHT_SMS": str(args.in_flight_http or ""),
            "WAYPOST_MAX_IN_FLIGHT_PUSH": str(args.in_flight_http or ""),
            "WAYPOST_SMS_CALLBACK_DELAY": str(SMS_CALLBACK_DELAY),  # read by the sandbox
        },
    )
    # A SIGTERM ends the run like Ctrl-C does: through the finally below, which stops the stack.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    results: list[RunResult] = []
    began = time.perf_counter()
    client = connect_blocking(CommonSettings(mongo_url=bench.mongo_url), "waypost-bench")
    try:
        start_stack(bench)
        db = client[DATABASE]
        store_templates(db)
        for run in runs:
            results.append(one_run(bench, db, run, args))
    except BaseException:
        say(f"aborted; last lines of the dispatcher log:\n{log_tail(bench.logfile('dispatcher'))}")
        raise
    finally:
        client.close()
        say("stopping the bench stack")
        bench.down()
    print(flush=True)
    report(results, args.messages, in_flight_said(args))
    found = problems(results, args.messages)
    for line in found:
        say(f"PROBLEM: {line}")
    say(f"bench run time {time.perf_counter() - began:.0f}s")
    print(result_line(results), flush=True)
    return 1 if found else 0


def result_line(results: Sequence[RunResult]) -> str:
    """One machine-readable line: each run's messages/s, its baseline's, and their ratio."""
    pairs: list[str] = []
    for r in results:
        name = r.run.tag.replace("-", "_").replace(".", "_")
        base, disp = r.baseline.rate, r.dispatcher.rate
        pairs += [
            f"{name}_dispatcher_per_s={disp or 0:.1f}",
            f"{name}_baseline_per_s={base or 0:.1f}",
            f"{name}_ratio={(disp / base) if disp and base else 0:.3f}",
        ]
    return "RESULT " + " ".join(pairs)


if __name__ == "__main__":
    sys.exit(main())
