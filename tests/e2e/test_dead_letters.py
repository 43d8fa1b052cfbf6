"""Poison records go to the dead-letter topic with a reason, and the pipeline keeps flowing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from shared.cli import main as waypost
from shared.contracts import DeadLetter, Event
from shared.deadletter import read_dead_letters
from shared.topics import DEAD_LETTER, EVENTS
from tests.e2e.helpers import outbox, post, publish_journey, unique, wait_for, write_journey

pytestmark = pytest.mark.e2e


def _dead_letters(bootstrap: str) -> list[DeadLetter]:
    return [stored.letter for stored in read_dead_letters(bootstrap)]


def test_poison_event_is_dead_lettered_and_the_contact_still_flows(
    stack: Any, tmp_path: Path
) -> None:
    user = unique("poison")
    journey = unique("after-poison")
    trigger = f"Poison Check {journey}"
    publish_journey(stack, write_journey(tmp_path, journey, trigger, "1h"))
    producer = Producer({"bootstrap.servers": stack.bootstrap})
    garbage = json.dumps({"type": "track", "userId": user, "note": "no messageId, no timestamp"})
    producer.produce(EVENTS.name, key=user.encode(), value=garbage.encode())
    producer.produce(EVENTS.name, key=user.encode(), value=b"\xff not json")
    assert producer.flush(10) == 0

    email = f"{user}@example.com"
    post(stack, "identify", {"userId": user, "traits": {"email": email, "first_name": "Pat"}})
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200
    wait_for(lambda: outbox(stack, to=email), what="the email sent after the poison records")

    def poisoned() -> list[DeadLetter] | None:
        letters = [d for d in _dead_letters(stack.bootstrap) if d.key == user]
        return letters if len(letters) == 2 else None

    letters = wait_for(poisoned, what="two dead letters")
    assert {d.service for d in letters} == {"segmenter"}
    assert all(d.topic == EVENTS.name for d in letters)
    assert any("messageId" in d.reason or "message_id" in d.reason for d in letters)
    assert any("undecodable" in d.reason for d in letters)


def test_dead_letters_are_listed_and_replayed_into_their_topic(
    stack: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A letter left by an earlier failure (written here as a service would have written it)
    is listed by `waypost dead-letters list` and, once replayed, processed like any event."""
    user = unique("replayed")
    journey = unique("after-replay")
    trigger = f"Replay Check {journey}"
    publish_journey(stack, write_journey(tmp_path, journey, trigger, "1h"))
    email = f"{user}@example.com"
    post(stack, "identify", {"userId": user, "traits": {"email": email, "first_name": "Rae"}})
    event = Event.model_validate(
        {
            "type": "track",
            "event": trigger,
            "userId": user,
            "messageId": unique("msg"),
            "timestamp": "2026-01-01T00:00:00Z",
            "receivedAt": "2026-01-01T00:00:00Z",
        }
    )
    letter = DeadLetter(
        service="segmenter",
        topic=EVENTS.name,
        partition=0,
        offset=0,
        key=user,
        value=event.to_wire().decode(),
        reason="DeliveryFailed: broker unreachable (written by an older version)",
        at=event.timestamp,
    )
    producer = Producer({"bootstrap.servers": stack.bootstrap})
    producer.produce(DEAD_LETTER.name, key=user.encode(), value=letter.to_wire())
    assert producer.flush(10) == 0
    monkeypatch.setenv("WAYPOST_KAFKA_BOOTSTRAP", stack.bootstrap)

    def listed() -> list[dict[str, Any]] | None:
        capsys.readouterr()
        assert waypost(["dead-letters", "list", "--key", user, "--json"]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        return rows or None

    (row,) = wait_for(listed, what="the letter in `waypost dead-letters list`")
    assert row["reason"].startswith("DeliveryFailed")
    assert row["topic"] == EVENTS.name
    assert outbox(stack, to=email) == []

    assert waypost(["dead-letters", "replay"]) == 2, "replay without a filter is refused"
    assert waypost(["dead-letters", "replay", "--position", row["position"]]) == 0
    assert "replayed 1 dead letters" in capsys.readouterr().out
    sent = wait_for(lambda: outbox(stack, to=email), what="the email of the replayed event")
    assert len(sent) == 1


def test_letters_written_in_a_transaction_are_read_to_the_partitions_end(stack: Any) -> None:
    """The dispatcher dead-letters inside its Kafka transactions: the commit marker after the
    letter takes an offset no record is read at, and an open transaction's letters are not
    readable yet. Listing reads to each partition's end all the same."""
    user = unique("in-transaction")
    letter = DeadLetter(
        service="dispatcher",
        topic=EVENTS.name,
        partition=0,
        offset=0,
        key=user,
        value="{}",
        reason="retries_exhausted after 5 attempts: a test letter",
        at="2026-01-01T00:00:00Z",
    )
    committed = Producer(
        {"bootstrap.servers": stack.bootstrap, "transactional.id": unique("dl-committed")}
    )
    committed.init_transactions(30)
    committed.begin_transaction()
    committed.produce(DEAD_LETTER.name, key=user.encode(), value=letter.to_wire())
    committed.commit_transaction(30)
    # Another transaction left open on the same partition (the same key) while the list is read.
    held = Producer({"bootstrap.servers": stack.bootstrap, "transactional.id": unique("dl-open")})
    held.init_transactions(30)
    held.begin_transaction()
    pending = letter.model_copy(update={"reason": "not committed yet"})
    held.produce(DEAD_LETTER.name, key=user.encode(), value=pending.to_wire())
    assert held.flush(10) == 0
    try:
        mine = [d for d in _dead_letters(stack.bootstrap) if d.key == user]
        assert [d.reason for d in mine] == [letter.reason]
    finally:
        held.abort_transaction(30)
