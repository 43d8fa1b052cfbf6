"""Helpers for end-to-end tests: post events, read the outbox, wait on conditions with deadlines."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import yaml
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from shared.cli import publish
from shared.settings import CommonSettings
from shared.topics import READERS
from tests.waiting import wait_for as wait_for  # the end-to-end tests' poll, kept here

WRITE_KEY = "wp_dev_write_key"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def post(stack: Any, call: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{stack.ingest_url}/v1/{call}", json=body, auth=(WRITE_KEY, ""), timeout=30)


def outbox(stack: Any, **filters: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{stack.outbox_url}/messages", params=filters, timeout=60)
    answer.raise_for_status()
    messages: list[dict[str, Any]] = answer.json()["messages"]
    return messages


def publish_journey(stack: Any, path: Path) -> None:
    settings = CommonSettings(
        kafka_bootstrap=stack.bootstrap,
        mongo_url=stack.mongo_url,
        topic_partitions=stack.partitions,
    )
    assert publish(settings, [path]) == 0


# Consumer groups and what they read: the pipeline is drained when each has committed
# everything that is on its topics.
PIPELINE = {group: topics for groups in READERS.values() for group, topics in groups}


# How many rounds `wait_drained` waits at most: each round lets the records the stages wrote in
# the round before reach the next stage (events, contact events, send requests, reports, ...).
DRAIN_ROUNDS = 6
Position = tuple[str, str, int]  # consumer group, topic, partition


def _positions(bootstrap: str) -> dict[Position, tuple[int, int]]:
    """Each pipeline group's committed offset (-1: none yet) and end offset, per partition."""
    positions: dict[Position, tuple[int, int]] = {}
    for group, topics in PIPELINE.items():
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
        try:
            partitions = []
            for topic in topics:
                metadata = consumer.list_topics(topic, timeout=10)
                partitions += [TopicPartition(topic, p) for p in metadata.topics[topic].partitions]
            for tp in consumer.committed(partitions, timeout=10):
                _low, high = consumer.get_watermark_offsets(tp, timeout=10)
                positions[(group, tp.topic, tp.partition)] = (tp.offset, high)
        finally:
            consumer.close()
    return positions


def _caught_up(bootstrap: str, topic: str, partition: int, committed: int, end: int) -> bool:
    """The group committed every record before `end`.

    Topics written in transactions (events, retries, ...) hold commit markers, which count in
    the end offset but are no records: a group that handled every record may commit an offset
    just before a marker. Past the committed offset, the partition is therefore read (committed
    records only) for a record before `end`."""
    if end <= max(committed, 0):
        return True
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique("lag"),
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    deadline = time.monotonic() + 10
    try:
        start = committed if committed >= 0 else OFFSET_BEGINNING
        reader.assign([TopicPartition(topic, partition, start)])
        while time.monotonic() < deadline:
            message = reader.poll(1)
            if message is None:
                continue
            error = message.error()
            if error is None:
                return int(message.offset() or 0) >= end
            if error.code() == KafkaError._PARTITION_EOF:
                return True
    finally:
        reader.close()
    return False  # not read to its end in time: something is still there


def wait_drained(stack: Any, timeout: float = 180.0) -> None:
    """Every record written so far has been handled, and what that wrote in turn, and so on down
    the pipeline: each stage's groups committed everything on their topics.

    Other tests may write all the while (make test runs several at once), so the pipeline need
    not be idle at any one moment: each round waits for the end offsets seen at its start, and
    the next round for what was written meanwhile, until a round finds nothing new or the
    pipeline's depth is covered."""
    deadline = time.monotonic() + timeout
    targets: dict[Position, int] = {}
    for _round in range(DRAIN_ROUNDS):
        ends = {key: end for key, (_committed, end) in _retrying(stack, deadline).items()}
        if ends == targets:
            return
        targets = ends
        pending = set(targets)
        while pending:
            positions = _retrying(stack, deadline)
            pending = {
                key
                for key in pending
                if not _caught_up(stack.bootstrap, key[1], key[2], positions[key][0], targets[key])
            }
            if pending and time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for the pipeline to drain: "
                    f"{sorted(pending)[:5]} behind"
                )
            if pending:
                time.sleep(0.2)  # ask again; the deadline above bounds the whole wait


