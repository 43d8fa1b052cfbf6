"""Reconciling an SMS without an answer against the provider's listing (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from services.dispatcher.channels.sms.reconcile import (
    CLOCK_ALLOWANCE,
    ListedSms,
    SmsListing,
    SmsTry,
    parse_sms_listing,
    reconcile_sms,
)
from services.dispatcher.domain.outcomes import ASKED_TOO_SOON

BEGAN = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
SETTLE = timedelta(seconds=10)
LATER = BEGAN + timedelta(seconds=30)
TRY = SmsTry("+15557770001", "Acme: spring is here", "+15005550006", None, BEGAN)


def listed(
    sid: str = "SM1",
    body: str = "Acme: spring is here",
    created: datetime | None = BEGAN + timedelta(seconds=1),
    sender: str | None = "+15005550006",
    service: str | None = None,
) -> ListedSms:
    return ListedSms(sid, body, sender, service, created)


def decide(*messages: ListedSms, more: bool = False, now: datetime = LATER) -> Any:
    return reconcile_sms(SmsListing(messages, more), TRY, now, SETTLE)


def test_our_message_listed_since_the_try_is_sent_with_the_providers_sid() -> None:
    outcome = decide(listed("SM9"))
    assert (outcome.kind, outcome.provider_id) == ("sent", "SM9")


def test_the_earliest_match_since_the_try_is_taken() -> None:
    # Newest first, as the provider lists them.
    outcome = decide(listed("SM2", created=BEGAN + timedelta(seconds=5)), listed("SM1"))
    assert outcome.provider_id == "SM1"


def test_a_message_created_just_before_the_try_by_the_providers_clock_counts() -> None:
    outcome = decide(listed(created=BEGAN - CLOCK_ALLOWANCE + timedelta(seconds=1)))
    assert outcome.kind == "sent"


def test_nothing_to_the_number_since_the_try_proves_it_never_arrived() -> None:
    older = listed("SM0", created=BEGAN - timedelta(days=1))
    assert decide(older).kind == "retry"
    assert decide().kind == "retry"


def test_absence_is_no_proof_before_the_settle_time() -> None:
    outcome = decide(now=BEGAN + SETTLE - timedelta(seconds=1))
    assert outcome.kind == "unknown"
    assert "too soon" in str(outcome.reason)


def test_absence_counts_only_a_settle_after_the_request_was_last_writable() -> None:
    # A worker that marked the try at BEGAN could write its request until it was gone (here
    # 20 s later): the settle runs from then, not from the try's start.
    written_by = BEGAN + timedelta(seconds=20)
    late = SmsTry(TRY.to, TRY.body, TRY.sender, None, BEGAN, written_by=written_by)
    early = reconcile_sms(SmsListing(()), late, written_by + SETTLE - timedelta(seconds=1), SETTLE)
    assert (early.kind, early.reason) == ("unknown", ASKED_TOO_SOON)
    assert reconcile_sms(SmsListing(()), late, written_by + SETTLE, SETTLE).kind == "retry"
    # Found, it is ours however soon it was asked.
    found = reconcile_sms(SmsListing((listed("SM5"),)), late, written_by, SETTLE)
    assert (found.kind, found.provider_id) == ("sent", "SM5")


def test_another_message_to_the_number_since_the_try_leaves_it_unknown() -> None:
    # The template changed, or another send reached the number: no telling which.
    outcome = decide(listed(body="Acme: something else"))
    assert outcome.kind == "unknown"
    assert "1 other message" in str(outcome.reason)


def test_an_undated_message_may_be_recent() -> None:
    assert decide(listed(body="other", created=None)).kind == "unknown"


def test_our_body_from_another_sender_is_not_ours() -> None:
    assert decide(listed(sender="+15009999999")).kind == "unknown"


def test_a_messaging_service_is_matched_by_its_sid() -> None:
    attempt = SmsTry(TRY.to, TRY.body, None, "MG1", BEGAN)
    message = listed(sender=None, service="MG1")
    outcome = reconcile_sms(SmsListing((message,)), attempt, LATER, SETTLE)
    assert outcome.kind == "sent"


def test_a_truncated_listing_that_does_not_reach_the_try_proves_nothing() -> None:
    assert decide(more=True).kind == "unknown"
    older = listed("SM0", created=BEGAN - timedelta(hours=1))
    assert decide(older, more=True).kind == "retry"  # the page reaches back past the try


def test_no_answer_from_the_provider_stays_unknown_with_the_reason() -> None:
    outcome = reconcile_sms("sms listing: ReadTimeout", TRY, LATER, SETTLE)
    assert outcome.kind == "unknown"
    assert "ReadTimeout" in str(outcome.reason)


def test_a_twilio_listing_is_read() -> None:
    answer = {
        "messages": [
            {
                "sid": "SM1",
                "body": "Hi",
                "from": "+15005550006",
                "messaging_service_sid": None,
                "date_created": format_datetime(BEGAN),
                "to": "+15557770001",
            }
        ],
        "next_page_uri": None,
    }
    assert parse_sms_listing(200, answer) == SmsListing(
        (ListedSms("SM1", "Hi", "+15005550006", None, BEGAN),), more=False
    )
    paged = parse_sms_listing(200, {**answer, "next_page_uri": "/2010-04-01/...&Page=1"})
    assert isinstance(paged, SmsListing)
    assert paged.more


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (401, {"code": 20003, "message": "Authenticate"}, "HTTP 401: Authenticate"),
        (200, None, "no messages list"),
        (200, {"messages": [{"body": "no sid"}]}, "without a sid"),
    ],
)
def test_answers_that_are_no_listing_say_why(
    status: int, body: dict[str, Any] | None, reason: str
) -> None:
    answer = parse_sms_listing(status, body)
    assert isinstance(answer, str)
    assert reason in answer


def test_an_unreadable_date_counts_as_recent() -> None:
    answer = parse_sms_listing(200, {"messages": [{"sid": "SM1", "date_created": "soon"}]})
    assert isinstance(answer, SmsListing)
    assert answer.messages[0].created_at is None
