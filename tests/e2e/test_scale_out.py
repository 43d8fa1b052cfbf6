"""Scale-out on the real stack: two workers of the segmenter and of the orchestrator share the
partitions; one of each is SIGKILLed mid-stream. Its partitions move to the survivor, counts end
exact, nothing is lost, and every journey step sends one message (docs/stream-processing.md)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from tests.e2e.helpers import outbox, post, publish_journey, unique, wait_drained, wait_for
from tests.e2e.test_segmenter import counts, profiles, publish_segments, wait_count

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

WELCOME = Path(__file__).resolve().parents[2] / "examples" / "journeys" / "s02-welcome.yaml"
SHOPPERS = 80


def members(stack: Any, group: str) -> int:
    admin = AdminClient({"bootstrap.servers": stack.bootstrap})
    described = admin.describe_consumer_groups([group])[group].result(timeout=10)
    return len(described.members) if str(described.state).endswith("STABLE") else 0


def test_two_workers_each_lose_one_mid_stream_and_end_exact(stack: Any) -> None:
    publish_journey(stack, WELCOME)
    tag = unique("scale")
    pings, segment, name = f"{tag}-pings", f"{tag}-seg", f"Ping {tag}"
    publish_segments(
        stack,
        [{"id": pings, "event": name}],
        [{"id": segment, "condition": {"field": f"aggregates.{pings}", "op": "gte", "value": 3}}],
    )
    wait_count(stack, segment, 0)
    for service in ("segmenter", "orchestrator"):
        stack.start_service(service, worker=2)
    try:
        for group in ("waypost-segmenter", "waypost-orchestrator"):
            wait_for(lambda g=group: members(stack, g) == 2, timeout=120, what=f"{group} x2")
        shoppers = {unique("shopper"): n % 6 for n in range(SHOPPERS)}
        calls: list[dict[str, Any]] = []
        for user, n in shoppers.items():
            calls.append({"type": "identify", "userId": user, "traits": _traits(user)})
            calls.append({"type": "track", "userId": user, "event": "Registered"})
            calls += [
                {"type": "track", "userId": user, "event": name, "messageId": f"{user}-{i}"}
                for i in range(n)
            ]

        def send_all() -> None:
            for start in range(0, len(calls), 8):
                answer = post(stack, "batch", {"batch": calls[start : start + 8]})
                assert answer.status_code == 200, answer.text

        sender = threading.Thread(target=send_all)
        sender.start()
        # The kills land while both workers still have the stream's backlog in hand.
        wait_for(lambda: counts(stack).get(segment, 0) > 0, timeout=120, what="first members")
        stack.stop("segmenter-2", signal.SIGKILL)
        stack.stop("orchestrator", signal.SIGKILL)
        sender.join(timeout=300)
        assert not sender.is_alive()

        expected = sorted(user for user, n in shoppers.items() if n >= 3)
        wait_count(stack, segment, len(expected), timeout=180)
        for user in shoppers:
            wait_for(
                lambda u=user: outbox(stack, to=_email(u)), timeout=180, what=f"welcome {user}"
            )
        wait_drained(stack, timeout=180)
        assert counts(stack)[segment] == len(expected)
        latest = profiles(stack)
        for user, n in shoppers.items():
            found = latest.get(user)
            assert found is not None, user
            assert found.aggregates[pings] == n, (user, found.aggregates)
            assert (segment in found.segments) == (n >= 3)
            # One message for the journey's one send step, whatever moved under it.
            assert len(outbox(stack, to=_email(user))) == 1, user
    finally:
        stack.start_service("orchestrator")
        for extra in stack.extra_workers():
            stack.stop(extra)
        stack.wait_service("orchestrator")
        stack.wait_service("segmenter")


def _email(user: str) -> str:
    return f"{user}@example.com"


def _traits(user: str) -> dict[str, str]:
    return {"email": _email(user), "first_name": user.split("-")[1][:4]}
