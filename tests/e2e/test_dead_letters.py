"""Poison records go to the dead-letter topic with a reason, and the pipeline keeps flowing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from shared.contracts import DeadLetter
from shared.topics import DEAD_LETTER, EVENTS
from tests.e2e.helpers import outbox, post, publish_journey, unique, wait_for, write_journey

pytestmark = pytest.mark.e2e


def _dead_letters(bootstrap: str) -> list[DeadLetter]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique("dlq-reader"),
            "enable.auto.commit": False,
        }
    )
    try:
        metadata = consumer.list_topics(DEAD_LETTER.name, timeout=10)
        partitions = [
            TopicPartition(DEAD_LETTER.name, p, OFFSET_BEGINNING)
            for p in metadata.topics[DEAD_LETTER.name].partitions
        ]
        consumer.assign(partitions)
        ends = {p.partition: consumer.get_watermark_offsets(p, timeout=10)[1] for p in partitions}
        records: list[DeadLetter] = []
        done = {p for p, end in ends.items() if end == 0}
        while len(done) < len(ends):
            msg = consumer.poll(1.0)
            if msg is None or msg.error():
                continue
            records.append(DeadLetter.model_validate_json(msg.value() or b""))
            if (msg.offset() or 0) + 1 >= ends[msg.partition() or 0]:
                done.add(msg.partition() or 0)
        return records
    finally:
        consumer.close()


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