def _retrying(stack: Any, deadline: float) -> dict[Position, tuple[int, int]]:
    """The pipeline's positions. While a transactional worker's transaction holds offsets,
    Kafka may answer that the group's committed offsets are unstable (a timeout): ask again."""
    while True:
        try:
            return _positions(stack.bootstrap)
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # ask again; the deadline bounds it


def write_journey(tmp_path: Path, journey_id: str, trigger: str, wait: str) -> Path:
    """A welcome -> wait -> reminder journey with its own id, trigger and wait."""
    path = tmp_path / f"{journey_id}.yaml"
    path.write_text(
        f"""
journey:
  id: {journey_id}
  name: Test {journey_id}
  trigger: {{type: event, event: "{trigger}"}}
  steps:
    - {{id: welcome, type: send, template: {journey_id}-welcome}}
    - {{id: pause, type: wait, duration: {wait}}}
    - {{id: reminder, type: send, template: {journey_id}-reminder}}
templates:
  {journey_id}-welcome:
    subject: "Welcome {{{{ contact.first_name }}}}"
    text: "Hello {{{{ contact.first_name }}}}"
  {journey_id}-reminder:
    subject: "Reminder for {{{{ contact.first_name }}}}"
    text: "Still there, {{{{ contact.first_name }}}}?"
"""
    )
    return path


def filled_topic(bootstrap: str, prefix: str, partitions: list[int]) -> tuple[str, AdminClient]:
    """A new topic of two partitions holding one record per item of `partitions`, written to
    the partition it names (the value: the item's index); and the admin client that made it."""
    topic = unique(prefix)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(
        timeout=30
    )
    producer = Producer({"bootstrap.servers": bootstrap})
    for n, partition in enumerate(partitions):
        producer.produce(topic, value=str(n).encode(), partition=partition)
    assert producer.flush(30) == 0
    return topic, admin


def read_topic(bootstrap: str, topic: str) -> list[tuple[str | None, bytes | None]]:
    """Every record on the topic so far (key, value), partition by partition; of a topic
    written in transactions, the committed ones (the end offset counts commit markers too, so
    the partition's end is what the consumer reports as such)."""
    return [(key, value) for _partition, key, value in read_partitions(bootstrap, topic)]


def partitions_of(bootstrap: str, topic: str, key: str) -> set[int]:
    """The partitions of the topic that hold a record with this key."""
    return {p for p, k, _value in read_partitions(bootstrap, topic) if k == key}


def read_partitions(bootstrap: str, topic: str) -> list[tuple[int, str | None, bytes | None]]:
    """Like `read_topic`, each record with its partition."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique("reader"),
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    records: list[tuple[int, str | None, bytes | None]] = []
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        for partition in metadata.topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, partition, low)])
            position = low
            while position < high:
                message = consumer.poll(5)
                if message is None:
                    continue
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        break
                    continue
                position = message.offset() + 1
                key = message.key()
                decoded = key.decode() if key is not None else None
                records.append((partition, decoded, message.value()))
    finally:
        consumer.close()
    return records


def publish_inline(
    stack: Any,
    tmp_path: Path,
    journey_id: str,
    trigger: dict[str, Any],
    steps: list[dict[str, Any]],
    templates: dict[str, dict[str, str]] | None = None,
) -> None:
    """Write a small journey of the test's own to a file and publish it like any other."""
    definition: dict[str, Any] = {
        "journey": {"id": journey_id, "name": journey_id, "trigger": trigger, "steps": steps}
    }
    if templates:
        definition["templates"] = templates
    path = tmp_path / f"{journey_id}.yaml"
    path.write_text(yaml.safe_dump(definition, sort_keys=False))
    publish_journey(stack, path)


def shopper(stack: Any, name: str) -> tuple[str, str]:
    user = unique(name)
    email = f"{user}@example.com"
    answer = post(
        stack, "identify", {"userId": user, "traits": {"email": email, "first_name": name}}
    )
    assert answer.status_code == 200, answer.text
    return user, email
