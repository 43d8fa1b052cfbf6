"""Chaos: the dispatcher is SIGKILLed again and again while thousands of sends flow; and one of
two workers is stopped past its session while the other takes over, then resumed.

Afterwards every message has a final ledger state; every `sent` message is in the outbox exactly
once; a message reaches the outbox at most once; and the marketing messages a worker died on
mid-call (`unknown`) are counted: the unknown window, measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from pymongo import MongoClient
from pymongo.collection import Collection

from services.dispatcher.adapters.ledger_view import GROUP_ID as LEDGER_VIEW_GROUP
from shared.contracts import Profile, SendRequest
from shared.docstore import connect_blocking
from shared.settings import CommonSettings
from shared.topics import DISPATCHER_LEDGER_CHANGELOG, SEND_REQUESTS
from tests.e2e.helpers import outbox, read_topic, unique, wait_drained, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]
EMAILS, TEXTS, KILLS = 1500, 500, 4
ZOMBIE_TEXTS = 3000
# How long the sandbox holds each answer until the worker is stopped: far longer than the
# moment between reading a worker's calls under way and stopping it, far short of the
# dispatcher's 15 s provider timeout.
HELD_ANSWER_SECONDS = 4.0
# The states a message may end in here. `failed`: an overloaded machine let every attempt time
# out before the provider stored it, each proven by the provider's listing never to have
# arrived, until the attempts ran out (asserted: none of those reached the outbox).
FINAL = {"sent", "unknown", "delivered", "failed"}


def _request(run: str, n: int, channel: str, template: str, now: datetime) -> SendRequest:
    key = f"{run}-c{n}"
    traits: dict[str, Any] = (
        {"email": f"{key}@chaos.example.com"} if channel == "email" else {"phone": f"+4860{n:07d}"}
    )
    profile = Profile(
        contact_key=key, user_id=key, traits=traits, first_seen=now, last_seen=now, updated_at=now
    )
    return SendRequest(
        message_id=f"{run}-m{n}",
        contact_key=key,
        channel=channel,  # type: ignore[arg-type]
        template_id=template,
        journey_id=run,
        journey_version=1,
        instance_id=f"{run}-i{n}",
        step_id="send",
        requested_at=now,
        profile=profile,
    )


def _committed_settled(bootstrap: str) -> int:
    """`_committed`, asked again while Kafka does not answer in time."""
    count: list[int] = []

    def ask() -> bool:
        with contextlib.suppress(KafkaException):
            count.append(_committed(bootstrap))
        return bool(count)

    wait_for(ask, timeout=120, what="the dispatcher's committed offsets")
    return count[0]


def _committed(bootstrap: str) -> int:
    """Send requests the dispatcher's group has committed past, over every partition. Read
    uncommitted: a reader of committed records asks for stable offsets, which Kafka refuses
    for as long as a worker's transaction holds offsets of the partition (from a batch's first
    proof of ownership to its end, most of the time)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "waypost-dispatcher",
            "isolation.level": "read_uncommitted",
        }
    )
    try:
        topic = SEND_REQUESTS.name
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = [TopicPartition(topic, p) for p in metadata.topics[topic].partitions]
        return sum(max(tp.offset, 0) for tp in consumer.committed(partitions, timeout=10))
    finally:
        consumer.close()


def test_repeated_sigkill_loses_nothing_and_sends_nothing_twice(stack: Any) -> None:
    run = unique("chaos")
    client: MongoClient[dict[str, Any]] = connect_blocking(
        CommonSettings(mongo_url=stack.mongo_url), "tests"
    )
    try:
        _sigkill_run(stack, run, client)
    finally:
        client.close()


