"""The orchestrator's clocks on the real stack: an audience journey's run is requested from every
partition and recorded as progress; a segment timer comes back as a `reevaluate` command."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from services.orchestrator.domain.audiences import run_id
from shared.clock import SystemClock
from shared.contracts import AudienceRequest, ContactCommand, SegmentTimerRequest
from shared.ids import stable_id
from shared.topics import AUDIENCE_REQUESTS, AUDIENCE_RUNS, CONTACT_COMMANDS, SEGMENT_TIMERS
from tests.e2e.helpers import publish_journey, unique, wait_for

pytestmark = pytest.mark.e2e


class TopicReader:
    """Reads every partition of a topic from the beginning, keeping (partition, key, value)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": unique("reader"),
                "enable.auto.commit": False,
            }
        )
        metadata = self._consumer.list_topics(topic, timeout=10)
        self.partitions = sorted(metadata.topics[topic].partitions)
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in self.partitions])
        self.records: list[tuple[int, str | None, bytes]] = []

    def read(self) -> list[tuple[int, str | None, bytes]]:
        """Everything read so far, after taking what has arrived since the last call."""
        for message in self._consumer.consume(500, timeout=0.2):
            if message.error() is None:
                key = message.key()
                self.records.append(
                    (int(message.partition() or 0), key.decode() if key else None, message.value())
                )
        return self.records

    def close(self) -> None:
        self._consumer.close()


def produce(bootstrap: str, topic: str, key: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    for value in values:
        producer.produce(topic, key=key.encode(), value=value)
    assert producer.flush(30) == 0


def audience_journey(tmp_path: Path, journey_id: str, start_at: datetime) -> Path:
    path = tmp_path / f"{journey_id}.yaml"
    path.write_text(
        f"""
journey:
  id: {journey_id}
  name: Audience {journey_id}
  trigger:
    type: audience
    segments: [{journey_id}-fans]
    mode: static
    start_at: "{start_at.isoformat()}"
  steps:
    - {{id: hello, type: send, template: {journey_id}-hello}}
templates:
  {journey_id}-hello: {{subject: "Hello", text: "Hello"}}
"""
    )
    return path


def test_an_audience_run_is_requested_on_every_partition_and_recorded(
    stack: Any, tmp_path: Path
) -> None:
    journey_id = unique("audience")
    start_at = (SystemClock().now() + timedelta(seconds=4)).replace(microsecond=0)
    requests = TopicReader(stack.bootstrap, AUDIENCE_REQUESTS.name)
    runs = TopicReader(stack.bootstrap, AUDIENCE_RUNS.name)
    try:
        publish_journey(stack, audience_journey(tmp_path, journey_id, start_at))

        def requested_everywhere() -> set[int] | None:
            found = {p for p, key, _v in requests.read() if key == journey_id}
            return found if found == set(requests.partitions) else None

        wait_for(requested_everywhere, timeout=60, what="the run requested on every partition")
        recorded = wait_for(
            lambda: [v for _p, key, v in runs.read() if key == journey_id],
            timeout=30,
            what="the run recorded on the progress topic",
        )
    finally:
        requests.close()
        runs.close()

    expected = run_id(journey_id, start_at)
    asked = {
        AudienceRequest.model_validate_json(v)
        for _p, key, v in requests.records
        if key == journey_id
    }
    assert {(r.journey_version, r.run_id, r.run_at, r.segments) for r in asked} == {
        (1, expected, start_at, (f"{journey_id}-fans",))
    }
    progress = AudienceRequest.model_validate_json(recorded[0])
    assert (progress.run_id, progress.run_at) == (expected, start_at)


def test_a_segment_timer_comes_back_as_one_reevaluate_command_at_its_latest_due_time(
    stack: Any,
) -> None:
    contact = unique("clock")
    now = SystemClock().now().replace(microsecond=0)
    first, replaced_by = now + timedelta(seconds=2), now + timedelta(seconds=4)
    commands = TopicReader(stack.bootstrap, CONTACT_COMMANDS.name)
    try:
        produce(
            stack.bootstrap,
            SEGMENT_TIMERS.name,
            contact,
            [
                SegmentTimerRequest(contact_key=contact, due_at=due, requested_at=now).to_wire()
                for due in (first, replaced_by)
            ],
        )
        answered = wait_for(
            lambda: [
                ContactCommand.model_validate_json(v)
                for _p, key, v in commands.read()
                if key == contact
            ],
            timeout=60,
            what="the reevaluate command",
        )
    finally:
        commands.close()

    # Both requests and any answer share the contact's partition, so an answer to the first
    # (replaced) request would have been read before this one.
    assert [(c.kind, c.reason, c.at) for c in answered] == [("reevaluate", "time", replaced_by)]
    assert answered[0].command_id == stable_id(contact, "segment-clock", replaced_by)
