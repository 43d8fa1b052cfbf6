"""Dispatcher chaos benchmark: what killed and stopped workers leave behind, counted.

`.venv/bin/python -m bench.chaos [--sends N] [--kills K] [--zombie-sends M]` starts its own
throw-away stack (Kafka 29492/29493, FerretDB 27492, the sandbox with SMTP on 21425 and its
HTTP providers on 28425, dispatcher metrics 29565; state in `.local/bench-chaos`, wiped at the
start, stopped at the end), stores the dispatch bench's templates, and runs two phases, each on a
reset sandbox outbox:

1. **sigkill**: N send requests (three emails to one SMS, one contact each) are produced, one
   dispatcher worker starts, and it is SIGKILLed K times, each time another slice of the
   requests is committed and then a moment more (drawn from `--kill-spread`, seeded by
   `--seed`), then started again at once. Killed the instant a commit shows, the worker would
   always die between two batches, where nothing is under way: the draw puts the kills
   anywhere in a batch. When the slice was committed before the worker killed last has
   started again, the moment counts from its first provider calls (`--kill-while-starting`
   kills it where it is), so every kill lands mid-send; what each kill can strand, the calls
   under way as it comes, is printed. The sandbox adds `--latency-ms` to every SMS answer.
2. **sigstop**: M SMS requests over two workers, the sandbox answering each after
   `--zombie-latency-ms`. Once the first worker has provider calls under way (its in-flight
   gauge), it is SIGSTOPped until every request is committed (the second one takes its
   partitions over when its session ends), then resumed: its batch must be fenced.

After each phase the ledger's view (`messages`) must show every message final; it is then held
against the outbox:

- **duplicates**: messages that reached the outbox more than once (must be 0);
- **lost**: requests with no final state, or `sent`/`delivered` and not in the outbox, or
  `failed` and in it (must be 0);
- **unknown**: marketing messages the worker died on mid-call that asking the provider could
  not settle (the stack's sandbox answers the SMS listing and a Mailgun-style email events log);
  `unknown_arrived` of them did reach the outbox. The target is at most 1 % of sends.

- **receipted**: messages a worker that took over concluded `sent` from their call receipts
  (the answer the killed worker had, written down as it came; shown by the ledger's reason).
- **reconciled**: messages concluded `sent` because the provider, asked, showed them (the
  SMS listing, the email events log); those it showed never arrived were sent again, and count
  as plain sends.

The last line is `RESULT chaos_sends=… duplicates=… unknown=… lost=… unknown_pct=… receipted=…
reconciled=… calls_at_kills=… zombie_sends=… zombie_duplicates=… zombie_unknown=…
zombie_lost=…`; the exit status is 1 when anything was duplicated or lost.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any

import httpx
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from bench.dispatch import (
    ROOT,
    SMS_CALLBACK_DELAY,
    Committed,
    control,
    produce,
    start_stack,
    store_templates,
    worker_metrics,
)
from bench.timers import Progress, say
from services.dispatcher.handlers import RECEIPT_REASON
from shared.contracts import Channel, Profile, SendRequest
from shared.docstore import connect_blocking
from shared.settings import CommonSettings

sys.path.insert(0, str(ROOT / "deploy" / "local"))

import stack  # a script, not a package: importable once its folder is on the path

HOME = ROOT / ".local" / "bench-chaos"
PORTS = stack.Ports(
    kafka=29492,
    kafka_controller=29493,
    postgres=25492,
    mongo=27492,
    smtp=21425,
    outbox=28425,
    ingest=28400,  # nothing listens: the SMS status callbacks it would get are held back
    admin=28401,
    dispatcher_metrics=29565,
    kafka_sasl=29494,
)
GROUP = "waypost-dispatcher"
FINAL = frozenset({"sent", "delivered", "failed", "unknown", "skipped"})
POLL_SECONDS = 0.2
IN_FLIGHT_METRIC = "waypost_dispatcher_provider_calls_in_flight{"  # a line per channel


@dataclass(frozen=True)
class Send:
    message_id: str
    channel: Channel
    address: str


@dataclass
class Tally:
    sends: int
    states: Counter[str]
    duplicates: int
    lost: int
    unknown: int
    unknown_arrived: int
    receipted: int  # concluded from a call receipt by the worker that took over
    reconciled: int  # concluded `sent` because the provider, asked, showed them
    # Unknown sends by channel and whether they arrived: "email arrived", "sms not arrived".
    unknown_by: Counter[str]
    # The worker's provider calls under way (marked, unanswered) as each SIGKILL came.
    calls_at_kills: list[int] = field(default_factory=list)

    @property
    def unknown_pct(self) -> float:
        return 100.0 * self.unknown / self.sends if self.sends else 0.0

    def describe(self) -> str:
        states = ", ".join(f"{n} {s}" for s, n in self.states.most_common())
        return (
            f"{self.sends} sends: {states}; {self.duplicates} duplicates, {self.lost} lost, "
            f"{self.unknown} unknown ({self.unknown_pct:.2f} %, {self.unknown_arrived} of them "
            f"arrived); {self.receipted} concluded from their call receipts, "
            f"{self.reconciled} reconciled with the provider"
            + (
                " (unknown: "
                + ", ".join(f"{n} {k}" for k, n in sorted(self.unknown_by.items()))
                + ")"
                if self.unknown_by
                else ""
            )
            + (
                f"; calls under way at the kills: {'+'.join(map(str, self.calls_at_kills))}"
                if self.calls_at_kills
                else ""
            )
        )


def requests(phase: str, count: int, channel_of: Callable[[int], Channel]) -> list[SendRequest]:
    now = datetime.now(UTC)
    out = []
    for n in range(count):
        channel = channel_of(n)
        key = f"{phase}-c{n:06d}"
        trait = (
            {"email": f"{phase}-{n:06d}@chaos.example"}
            if channel == "email"
            else {"phone": f"+1555{9 if phase == 'sigkill' else 8}{n:08d}"}
        )
        profile = Profile(
            contact_key=key,
            user_id=key,
            traits={**trait, "first_name": "Ana"},
            first_seen=now,
            last_seen=now,
            updated_at=now,
        )
        out.append(
            SendRequest(
                message_id=f"{phase}-m{n:06d}",
                contact_key=key,
                channel=channel,
                template_id=f"bench-{channel}",
                journey_id=f"bench-chaos-{phase}",
                journey_version=1,
                instance_id=f"{phase}-i{n:06d}",
                step_id="send",
                requested_at=now,
                profile=profile,
            )
        )
    return out


def sends_of(batch: Sequence[SendRequest]) -> list[Send]:
    return [
        Send(
            r.message_id,
            r.channel,
            str(r.profile.traits["email" if r.channel == "email" else "phone"]),
        )
        for r in batch
    ]


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(POLL_SECONDS)


def follow(bench: stack.Stack, total: int, label: str) -> Callable[[], int]:
    """A counter of the requests committed since now, with a progress bar over `total`."""
    committed = Committed(bench)
    before = committed()
    progress = Progress(label, total, "requests committed")
    seen = [0]

    def done() -> int:
        # Offsets held by an open transaction read as unstable: the last count stands.
        with contextlib.suppress(KafkaException):
            seen[0] = committed(timeout=5) - before
        progress.tick(seen[0])
        return seen[0]

    return done


# Sent twice: how many to describe (the times each copy arrived, the ledger's history).
DUPLICATES_SHOWN = 3


def tally(bench: stack.Stack, db: Any, phase: str, sends: Sequence[Send]) -> Tally:
    """The view's states (once every message is final, or after its deadline) against the
    outbox."""
    journey = f"bench-chaos-{phase}"

    def views() -> dict[str, dict[str, Any]]:
        return {
            d["_id"]: d
            for d in db.messages.find({"journey_id": journey}, {"state": 1, "reason": 1})
        }

    def states() -> dict[str, str]:
        return {message_id: view["state"] for message_id, view in views().items()}

    try:
        wait_until(
            lambda: (
                (seen := states()).keys() >= {s.message_id for s in sends}
                and set(seen.values()) <= FINAL
            ),
            timeout=300,
            what="the ledger's view to show every message final",
        )
    except TimeoutError as exc:
        say(f"  {exc}")
    shown = views()
    by_id = {message_id: view["state"] for message_id, view in shown.items()}
    arrived: Counter[str] = Counter()
    arrived_at: dict[str, list[str]] = {}
    for channel in ("email", "sms"):
        answer = httpx.get(f"{bench.outbox_url}/messages", params={"channel": channel}, timeout=120)
        answer.raise_for_status()
        for message in answer.json()["messages"]:
            for address in message.get("to", []):
                arrived[address] += 1
                arrived_at.setdefault(address, []).append(str(message.get("received_at")))
    for send in [s for s in sends if arrived[s.address] > 1][:DUPLICATES_SHOWN]:
        entry = db.messages.find_one({"_id": send.message_id}, {"history": 1, "state": 1})
        history = [
            (h.get("state"), str(h.get("at"))[11:23], h.get("reason"))
            for h in (entry or {}).get("history", [])
        ]
        say(f"  twice: {send.message_id} at {sorted(arrived_at[send.address])}; {history}")
    lost = 0
    for send in sends:
        state = by_id.get(send.message_id)
        count = arrived[send.address]
        arrived_wrongly = state == "failed" and count > 0
        if state not in FINAL or (state in ("sent", "delivered") and count == 0) or arrived_wrongly:
            lost += 1
    unknown = [s for s in sends if by_id.get(s.message_id) == "unknown"]
    return Tally(
        sends=len(sends),
        states=Counter(by_id.get(s.message_id, "missing") for s in sends),
        duplicates=sum(arrived[s.address] - 1 for s in sends if arrived[s.address] > 1),
        lost=lost,
        unknown=len(unknown),
        unknown_arrived=sum(1 for s in unknown if arrived[s.address]),
        receipted=sum(
            1 for s in sends if shown.get(s.message_id, {}).get("reason") == RECEIPT_REASON
        ),
        reconciled=sum(
            1
            for s in sends
            if str(shown.get(s.message_id, {}).get("reason") or "").startswith("reconciled")
        ),
        unknown_by=Counter(
            f"{s.channel} {'arrived' if arrived[s.address] else 'not arrived'}" for s in unknown
        ),
    )


def reached(done: Callable[[], int], target: int) -> bool:
    return done() >= target


def sigkill_phase(bench: stack.Stack, db: Any, args: argparse.Namespace) -> Tally:
    say(f"sigkill: {args.sends} sends (3 emails to 1 SMS), {args.kills} SIGKILLs")
    control(bench, args.latency_ms)
    batch = requests("sigkill", args.sends, lambda n: "sms" if n % 4 == 3 else "email")
    produce(bench, [(r.contact_key, r.to_wire()) for r in batch])
    done = follow(bench, len(batch), "sigkill")
    bench.start_service("dispatcher")
    draws = random.Random(args.seed)
    calls_at_kills: list[int] = []
    for kill in range(args.kills):
        target = (kill + 1) * len(batch) // (args.kills + 2)
        wait_until(partial(reached, done, target), args.timeout, f"{target} committed")
        later = draws.uniform(0, args.kill_spread)
        if not args.kill_while_starting:
            # The worker killed last may still be starting (its slice was committed before):
            # the moment counts from its first calls, so that every kill lands mid-send.
            wait_until(lambda: in_flight(bench, timeout=1) > 0, args.timeout, "calls under way")
        time.sleep(later)  # a moment into the next batch (see the module's docstring)
        # What the kill can strand: calls marked `sending` and not yet answered (0 while the
        # restarted worker still reads its tables and serves no metrics).
        under_way = int(in_flight(bench, timeout=1))
        calls_at_kills.append(under_way)
        bench.stop("dispatcher", signal.SIGKILL)
        say(
            f"  SIGKILL {kill + 1} at {done()} committed, {later:.2f} s after {target}, "
            f"{under_way} calls under way"
        )
        bench.start_service("dispatcher")
    wait_until(partial(reached, done, len(batch)), args.timeout, "every request committed")
    found = replace(tally(bench, db, "sigkill", sends_of(batch)), calls_at_kills=calls_at_kills)
    bench.stop("dispatcher")
    say(f"  {found.describe()}")
    return found


def in_flight(bench: stack.Stack, timeout: float = 5.0) -> float:
    text = worker_metrics(bench, timeout=timeout)
    lines = text.splitlines()
    return sum(
        (float(line.split()[-1]) for line in lines if line.startswith(IN_FLIGHT_METRIC)), 0.0
    )


def members(bench: stack.Stack) -> int:
    admin = AdminClient({"bootstrap.servers": bench.bootstrap})
    described = admin.describe_consumer_groups([GROUP])[GROUP].result(timeout=10)
    return len(described.members) if str(described.state).endswith("STABLE") else 0


def sigstop_phase(bench: stack.Stack, db: Any, args: argparse.Namespace) -> Tally:
    say(
        f"sigstop: {args.zombie_sends} SMS over two workers at {args.zombie_latency_ms:g} ms, "
        "the first stopped past its session mid-batch, then resumed"
    )
    control(bench, args.zombie_latency_ms)
    bench.start_service("dispatcher")
    bench.start_service("dispatcher", worker=2, env={"WAYPOST_METRICS_PORT": "0"})
    try:
        wait_until(lambda: members(bench) == 2, 120, "two workers in the group")
        batch = requests("sigstop", args.zombie_sends, lambda _n: "sms")
        done = follow(bench, len(batch), "sigstop")
        produce(bench, [(r.contact_key, r.to_wire()) for r in batch])
        wait_until(lambda: done() > 0 and in_flight(bench) > 0, 120, "the first worker's calls")
        stopped = bench.pid("dispatcher")
        assert stopped is not None
        os.kill(stopped, signal.SIGSTOP)
        say(f"  SIGSTOP at {done()} committed")
        try:
            wait_until(lambda: done() >= len(batch), args.timeout, "every request committed")
        finally:
            os.kill(stopped, signal.SIGCONT)
        say("  resumed")
        found = tally(bench, db, "sigstop", sends_of(batch))
    finally:
        bench.stop("dispatcher-2")
        bench.stop("dispatcher")
    say(f"  {found.describe()}")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sends", type=int, default=5000, help="sends of the sigkill phase")
    parser.add_argument("--kills", type=int, default=4, help="SIGKILLs of the sigkill phase")
    parser.add_argument(
        "--kill-spread",
        type=float,
        default=1.0,
        help="seconds: each SIGKILL comes up to this long after its slice is committed",
    )
    parser.add_argument("--seed", type=int, default=1, help="seeds the SIGKILLs' moments")
    parser.add_argument(
        "--kill-while-starting",
        action="store_true",
        help="let a SIGKILL land while the restarted worker is still starting (nothing under "
        "way), as runs before 2026-12-06 did; by default each waits for the worker's calls",
    )
    parser.add_argument("--latency-ms", type=float, default=20.0, help="SMS answer delay")
    parser.add_argument("--zombie-sends", type=int, default=3000, help="SMS of the sigstop phase")
    parser.add_argument(
        "--zombie-latency-ms", type=float, default=200.0, help="SMS answer delay (sigstop)"
    )
    parser.add_argument("--in-flight", type=int, default=64, help="sends in flight per worker")
    parser.add_argument("--partitions", type=int, default=6, help="partitions per topic")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per wait")
    args = parser.parse_args(argv)
    if args.sends < args.kills + 2 or args.zombie_sends < 1:
        parser.error("--sends must exceed --kills + 1, --zombie-sends positive")
    bench = stack.Stack(
        home=HOME,
        ports=PORTS,
        partitions=args.partitions,
        extra_env={
            "WAYPOST_MAX_IN_FLIGHT": str(args.in_flight),
            "WAYPOST_SMS_CALLBACK_DELAY": str(SMS_CALLBACK_DELAY),
        },
    )
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    began = time.perf_counter()
    client = connect_blocking(CommonSettings(mongo_url=bench.mongo_url), "waypost-bench")
    try:
        start_stack(bench)
        db = client["waypost"]
        store_templates(db)
        killed = sigkill_phase(bench, db, args)
        zombie = sigstop_phase(bench, db, args)
    finally:
        client.close()
        say("stopping the bench stack")
        bench.down()
    say(f"bench run time {time.perf_counter() - began:.0f}s")
    print(
        f"RESULT chaos_sends={killed.sends} duplicates={killed.duplicates} "
        f"unknown={killed.unknown} lost={killed.lost} unknown_pct={killed.unknown_pct:.2f} "
        f"receipted={killed.receipted} reconciled={killed.reconciled} "
        f"calls_at_kills={sum(killed.calls_at_kills)} "
        f"zombie_sends={zombie.sends} zombie_duplicates={zombie.duplicates} "
        f"zombie_unknown={zombie.unknown} zombie_lost={zombie.lost}",
        flush=True,
    )
    broken = killed.duplicates + killed.lost + zombie.duplicates + zombie.lost
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
