"""Reconciling an email without an answer against the provider's events of its Message-ID
(pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.dispatcher.channels.email.reconcile import (
    RETAINED,
    EmailEvent,
    EmailEvents,
    bare,
    message_id_header,
    parse_email_events,
    reconcile_email,
    vouches,
)
from services.dispatcher.domain import progress

BEGAN = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
SETTLE = timedelta(seconds=120)
LATER = BEGAN + timedelta(seconds=300)
OURS = message_id_header("m-1", "mail.example.com")


def event(message_id: str = OURS, kind: str = "accepted", at: float | None = None) -> EmailEvent:
    moment = None if at is None else datetime.fromtimestamp(at, UTC)
    return EmailEvent(f"ev-{kind}", kind, bare(message_id), moment)


def decide(*events: EmailEvent, now: datetime = LATER) -> Any:
    return reconcile_email(EmailEvents(events), OURS, BEGAN, now, SETTLE)


def item(message_id: str = "m-1@mail.example.com", kind: str = "accepted") -> dict[str, Any]:
    return {
        "id": "ev1",
        "event": kind,
        "timestamp": 1772442000.25,
        "recipient": "ann@example.com",
        "message": {"headers": {"message-id": message_id, "to": "ann@example.com"}},
    }


def test_the_message_id_header_is_the_same_for_every_try() -> None:
    assert OURS == "<m-1@mail.example.com>"
    assert bare(OURS) == "m-1@mail.example.com" == bare(" m-1@mail.example.com ")


def test_an_accepted_event_of_our_message_id_is_sent_under_that_id() -> None:
    found = decide(event())
    assert (found.outcome.kind, found.outcome.provider_id) == ("sent", OURS)
    assert (found.outcome.reason or "").startswith("reconciled")
    assert found.ask_at is None


def test_accepted_counts_however_soon_it_is_asked() -> None:
    assert decide(event(), now=BEGAN + timedelta(seconds=1)).outcome.kind == "sent"


def test_no_event_once_settled_proves_it_never_arrived() -> None:
    found = decide()
    assert found.outcome.kind == "retry"
    assert found.ask_at is None


def test_a_try_whose_start_is_not_known_is_never_taken_for_absent() -> None:
    found = reconcile_email(EmailEvents(()), OURS, None, LATER, SETTLE)
    assert found.outcome.kind == "unknown"
    assert found.ask_at is None
    assert reconcile_email(EmailEvents((event(),)), OURS, None, LATER, SETTLE).outcome.kind == (
        "sent"
    )


def test_absent_from_a_log_that_may_no_longer_hold_the_try_proves_nothing() -> None:
    old = BEGAN + RETAINED + timedelta(seconds=1)
    assert decide(now=old).outcome.kind == "unknown"
    assert decide(event(), now=old).outcome.kind == "sent"


def test_the_log_vouches_for_itself_by_a_message_it_shows_accepted() -> None:
    other = message_id_header("m-0", "mail.example.com")
    assert vouches(EmailEvents((event(other),)), other) is None
    not_shown = vouches(EmailEvents(()), other)
    assert not_shown is not None
    assert "events URL" in not_shown
    assert vouches(EmailEvents((event(other, kind="delivered"),)), other) is not None
    assert vouches("email events: HTTP 401", other) == "email events: HTTP 401"


def test_events_of_our_message_other_than_accepted_prove_it_never_arrived() -> None:
    assert decide(event(kind="rejected")).outcome.kind == "retry"


def test_no_event_asked_too_soon_stays_unknown_and_says_when_to_ask_again() -> None:
    found = decide(now=BEGAN + timedelta(seconds=30))
    assert found.outcome.kind == "unknown"
    assert found.ask_at == BEGAN + SETTLE


def test_an_answer_not_filtered_by_message_id_proves_nothing() -> None:
    # A provider that ignored the filter: its page of other messages says nothing of ours.
    found = decide(event("<other@mail.example.com>"))
    assert found.outcome.kind == "unknown"
    assert "not filtered" in (found.outcome.reason or "")
    assert found.ask_at is None
    # ... even when ours is among them: found is found.
    mixed = decide(event("<other@mail.example.com>"), event())
    assert mixed.outcome.kind == "unknown"


def test_an_answer_that_could_not_be_had_stays_unknown_with_its_reason() -> None:
    found = reconcile_email("email events: HTTP 503: busy", OURS, BEGAN, LATER, SETTLE)
    assert found.outcome.kind == "unknown"
    assert found.outcome.reason == "not reconciled: email events: HTTP 503: busy"


def test_a_mailgun_answer_is_read() -> None:
    answer = parse_email_events(200, {"items": [item(), item(kind="delivered")], "paging": {}})
    assert isinstance(answer, EmailEvents)
    assert [(e.event, e.message_id) for e in answer.events] == [
        ("accepted", "m-1@mail.example.com"),
        ("delivered", "m-1@mail.example.com"),
    ]
    assert answer.events[0].at == datetime.fromtimestamp(1772442000.25, UTC)
    angled = parse_email_events(200, {"items": [item("<m-1@mail.example.com>")]})
    assert isinstance(angled, EmailEvents)
    assert angled.events[0].message_id == "m-1@mail.example.com"


@pytest.mark.parametrize(
    ("status", "body", "says"),
    [
        (401, {"message": "Invalid private key"}, "HTTP 401: Invalid private key"),
        (503, None, "HTTP 503"),
        (200, None, "no items list"),
        (200, {"items": "none"}, "no items list"),
        (200, {"items": ["x"]}, "not an object"),
        (200, {"items": [{"event": "accepted", "message": {}}]}, "without its kind"),
        (200, {"items": [{"message": {"headers": {"message-id": "a@b"}}}]}, "without its kind"),
    ],
)
def test_an_answer_that_is_no_answer_says_why(
    status: int, body: dict[str, Any] | None, says: str
) -> None:
    answer = parse_email_events(status, body)
    assert isinstance(answer, str)
    assert says in answer


def test_an_unreadable_timestamp_is_kept_as_unknown_time() -> None:
    odd = {**item(), "timestamp": "yesterday"}
    answer = parse_email_events(200, {"items": [odd, {**item(), "timestamp": True}]})
    assert isinstance(answer, EmailEvents)
    assert [e.at for e in answer.events] == [None, None]
    assert reconcile_email(answer, OURS, BEGAN, LATER, SETTLE).outcome.kind == "sent"


def test_asked_before_the_provider_could_tell_is_asked_again_then_counted() -> None:
    again = progress.when_told(2, 0, BEGAN + SETTLE)
    assert again == progress.AskAgain(2, BEGAN + SETTLE, 1)
