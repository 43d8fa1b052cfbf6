"""An audience journey on the live pipeline: the orchestrator requests the run when it is due, the
segmenter selects the segment's members, and each member gets the message once, even when the
same run is requested again (as a rebalance overlap or a crash before the progress record would)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Producer

from shared.clock import SystemClock
from shared.contracts import AudienceRequest, Profile
from shared.segments import PublishedSegment, SegmentDefinition
from shared.topics import AUDIENCE_REQUESTS, AUDIENCE_RUNS, DEFINITIONS, PROFILES
from tests.e2e.helpers import (
    outbox,
    post,
    publish_journey,
    read_topic,
    unique,
    wait_drained,
    wait_for,
)

pytestmark = pytest.mark.e2e


def produce(bootstrap: str, records: list[tuple[str, str, bytes, int | None]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    for topic, key, value, partition in records:
        extra = {} if partition is None else {"partition": partition}
        producer.produce(topic, key=key.encode(), value=value, **extra)
    assert producer.flush(30) == 0


def contact(stack: Any, name: str, plan: str) -> tuple[str, str]:
    user = unique(name)
    email = f"{user}@example.com"
    traits = {"email": email, "first_name": name, "plan": plan}
    answer = post(stack, "identify", {"userId": user, "traits": traits})
    assert answer.status_code == 200, answer.text
    return user, email


def segments_of(stack: Any, users: list[str]) -> dict[str, tuple[str, ...]] | None:
    """The segments on each user's latest profile, once every user has a profile."""
    latest: dict[str, tuple[str, ...]] = {}
    for key, value in read_topic(stack.bootstrap, PROFILES.name):
        if key in users and value is not None:
            latest[key] = Profile.model_validate_json(value).segments
    return latest if set(latest) == set(users) else None


def test_a_static_audience_messages_each_member_once_even_if_the_run_is_asked_twice(
    stack: Any, tmp_path: Path
) -> None:
    plan, segment, journey_id = unique("plan"), unique("fans"), unique("announce")
    segment_record = PublishedSegment(
        segment=SegmentDefinition.model_validate(
            {"id": segment, "condition": {"field": "traits.plan", "op": "eq", "value": plan}}
        ),
        published_at=SystemClock().now(),
    )
    produce(
        stack.bootstrap,
        [(DEFINITIONS.name, segment_record.key, segment_record.model_dump_json().encode(), None)],
    )
    members = [contact(stack, "ann", plan), contact(stack, "ben", plan)]
    outsider = contact(stack, "cid", "other-plan")
    users = [user for user, _email in [*members, outsider]]

    def segmented() -> bool:
        found = segments_of(stack, users)
        return (
            found is not None
            and all(segment in found[user] for user, _email in members)
            and segment not in found[outsider[0]]
        )

    wait_for(segmented, timeout=90, what="the members in the segment, the outsider not")

    start_at = SystemClock().now().replace(microsecond=0) + timedelta(seconds=3)
    path = tmp_path / f"{journey_id}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "journey": {
                    "id": journey_id,
                    "name": journey_id,
                    "trigger": {
                        "type": "audience",
                        "segments": [segment],
                        "mode": "static",
                        "start_at": start_at.isoformat(),
                    },
                    "steps": [{"id": "news", "type": "send", "template": f"{journey_id}-news"}],
                },
                "templates": {
                    f"{journey_id}-news": {"subject": f"News {journey_id}", "text": "Hello"}
                },
            }
        )
    )
    publish_journey(stack, path)

    for _user, email in members:
        wait_for(lambda email=email: outbox(stack, to=email), timeout=90, what=f"mail to {email}")

    # The same run asked again on every partition: nobody enters twice.
    recorded = wait_for(
        lambda: [v for k, v in read_topic(stack.bootstrap, AUDIENCE_RUNS.name) if k == journey_id],
        timeout=30,
        what="the run's progress record",
    )
    assert recorded[-1] is not None
    request = AudienceRequest.model_validate_json(recorded[-1])
    produce(
        stack.bootstrap,
        [
            (AUDIENCE_REQUESTS.name, journey_id, request.to_wire(), partition)
            for partition in range(stack.partitions)
        ],
    )
    wait_drained(stack)

    for _user, email in members:
        assert [m["subject"] for m in outbox(stack, to=email)] == [f"News {journey_id}"]
    assert outbox(stack, to=outsider[1]) == []
    assert request.run_at == start_at
