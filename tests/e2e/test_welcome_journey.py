"""A first journey end to end on the real stack: HTTP ingest -> Kafka -> segmenter -> orchestrator
-> dispatcher -> SMTP, including a SIGKILL of the orchestrator while an instance waits."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import (
    outbox,
    post,
    publish_journey,
    unique,
    wait_drained,
    wait_for,
    write_journey,
)

pytestmark = pytest.mark.e2e

WELCOME = Path(__file__).resolve().parents[2] / "examples" / "journeys" / "s02-welcome.yaml"


def _sign_up(stack: Any, user: str, email: str, name: str, message_id: str) -> None:
    identify = post(
        stack, "identify", {"userId": user, "traits": {"email": email, "first_name": name}}
    )
    assert identify.status_code == 200, identify.text
    track = post(
        stack,
        "track",
        {
            "userId": user,
            "event": "Registered",
            "messageId": message_id,
            "properties": {"plan": "pro"},
        },
    )
    assert track.status_code == 200, track.text
    assert track.json() == {"success": True}


@pytest.fixture(scope="module")
def welcome_published(stack: Any) -> None:
    publish_journey(stack, WELCOME)


def test_registered_event_sends_the_rendered_welcome_email(
    stack: Any, welcome_published: None
) -> None:
    user = unique("ann")
    email = f"{user}@example.com"
    _sign_up(stack, user, email, "Ann", unique("msg"))

    messages = wait_for(lambda: outbox(stack, to=email), what="the welcome email")

    assert messages[0]["subject"] == "Welcome to Acme, Ann!"
    assert "Hi Ann," in messages[0]["text"]
    assert "for the pro plan" in messages[0]["text"]
    assert "<b>pro</b>" in messages[0]["html"]
    assert messages[0]["headers"]["Message-ID"].endswith("@waypost.local>")


def test_same_message_id_posted_twice_sends_one_email(stack: Any, welcome_published: None) -> None:
    user = unique("bob")
    email = f"{user}@example.com"
    message_id = unique("msg")
    _sign_up(stack, user, email, "Bob", message_id)
    replay = post(stack, "track", {"userId": user, "event": "Registered", "messageId": message_id})
    assert replay.status_code == 200

    wait_for(lambda: outbox(stack, to=email), what="the welcome email")
    wait_drained(stack)

    assert len(outbox(stack, to=email)) == 1


def test_wait_then_reminder(stack: Any, tmp_path: Path) -> None:
    journey = unique("remind")
    trigger = f"Trial Started {journey}"
    publish_journey(stack, write_journey(tmp_path, journey, trigger, "3s"))
    user = unique("cat")
    email = f"{user}@example.com"
    post(stack, "identify", {"userId": user, "traits": {"email": email, "first_name": "Cat"}})
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200

    welcome = wait_for(lambda: outbox(stack, to=email), what="the welcome email")
    assert welcome[0]["subject"] == "Welcome Cat"
    reminder = wait_for(
        lambda: outbox(stack, to=email, subject_contains="Reminder"), what="the reminder"
    )
    assert reminder[0]["text"].strip() == "Still there, Cat?"


@pytest.mark.serial  # it kills the stack's orchestrator, which the other modules' journeys need
def test_orchestrator_killed_while_waiting_still_sends_the_reminder_once(
    stack: Any, tmp_path: Path
) -> None:
    journey = unique("durable")
    trigger = f"Trial Started {journey}"
    publish_journey(stack, write_journey(tmp_path, journey, trigger, "6s"))
    user = unique("dan")
    email = f"{user}@example.com"
    post(stack, "identify", {"userId": user, "traits": {"email": email, "first_name": "Dan"}})
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200
    wait_for(lambda: outbox(stack, to=email), what="the welcome email")

    stack.stop("orchestrator", signal.SIGKILL)
    assert stack.pid("orchestrator") is None
    stack.start_service("orchestrator")
    stack.wait_service("orchestrator")

    wait_for(
        lambda: outbox(stack, to=email, subject_contains="Reminder"),
        timeout=90,
        what="the reminder after the restart",
    )
    wait_drained(stack)
    subjects = sorted(m["subject"] for m in outbox(stack, to=email))
    assert subjects == ["Reminder for Dan", "Welcome Dan"]


def test_a_waiting_instance_sends_with_the_latest_profile(stack: Any, tmp_path: Path) -> None:
    journey = unique("fresh-profile")
    trigger = f"Trial Started {journey}"
    # The rename below must reach the instance before its wait ends, and it is posted only once
    # the welcome email is in the outbox, which on a loaded machine took more than 6 s.
    publish_journey(stack, write_journey(tmp_path, journey, trigger, "20s"))
    user = unique("eve")
    email = f"{user}@example.com"
    post(stack, "identify", {"userId": user, "traits": {"email": email, "first_name": "Eve"}})
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200
    wait_for(lambda: outbox(stack, to=email), what="the welcome email")

    renamed = post(stack, "identify", {"userId": user, "traits": {"first_name": "Evelyn"}})
    assert renamed.status_code == 200

    reminder = wait_for(
        lambda: outbox(stack, to=email, subject_contains="Reminder"), what="the reminder"
    )
    assert reminder[0]["subject"] == "Reminder for Evelyn"