def _sigkill_run(stack: Any, run: str, client: MongoClient[dict[str, Any]]) -> None:
    db = client["waypost"]
    now = datetime.now(UTC)
    db["templates"].insert_many(
        [
            {
                "_id": f"{run}-email",
                "channel": "email",
                "subject": "Hi",
                "text": "Hello",
                "status": "ready",
            },
            {"_id": f"{run}-sms", "channel": "sms", "text": "Hello from Acme", "status": "ready"},
        ]
    )
    requests = [
        _request(
            run,
            n,
            "email" if n < EMAILS else "sms",
            f"{run}-email" if n < EMAILS else f"{run}-sms",
            now,
        )
        for n in range(EMAILS + TEXTS)
    ]
    before = _committed_settled(stack.bootstrap)
    producer = Producer({"bootstrap.servers": stack.bootstrap, "enable.idempotence": True})
    for request in requests:
        producer.produce(SEND_REQUESTS.name, key=request.contact_key, value=request.to_wire())
        producer.poll(0)
    assert producer.flush(30) == 0

    ledger = db["messages"]

    # Progress is read from the offsets the dispatcher committed (cheap), not from the ledger:
    # a commit moves only behind finished requests.
    def finished() -> int:
        return _committed(stack.bootstrap) - before

    # Kill whenever another slice of the work got done, so every kill lands mid-stream.
    for kill in range(KILLS):
        target = (kill + 1) * len(requests) // (KILLS + 2)
        wait_for(lambda t=target: finished() >= t, timeout=300, what=f"{target} finished")
        stack.stop("dispatcher", signal.SIGKILL)
        assert stack.pid("dispatcher") is None
        stack.start_service("dispatcher")

    wait_for(lambda: finished() == len(requests), timeout=600, what="every request committed")
    wait_drained(stack, timeout=300)

    # The `messages` collection is the ledger's view, written in bulk by its own consumer after
    # the dispatcher commits: it catches up within a deadline, it is not there at once.
    def states() -> Counter[str]:
        return Counter(doc["state"] for doc in ledger.find({"journey_id": run}, {"state": 1}))

    def all_final() -> bool:
        seen = states()
        return sum(seen.values()) == len(requests) and set(seen) <= FINAL

    try:
        wait_for(all_final, timeout=180, what="the ledger's view to show every message final")
    except AssertionError as exc:
        ids = {r.message_id for r in requests}
        raise AssertionError(f"{exc}: {_view_report(stack, ledger, run, ids)}") from exc

    mail = outbox(stack, channel="email", to_prefix=run)
    delivered_mail = Counter(m["headers"].get("X-Waypost-Message-Id") for m in mail)
    texts = outbox(stack, channel="sms", to_prefix="+4860000")
    numbers = {r.profile.traits.get("phone"): r.message_id for r in requests[EMAILS:]}
    delivered_texts = Counter(numbers[m["to"][0]] for m in texts if m["to"][0] in numbers)
    arrived = delivered_mail + delivered_texts
    assert max(arrived.values()) == 1, [m for m, c in arrived.items() if c > 1]
    by_state = {doc["_id"]: doc["state"] for doc in ledger.find({"journey_id": run}, {"state": 1})}
    for message_id, state in by_state.items():
        if state in ("sent", "delivered"):
            assert arrived[message_id] == 1, (message_id, state)
        if state == "failed":  # every attempt proven never to have arrived
            assert not arrived[message_id], (message_id, state)
    unknown = [m for m, s in by_state.items() if s == "unknown"]
    arrived_unknown = sum(1 for m in unknown if arrived[m])
    print(
        f"\n{len(requests)} sends, {KILLS} SIGKILLs: {len(unknown)} in the unknown "
        f"window ({arrived_unknown} of them had reached the provider), no duplicate"
    )


