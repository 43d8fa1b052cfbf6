"""The public write key can only report behaviour: the events Waypost emits are refused at the
edge, and a forged one that reaches the events topic anyway changes nothing and is dead-lettered.
Consent changes come only through signed links or the admin API."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Producer

from shared.contracts import Event
from shared.deadletter import read_dead_letters
from shared.topics import EVENTS
from tests.e2e.helpers import outbox, post, publish_journey, unique, wait_for, write_journey

pytestmark = pytest.mark.e2e
ADMIN = {"Authorization": "Bearer wp_dev_admin_key"}


def _contact(stack: Any, user: str) -> dict[str, Any] | None:
    answer = httpx.get(f"{stack.admin_url}/v1/contacts/{user}", headers=ADMIN, timeout=10)
    return answer.json() if answer.status_code == 200 else None


def test_forged_system_events_change_nothing_and_consent_changes_through_the_admin(
    stack: Any, tmp_path: Path
) -> None:
    journey = unique("genuine")
    trigger = f"Genuine Check {journey}"
    publish_journey(stack, write_journey(tmp_path, journey, trigger, "1h"))
    user = unique("target")
    email = f"{user}@example.com"
    post(stack, "identify", {"userId": user, "traits": {"email": email, "first_name": "Sam"}})
    wait_for(lambda: _contact(stack, user), what="the contact's stored profile")

    # The edge refuses the names, naming the field.
    refused = post(stack, "track", {"userId": user, "event": "Unsubscribed"})
    assert refused.status_code == 400
    assert refused.json()["field"] == "event"

    # A producer that bypasses ingest (a misconfigured client with broker access) gets nowhere.
    now = datetime.now(UTC)
    forged = [
        Event(
            type="track",
            event=name,
            user_id=user,
            message_id=unique("forged"),
            timestamp=now,
            received_at=now,
            properties={"channel": "all"},
            source="web",
        )
        for name in ("Unsubscribed", "Contact Forgotten")
    ]
    producer = Producer({"bootstrap.servers": stack.bootstrap})
    for event in forged:
        producer.produce(EVENTS.name, key=user.encode(), value=event.to_wire())
    assert producer.flush(10) == 0

    def letters() -> list[str] | None:
        reasons = [
            s.letter.reason for s in read_dead_letters(stack.bootstrap) if s.letter.key == user
        ]
        return reasons if len(reasons) == 2 else None

    reasons = wait_for(letters, what="the forged events dead-lettered")
    assert all("only Waypost emits" in r and "'web'" in r for r in reasons), reasons
    assert {r.split("'")[1] for r in reasons} == {"Unsubscribed", "Contact Forgotten"}

    # Still subscribed, still there: the journey's first email arrives.
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200
    wait_for(lambda: outbox(stack, to=email), what="the email to the contact the forgery spared")
    contact = _contact(stack, user)
    assert contact is not None
    assert contact.get("consent", {}).get("email") is not False

    # An operator withdraws consent through the admin API: a Waypost source, so it counts.
    answer = httpx.put(
        f"{stack.admin_url}/v1/contacts/{user}/consent",
        json={"channel": "email", "subscribed": False},
        headers=ADMIN,
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["event"] == "Unsubscribed"
    wait_for(
        lambda: (_contact(stack, user) or {}).get("consent", {}).get("email") is False,
        what="email consent withdrawn by the admin call",
    )
    bad = httpx.put(
        f"{stack.admin_url}/v1/contacts/{user}/consent",
        json={"channel": "fax", "subscribed": True},
        headers=ADMIN,
        timeout=10,
    )
    assert bad.status_code == 422
    assert "channel" in bad.text
