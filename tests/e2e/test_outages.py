"""Outages lose nothing: the broker, then the document store, goes away for longer than the
clients' timeouts while shoppers keep posting, and every acknowledged shopper still gets exactly
one email, with nothing dead-lettered. So does a dispatcher fenced by another producer of its
transactional id, three times over, and none of its messages is left with an unknown outcome.

The traffic behaves like a client SDK: it posts one shopper at a time and repeats a call that was
not acknowledged (a 503 while the broker is away, a refused connection) until it is.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Producer

from shared.deadletter import read_dead_letters
from tests.e2e.helpers import WRITE_KEY, outbox, publish_inline, unique, wait_drained, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]
ADMIN = {"Authorization": "Bearer wp_dev_admin_key"}

# Longer than every client deadline in the pipeline: the producers' 30 s message timeout and the
# document store's 10 s operation deadline.
BROKER_DOWN_SECONDS = 40.0
STORE_DOWN_SECONDS = 25.0


class Traffic(threading.Thread):
    """Shoppers who identify and then track `trigger`, one after the other, until stopped."""

    def __init__(self, stack: Any, run: str, trigger: str) -> None:
        super().__init__(daemon=True)
        self.stack, self.run_id, self.trigger = stack, run, trigger
        self.acknowledged: list[str] = []
        self.refused = 0
        self.stopping = threading.Event()

    def _post(self, client: httpx.Client, call: str, body: dict[str, Any]) -> bool:
        """Whether the call was acknowledged before the traffic stopped."""
        while not self.stopping.is_set():
            try:
                if client.post(f"/v1/{call}", json=body).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            self.refused += 1
            self.stopping.wait(0.5)  # an SDK's pause before it repeats the call
        return False

    def run(self) -> None:
        with httpx.Client(
            base_url=self.stack.ingest_url, auth=(WRITE_KEY, ""), timeout=45
        ) as client:
            n = 0
            while not self.stopping.is_set():
                user = f"{self.run_id}-{n}"
                email = f"{user}@outage.example.com"
                # Like an SDK, each call keeps its messageId when repeated: a repeat of a call
                # whose answer was lost folds into the first.
                identify = {
                    "userId": user,
                    "messageId": f"{user}-identify",
                    "traits": {"email": email, "first_name": "Oti"},
                }
                track = {"userId": user, "messageId": f"{user}-track", "event": self.trigger}
                if self._post(client, "identify", identify) and self._post(client, "track", track):
                    self.acknowledged.append(email)
                n += 1


def _outage(
    stack: Any,
    tmp_path: Path,
    name: str,
    take_down: Callable[[], None],
    bring_back: Callable[[], None],
    down_for: float,
    noticed: Callable[[Traffic], bool],
) -> tuple[str, int]:
    """The run's name (its journey's id), and how many shoppers were acknowledged."""
    run = unique(name)
    trigger = f"Outage Check {run}"
    publish_inline(
        stack,
        tmp_path,
        run,
        {"type": "event", "event": trigger},
        [{"id": "hello", "type": "send", "template": f"{run}-mail"}],
        {f"{run}-mail": {"subject": f"Hello {run}", "text": "Hello {{ contact.first_name }}"}},
    )

    def arrived() -> Counter[str]:
        return Counter(
            address
            for message in outbox(stack, channel="email", subject_contains=f"Hello {run}")
            for address in message["to"]
        )

    traffic = Traffic(stack, run, trigger)
    traffic.start()
    down = False
    try:
        try:
            wait_for(lambda: len(arrived()) >= 10, timeout=120, what="emails flowing before")
        except AssertionError as exc:
            # Which stage held them: were the calls acknowledged, did the journey see them?
            raise AssertionError(
                f"{exc}; {_where_they_stand(stack, run, traffic, arrived())}"
            ) from None
        take_down()
        down = True
        went_down = time.monotonic()
        # The outage lasts longer than the clients' deadlines, and the clients notice it.
        wait_for(lambda: noticed(traffic), timeout=down_for + 60, what="clients noticing")
        wait_for(
            lambda: time.monotonic() - went_down >= down_for,
            timeout=down_for + 60,
            what="the outage to outlast the client deadlines",
        )
        bring_back()
        down = False
        during = len(traffic.acknowledged)
        wait_for(
            lambda: len(traffic.acknowledged) >= during + 10,
            timeout=180,
            what="shoppers acknowledged again after the outage",
        )
    finally:
        traffic.stopping.set()
        traffic.join(timeout=60)
        if down:
            bring_back()  # the stack outlives this test
    expected = set(traffic.acknowledged)
    try:
        wait_for(
            lambda: expected <= set(arrived()),
            timeout=300,
            what=f"an email for each of the {len(expected)} acknowledged shoppers",
        )
    except AssertionError as exc:
        # Where the missing shoppers stand: did the journey take them, what says the ledger?
        missing = sorted(expected - set(arrived()))
        why = _why_missing(stack, missing)
        raise AssertionError(f"{exc}; {len(missing)} missing: {why}") from None
    wait_drained(stack, timeout=300)

    def entered() -> int:
        return (_journey_stats(stack, run) or {}).get("entered", 0)

    # The admin's journey-log view followed through the outage too.
    wait_for(lambda: entered() == len(expected), timeout=120, what="the journey log complete")
    copies = arrived()
    assert {a: n for a, n in copies.items() if n > 1} == {}, "nobody gets an email twice"
    letters = [s.letter for s in read_dead_letters(stack.bootstrap)]
    assert [d for d in letters if d.key and d.key.startswith(run)] == []
    for service in ("segmenter", "orchestrator", "dispatcher", "ingest", "admin"):
        assert stack.pid(service) is not None, f"{service} did not outlive the {name}"
    print(
        f"\n{name}: {len(expected)} shoppers acknowledged, {traffic.refused} calls repeated "
        f"during the outage, every email delivered once"
    )
    return run, len(expected)


def _journey_stats(stack: Any, run: str) -> dict[str, int] | None:
    """The admin's counts of the run's journey (None: none yet)."""
    answer = httpx.get(f"{stack.admin_url}/v1/stats", headers=ADMIN, timeout=30)
    journeys: dict[str, dict[str, int]] = answer.json()["journeys"]
    return journeys.get(run)


def _why_missing(stack: Any, missing: list[str], shown: int = 3) -> str:
    """The first few missing shoppers' journey records and ledger entries, for a failure
    message (each shopper's contact key is the address's local part)."""
    lines = []
    for address in missing[:shown]:
        key = address.split("@")[0]
        try:
            log, ledger = (
                httpx.get(
                    f"{stack.admin_url}{path}",
                    params={"contact_key": key},
                    headers=ADMIN,
                    timeout=30,
                ).json()
                for path in ("/v1/journey-log", "/v1/messages")
            )
        except (httpx.HTTPError, ValueError) as exc:
            lines.append(f"{key}: unreadable ({exc!r})")
            continue
        steps = [(r.get("kind"), r.get("step_id"), r.get("reason")) for r in log.get("records", [])]
        states = [
            (m.get("state"), m.get("attempt"), m.get("reason")) for m in ledger.get("messages", [])
        ]
        lines.append(f"{key}: journey log {steps}, ledger {states}")
    return "; ".join(lines)


def _where_they_stand(stack: Any, run: str, traffic: Traffic, emails: Counter[str]) -> str:
    """The traffic's and the journey's counts, for a failure message."""
    journey: object
    try:
        journey = _journey_stats(stack, run)
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        journey = f"unreadable ({exc!r})"
    return (
        f"{len(traffic.acknowledged)} shoppers acknowledged, {traffic.refused} calls repeated, "
        f"{len(emails)} emails, journey stats {journey}"
    )


def test_a_broker_outage_loses_nothing_and_sends_nothing_twice(stack: Any, tmp_path: Path) -> None:
    def take_down() -> None:
        stack.stop("kafka")

    def bring_back() -> None:
        stack.start_kafka()
        stack.wait_kafka()

    def noticed(traffic: Traffic) -> bool:
        """The ingest API refused a call it could not get acknowledged (a 503)."""
        return traffic.refused > 0

    _outage(stack, tmp_path, "broker-outage", take_down, bring_back, BROKER_DOWN_SECONDS, noticed)


def test_a_document_store_outage_loses_nothing_and_sends_nothing_twice(
    stack: Any, tmp_path: Path
) -> None:
    def take_down() -> None:
        stack.stop("ferretdb")

    def bring_back() -> None:
        stack.start_ferretdb()
        stack.wait_mongo()

    def noticed(_traffic: Traffic) -> bool:
        """The admin API answers, within its deadline, that the store is unavailable."""
        started = time.monotonic()
        answer = httpx.get(f"{stack.admin_url}/v1/stats", headers=ADMIN, timeout=30)
        assert time.monotonic() - started < 20, "a store call hung past its deadline"
        return answer.status_code >= 500

    _outage(stack, tmp_path, "store-outage", take_down, bring_back, STORE_DOWN_SECONDS, noticed)


# The running dispatcher's transactional id: `transactional_config` names it after the app and
# the worker, and the local stack names its first worker after the service.
DISPATCHER_TRANSACTIONAL_ID = "waypost-dispatcher-dispatcher"
FENCES = 3


def test_a_fenced_dispatcher_starts_over_and_sends_nothing_twice(
    stack: Any, tmp_path: Path
) -> None:
    """Another producer registers the dispatcher's transactional id while it sends, three
    times: each time the broker fences the running producer (librdkafka's fatal error, raised
    by whichever call or poll meets it first). The dispatcher starts over with a new producer,
    every acknowledged shopper still gets exactly one email, and the calls under way at each
    fence conclude with their own answers: no message of the run ends `unknown`."""
    log = stack.logfile("dispatcher")

    def logged(event: str) -> int:
        text: str = log.read_text(errors="replace")
        return text.count(f'"event": "{event}"')

    noticed_fences = 0

    def grew(event: str, before: int) -> bool:
        return logged(event) > before

    def take_down() -> None:
        nonlocal noticed_fences
        for n in range(FENCES):
            fenced, restored = logged("stream.fenced"), logged("stream.tables_restored")
            newer = Producer(
                {
                    "bootstrap.servers": stack.bootstrap,
                    "transactional.id": DISPATCHER_TRANSACTIONAL_ID,
                }
            )
            newer.init_transactions(60)  # the running dispatcher's epoch is now stale
            wait_for(
                partial(grew, "stream.fenced", fenced),
                timeout=120,
                what=f"the dispatcher noticing fence {n + 1}",
            )
            # Its start-over registers the id again (fencing `newer` in turn) before it joins
            # its group and restores its tables: only then can the next fence come after it.
            wait_for(
                partial(grew, "stream.tables_restored", restored),
                timeout=120,
                what=f"the dispatcher starting over after fence {n + 1}",
            )
            noticed_fences += 1

    def noticed(_traffic: Traffic) -> bool:
        return noticed_fences == FENCES

    run, shoppers = _outage(
        stack, tmp_path, "fenced-dispatcher", take_down, lambda: None, 0.0, noticed
    )

    def funnel() -> dict[str, Any] | None:
        answer = httpx.get(f"{stack.admin_url}/v1/delivery/funnel", headers=ADMIN, timeout=30)
        mine = [f for f in answer.json()["funnels"] if f["journey_id"] == run]
        return mine[0] if mine else None

    # The calls under way at each fence ran to their end, and what they answered concluded
    # their tries: none is left `unknown`, none unconcluded.
    def concluded() -> bool:
        found = funnel()
        return (
            found is not None
            and found["stages"]["sent"] >= shoppers
            and not found["unknown"]
            and not found["in_flight"]
        )

    try:
        wait_for(concluded, timeout=120, what=f"every one of the {shoppers} messages sent")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; funnel {funnel()}") from None