def _view_report(stack: Any, ledger: Collection[dict[str, Any]], run: str, ids: set[str]) -> str:
    """Why the ledger's view is not final, for a failure message: its states, then for a few
    messages it lacks or shows open, what the ledger's changelog (the dispatcher's own record)
    last says of them, and the view's warnings in the workers' logs."""
    shown = {doc["_id"]: doc for doc in ledger.find({"journey_id": run}, {"state": 1, "rev": 1})}
    states = Counter(str(doc["state"]) for doc in shown.values())
    final = FINAL
    odd = sorted(m for m in ids if m not in shown or shown[m]["state"] not in final)[:5]
    latest: dict[str, Any] = {}
    for key, value in read_topic(stack.bootstrap, DISPATCHER_LEDGER_CHANGELOG):
        if key in odd:
            latest[key] = json.loads(value) if value else None
    changelog = {
        m: (latest[m] or {}).get("state", "deleted") if m in latest else "absent" for m in odd
    }
    revs = {m: ((shown.get(m) or {}).get("rev"), (latest.get(m) or {}).get("rev")) for m in odd}
    warnings: Counter[str] = Counter()
    for log in sorted((stack.home / "logs").glob("dispatcher*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if "view" in line and ('"warning"' in line or '"error"' in line):
                with contextlib.suppress(ValueError, AttributeError):
                    warnings[str(json.loads(line).get("event"))] += 1
    return (
        f"view states {dict(states)} of {len(ids)}; open or missing in the view, with the "
        f"changelog's last state: {changelog}; (view rev, changelog rev): {revs}; view "
        f"warnings logged: {dict(warnings)}; {_view_offsets(stack, set(odd))}; "
        f"{_view_members(stack)}"
    )


def _view_members(stack: Any) -> str:
    """The view group as its coordinator sees it: state, and each member's partitions (a
    partition no member holds, or one held by a member that does not read it)."""
    try:
        described = _described(stack, LEDGER_VIEW_GROUP)
    except KafkaException as exc:
        return f"view group not described: {exc}"
    members = {
        f"{m.client_id}@{m.host}/{m.member_id[-6:]}": sorted(
            tp.partition for tp in (m.assignment.topic_partitions if m.assignment else [])
        )
        for m in described.members
    }
    return f"view group {described.state}: {members}"


def _view_offsets(stack: Any, odd: set[str]) -> str:
    """Where the odd messages' last changelog records stand against the view group's committed
    offsets and the partitions' ends: behind the commit (the view skipped or mis-wrote them) or
    past it (the view has not read them)."""
    topic = DISPATCHER_LEDGER_CHANGELOG
    reader = Consumer(
        {
            "bootstrap.servers": stack.bootstrap,
            "group.id": LEDGER_VIEW_GROUP,
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        partitions = [
            TopicPartition(topic, p)
            for p in reader.list_topics(topic, timeout=10).topics[topic].partitions
        ]
        committed = {tp.partition: tp.offset for tp in reader.committed(partitions, timeout=10)}
        ends = {tp.partition: reader.get_watermark_offsets(tp, timeout=10)[1] for tp in partitions}
        reader.assign([TopicPartition(topic, p, 0) for p in committed])
        at: dict[str, tuple[int | None, int | None]] = {}
        open_partitions = set(committed)
        while open_partitions:
            message = reader.poll(10)
            if message is None:
                break
            if message.error():
                open_partitions.discard(message.partition())
                continue
            raw = message.key()
            key = raw.decode() if isinstance(raw, bytes) else None
            if key in odd:
                at[key] = (message.partition(), message.offset())
        return f"odd records at (partition, offset) {at}; view committed {committed}; ends {ends}"
    except KafkaException as exc:
        return f"view offsets not read: {exc}"
    finally:
        reader.close()


def _log_events(log: Path, start: int, end: int | None) -> list[str]:
    """A worker's log lines between two positions, each as its event and what says most of it
    (runs of one event counted), for a failure message."""
    text = log.read_bytes()[start:end].decode(errors="replace")
    runs: list[list[Any]] = []  # [event, times in a row]
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            entry = {"event": line[:120]}
        if not isinstance(entry, dict):
            continue
        detail = entry.get("reason") or entry.get("error") or entry.get("partitions") or ""
        event = f"{entry.get('event')} {str(detail)[:80]}".strip()
        if runs and runs[-1][0] == event:
            runs[-1][1] += 1
        else:
            runs.append([event, 1])
    return [event if times == 1 else f"{event} (x{times})" for event, times in runs]


def _in_flight(metrics_url: str) -> float:
    """The provider calls one dispatcher worker has under way, from its metrics (the gauge
    has a line per channel that called)."""
    lines = [
        line
        for line in httpx.get(metrics_url, timeout=10).text.splitlines()
        if line.startswith("waypost_dispatcher_provider_calls_in_flight{")
    ]
    return sum(float(line.split()[-1]) for line in lines)


def _described(stack: Any, group: str) -> Any:
    """The group as its coordinator describes it (state, members, their assignments)."""
    admin = AdminClient({"bootstrap.servers": stack.bootstrap})
    return admin.describe_consumer_groups([group])[group].result(timeout=10)


def _members(stack: Any, group: str) -> int:
    described = _described(stack, group)
    return len(described.members) if str(described.state).endswith("STABLE") else 0


def test_a_worker_stopped_past_its_session_calls_no_provider_once_resumed(stack: Any) -> None:
    """Two workers share the requests; one is SIGSTOPped mid-batch, past its session timeout,
    while the other takes its partitions over and finishes everything; then it is resumed.
    The stopped worker's batch is fenced: it calls no provider for it, so no number gets an SMS
    twice, and every message ends in a final state."""
    run = unique("zombie")
    client: MongoClient[dict[str, Any]] = connect_blocking(
        CommonSettings(mongo_url=stack.mongo_url), "tests"
    )
    db = client["waypost"]
    now = datetime.now(UTC)
    template = f"{run}-sms"
    db["templates"].insert_one(
        {"_id": template, "channel": "sms", "text": "Hello from Acme", "status": "ready"}
    )
    # Numbers of their own: the SIGKILL test above texts +4860000nnnn for n below 2,000.
    requests = [
        _request(run, n, "sms", template, now) for n in range(10_000, 10_000 + ZOMBIE_TEXTS)
    ]
    # The first worker serves the metrics port.
    stack.start_service("dispatcher", worker=2, env={"WAYPOST_METRICS_PORT": "0"})
    # Until the stop, each provider answer takes seconds (short of the provider timeout), so a
    # call seen under way is nowhere near its end: the stop cannot land between a batch's last
    # answer and its commit, which would leave the resumed worker nothing to be fenced for (a
    # fresh-clone run with 0.2 s answers stopped a worker just there). After the stop, answers
    # take 0.2 s, so the survivor finishes in good time.
    latency = f"{stack.outbox_url}/control/latency"
    httpx.post(latency, json={"seconds": HELD_ANSWER_SECONDS}, timeout=30).raise_for_status()
    # No delivery reports: 3,000 status callbacks to ingest at once would slow the sandbox's
    # answers past the provider timeout, and the test is about the calls, not the reports.
    callbacks = f"{stack.outbox_url}/control/sms/callbacks"
    held = httpx.get(callbacks, timeout=30).json()["delay_seconds"]
    httpx.post(callbacks, json={"delay_seconds": 3600}, timeout=30).raise_for_status()
    try:
        wait_for(lambda: _members(stack, "waypost-dispatcher") == 2, timeout=120, what="2 workers")
        before = _committed_settled(stack.bootstrap)
        stopped = stack.pid("dispatcher")
        assert stopped is not None
        log = stack.logfile("dispatcher")
        log_start = log.stat().st_size
        producer = Producer({"bootstrap.servers": stack.bootstrap, "enable.idempotence": True})
        for request in requests:
            producer.produce(SEND_REQUESTS.name, key=request.contact_key, value=request.to_wire())
            producer.poll(0)
        assert producer.flush(30) == 0

        seen = [0]

        def finished() -> int:
            # The broker not answering in time: the last count.
            with contextlib.suppress(KafkaException):
                seen[0] = _committed(stack.bootstrap) - before
            return seen[0]

        # The first batch is done (its offsets are the first committed), and the worker to be
        # stopped has provider calls under way: the stop lands mid-batch, after a checkpoint.
        wait_for(lambda: finished() > 0, timeout=120, what="sends under way")
        metrics = f"http://127.0.0.1:{stack.ports.dispatcher_metrics}/metrics"
        wait_for(lambda: _in_flight(metrics) > 0, timeout=120, what="the worker's calls under way")
        os.kill(stopped, signal.SIGSTOP)
        httpx.post(latency, json={"seconds": 0.2}, timeout=30).raise_for_status()
        try:
            # The survivor takes the stopped worker's partitions once its session ends.
            wait_for(lambda: finished() == len(requests), timeout=300, what="all committed")
        finally:
            os.kill(stopped, signal.SIGCONT)
        resumed_at = log.stat().st_size
        # Resumed, the stopped worker finds its batch fenced and drops it.
        try:
            wait_for(
                lambda: "stream.fenced" in log.read_bytes()[log_start:].decode(errors="replace"),
                timeout=120,
                what="the resumed worker's batch fenced",
            )
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; the stopped worker logged, before the stop: "
                f"{_log_events(log, log_start, resumed_at)[-12:]}; after it: "
                f"{_log_events(log, resumed_at, None)[-25:]}"
            ) from exc
        wait_drained(stack, timeout=300)

        ledger = db["messages"]

        def concluded() -> Counter[str]:
            return Counter(doc["state"] for doc in ledger.find({"journey_id": run}, {"state": 1}))

        final = FINAL

        def all_concluded() -> bool:
            states = concluded()
            return sum(states.values()) == len(requests) and set(states) <= final

        try:
            wait_for(all_concluded, timeout=180, what="every message concluded")
        except AssertionError as exc:
            ids = {r.message_id for r in requests}
            raise AssertionError(f"{exc}: {_view_report(stack, ledger, run, ids)}") from exc
        numbers = {r.profile.traits.get("phone"): r.message_id for r in requests}
        texts = Counter(
            numbers[m["to"][0]]
            for m in outbox(stack, channel="sms", to_prefix="+4860001")
            if m["to"][0] in numbers
        )
        assert texts, "nothing was sent"
        assert max(texts.values()) == 1, [n for n, c in texts.items() if c > 1]
        by_state = {
            doc["_id"]: doc["state"] for doc in ledger.find({"journey_id": run}, {"state": 1})
        }
        # Sent means arrived; an unknown one may have (the provider and its listing did not
        # answer in time on this loaded machine); nothing arrived that the ledger denies.
        for message_id, state in by_state.items():
            if state in ("sent", "delivered"):
                assert texts[message_id] == 1, (message_id, state)
            if state == "failed":  # every attempt proven never to have arrived
                assert not texts[message_id], (message_id, state)
        assert set(texts) <= set(by_state)
        states = concluded()
        print(
            f"\n{len(requests)} sends, one worker stopped past its session: "
            f"{states.get('unknown', 0)} unknown, no duplicate"
        )
    finally:
        httpx.post(latency, json={"seconds": 0}, timeout=30)
        httpx.post(callbacks, json={"delay_seconds": held}, timeout=30)
        stack.stop("dispatcher-2")
        client.close()
