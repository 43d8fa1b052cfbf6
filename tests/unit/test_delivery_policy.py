"""Delivery policy: consent, frequency caps, retry plans, fallbacks, rate limits (addresses are
`shared.channels`'s: tests/unit/test_channel_rules.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from services.dispatcher.domain.outcomes import resume_action
from services.dispatcher.domain.policy import (
    CapRule,
    ConsentRecord,
    TokenBucket,
    cap_refusal,
    consent_refusal,
    fallback_of,
    falls_back,
    kept_sends,
    plan_retry,
    recipient_refusal,
    send_address,
    suppression_refusal,
)
from shared.contracts import ChannelTemplate, Profile, SendRequest, TestSend

T0 = datetime(2026, 3, 2, 22, 30, tzinfo=UTC)
DELAYS = {"short": 5.0, "medium": 60.0, "long": 900.0}


def _profile(**traits: object) -> Profile:
    return Profile(
        contact_key="u-1", user_id="u-1", traits=traits, first_seen=T0, last_seen=T0, updated_at=T0
    )


def _request(**update: object) -> SendRequest:
    base = SendRequest(
        message_id="m-1",
        contact_key="u-1",
        channel="wechat",
        template_id="news",
        journey_id="j",
        journey_version=1,
        instance_id="i",
        step_id="s",
        requested_at=T0,
        profile=_profile(),
        fallbacks=(
            ChannelTemplate(channel="email", template_id="mail"),
            ChannelTemplate(channel="sms", template_id="text"),
        ),
    )
    return base.model_copy(update=update)


def test_the_freshest_word_on_consent_wins() -> None:
    withdrawn = _profile().model_copy(update={"consent": {"email": False}})
    assert consent_refusal("email", withdrawn, None) == "unsubscribed: email"
    assert consent_refusal("sms", withdrawn, None) is None
    # An unsubscribe the dispatcher saw after the profile was taken wins over the profile...
    later = ConsentRecord(False, T0 + timedelta(seconds=1))
    assert consent_refusal("email", _profile(), later) == "unsubscribed: email"
    # ...and a resubscribe newer than the profile gives the channel back.
    assert (
        consent_refusal("email", withdrawn, ConsentRecord(True, T0 + timedelta(seconds=1))) is None
    )
    # An older record does not override a newer profile.
    assert consent_refusal("email", withdrawn, ConsentRecord(True, T0 - timedelta(days=1)))


def test_daily_cap_counts_the_calendar_day_in_the_contacts_time_zone() -> None:
    rule = CapRule(per_day=2)
    warsaw = ZoneInfo("Europe/Warsaw")  # 22:30 UTC is 23:30 in Warsaw
    sends = [T0 - timedelta(hours=1), T0 - timedelta(minutes=10)]
    assert cap_refusal(rule, sends, T0, warsaw) == "frequency_capped: 2 today (limit 2 per day)"
    # Past midnight in Warsaw a new day begins, though it is the same UTC evening's sends.
    assert cap_refusal(rule, sends, T0 + timedelta(hours=1), warsaw) is None
    # In Shanghai all of it is the morning of 3 March: one day.
    assert cap_refusal(rule, sends, T0 + timedelta(hours=1), ZoneInfo("Asia/Shanghai"))
    assert cap_refusal(rule, sends[:1], T0, warsaw) is None


def test_rolling_window_cap() -> None:
    rule = CapRule(per_window=3, window=timedelta(days=7))
    sends = [T0 - timedelta(days=d) for d in (1, 3, 6)]
    assert cap_refusal(rule, sends, T0, ZoneInfo("UTC")) is not None
    assert cap_refusal(rule, sends, T0 + timedelta(days=1, seconds=1), ZoneInfo("UTC")) is None
    kept = kept_sends(rule, [*sends, T0 - timedelta(days=30)], T0)
    assert kept == sorted(sends)


@pytest.mark.parametrize(
    ("attempt", "delay_class", "low", "high"),
    [(1, "short", 5, 6.25), (2, "medium", 60, 75), (3, "long", 900, 1125), (4, "long", 900, 1125)],
)
def test_retry_delays_grow_by_class_with_bounded_jitter(
    attempt: int, delay_class: str, low: float, high: float
) -> None:
    plan = plan_retry("m-1", attempt, 5, DELAYS, T0)
    assert plan is not None
    assert plan.delay_class == delay_class
    assert low <= (plan.due_at - T0).total_seconds() <= high
    # Decided from the message id, not a random source: a replay plans the same.
    assert plan_retry("m-1", attempt, 5, DELAYS, T0) == plan


def test_retry_after_is_a_floor_and_picks_the_class_that_can_hold_it() -> None:
    plan = plan_retry("m-1", 1, 5, DELAYS, T0, retry_after=30)
    assert plan is not None
    assert plan.delay_class == "medium"
    assert 30 <= (plan.due_at - T0).total_seconds() <= 37.5


def test_retries_end_after_the_last_attempt() -> None:
    assert plan_retry("m-1", 5, 5, DELAYS, T0) is None


def test_jitter_spreads_one_burst() -> None:
    dues = {plan_retry(f"m-{n}", 1, 5, DELAYS, T0).due_at for n in range(50)}  # type: ignore[union-attr]
    assert len(dues) > 40


def test_fallback_moves_down_the_priority_list_with_its_own_id() -> None:
    request = _request()
    second = fallback_of(request)
    assert second is not None
    assert (second.channel, second.template_id) == ("email", "mail")
    assert second.message_id != request.message_id
    assert fallback_of(request) == second  # deterministic
    third = fallback_of(second)
    assert third is not None
    assert third.channel == "sms"
    assert third.fallbacks == ()
    assert fallback_of(third) is None


def test_only_unreachability_falls_back() -> None:
    assert falls_back("unsubscribed: email")
    assert falls_back("no_address: wechat")
    assert falls_back("suppressed: smtp 550")
    assert not falls_back("frequency_capped: 2 today (limit 2 per day)")
    assert not falls_back("template_error: 'x' is undefined")
    assert not falls_back(None)


def test_resume_after_a_crash() -> None:
    assert resume_action("sent", False) == "done"
    assert resume_action("retrying", True) == "done"
    assert resume_action("sending", False) == "unknown"
    assert resume_action("sending", True) == "send"
    assert resume_action("requested", False) == "send"


def test_token_bucket_allows_a_second_of_burst_then_paces() -> None:
    bucket = TokenBucket(rate=10)
    waits = [bucket.reserve(100.0) for _ in range(15)]
    assert all(w == 0 for w in waits[:10])
    assert waits[11] == pytest.approx(0.1) or waits[11] > 0
    assert waits[14] == pytest.approx(waits[13] + 0.1)
    assert TokenBucket(rate=0).reserve(1.0) == 0.0


def _unsubscribed_contact(**update: object) -> SendRequest:
    """An email to a contact who withdrew consent on the channel, with an address of its own."""
    profile = _profile(email="ada@example.com").model_copy(update={"consent": {"email": False}})
    return _request(channel="email", profile=profile, fallbacks=(), **update)


def test_a_test_send_goes_to_its_address_without_asking_the_contact_s_consent() -> None:
    to_contact = _unsubscribed_contact()
    test = _unsubscribed_contact(test=TestSend(address=" ed@shop.example ", content={}))
    withdrawn_lately = ConsentRecord(False, T0 + timedelta(seconds=1))

    assert send_address(to_contact) == "ada@example.com"
    assert recipient_refusal(to_contact, None, "ada@example.com") == "unsubscribed: email"
    assert send_address(test) == "ed@shop.example"  # the marketer's, never the contact's
    for recorded in (None, withdrawn_lately):
        assert recipient_refusal(test, recorded, send_address(test)) is None
    # The test's own address is still checked as an address.
    blank = _unsubscribed_contact(test=TestSend(address="  ", content={}))
    assert send_address(blank) is None
    assert recipient_refusal(blank, None, None) == "no_address: email"
    assert recipient_refusal(test, None, "ed@shop.example\nBcc: x@y") == (
        "no_address: email: the address holds a line break"
    )


def test_a_test_send_to_a_suppressed_address_is_refused_like_any_send() -> None:
    test = _unsubscribed_contact(test=TestSend(address="bounced@shop.example", content={}))
    address = send_address(test)

    # The address asked of the suppressions is the test's own, and a suppression holds for it.
    assert address == "bounced@shop.example"
    assert recipient_refusal(test, None, address) is None
    assert suppression_refusal("hard_bounce") == "suppressed: hard_bounce"
    assert suppression_refusal(None) is None
