"""What a try's outcome comes to (`services.dispatcher.domain.conclude`), without servers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.dispatcher.domain.conclude import (
    Announce,
    ConcludePolicy,
    Conclusion,
    CountSend,
    DeadLetter,
    FallBack,
    PauseChannel,
    SuppressAddress,
    Wait,
    WithdrawConsent,
    conclude,
)
from services.dispatcher.domain.outcomes import Outcome
from services.dispatcher.domain.policy import CapRule, fallback_of
from shared.contracts import Channel, ChannelTemplate, Profile, SendRequest

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
CAP = CapRule(per_day=2, per_window=None, window=None)
POLICY = ConcludePolicy(
    attempts=3,
    delays={"short": 5.0, "medium": 60.0, "long": 900.0},
    pause_seconds=60.0,
    caps={"email": CAP},
)


def request(
    channel: Channel = "email", *, transactional: bool = False, fallbacks: bool = True
) -> SendRequest:
    return SendRequest(
        message_id="msg-1",
        contact_key="ada",
        channel=channel,
        template_id="hello",
        journey_id="welcome",
        journey_version=1,
        instance_id="i-1",
        step_id="hello",
        transactional=transactional,
        requested_at=NOW,
        profile=Profile(contact_key="ada", first_seen=NOW, last_seen=NOW, updated_at=NOW),
        fallbacks=(ChannelTemplate(channel="sms", template_id="hello-sms"),) if fallbacks else (),
    )


def test_a_marketing_send_the_provider_accepted_counts_against_the_cap_and_is_announced() -> None:
    sent = Outcome("sent", provider_id="<msg-1@waypost.local>")

    plan = conclude(request(), sent, 1, "ada@example.com", POLICY, NOW)

    assert plan == Conclusion((), "sent", sent, (CountSend(CAP), Announce("sent", sent)))


def test_transactional_mail_and_uncapped_channels_count_nothing() -> None:
    sent = Outcome("sent")
    for req in (request(transactional=True), request("sms")):
        plan = conclude(req, sent, 1, "x", POLICY, NOW)
        assert plan.after == (Announce("sent", sent),)


def test_a_retryable_outcome_waits_for_the_next_attempt_and_records_nothing() -> None:
    plan = conclude(request(), Outcome("retry", "smtp 451: busy"), 1, "a@x", POLICY, NOW)

    assert plan.state is None
    (wait,) = plan.before
    assert isinstance(wait, Wait)
    assert (wait.attempt, wait.reason, wait.delay_class) == (2, "smtp 451: busy", "short")
    assert NOW + timedelta(seconds=5) <= wait.due <= NOW + timedelta(seconds=5 * 1.25)


def test_a_provider_retry_after_sets_the_due_time() -> None:
    busy = Outcome("retry", "sms 20429: too many", retry_after=120.0)

    (wait,) = conclude(request("sms"), busy, 1, "+1", POLICY, NOW).before

    assert isinstance(wait, Wait)
    assert wait.due >= NOW + timedelta(seconds=120)


def test_exhausted_retries_fail_the_send_dead_letter_it_and_do_not_fall_back() -> None:
    plan = conclude(request(), Outcome("retry", "smtp 451: busy", code="451"), 3, "a", POLICY, NOW)

    reason = "retries_exhausted after 3 attempts: smtp 451: busy"
    failed = Outcome("recipient", reason, code="451")
    assert plan == Conclusion(
        (DeadLetter(reason),), "failed", failed, (Announce("failed", failed),)
    )


def test_an_unknown_marketing_send_stays_unknown_but_a_transactional_one_is_tried_again() -> None:
    lost = Outcome("unknown", "smtp connection lost")

    marketing = conclude(request(), lost, 1, "a", POLICY, NOW)
    transactional = conclude(request(transactional=True), lost, 1, "a", POLICY, NOW)

    assert (marketing.state, marketing.after) == ("unknown", (Announce("unknown", lost),))
    assert transactional.state is None
    assert [type(step) for step in transactional.before] == [Wait]


def test_a_configuration_error_pauses_the_channel_and_holds_the_send_without_an_attempt() -> None:
    refused = Outcome("config", "smtp authentication: 535", retry_after=30.0)

    plan = conclude(request(), refused, 2, "a", POLICY, NOW)

    until = NOW + timedelta(seconds=30)
    assert plan == Conclusion(
        (PauseChannel(until, refused.reason), Wait(2, until, "smtp authentication: 535"))
    )
    default = conclude(request(), Outcome("config", None), 1, "a", POLICY, NOW)
    assert default.before[0] == PauseChannel(NOW + timedelta(seconds=60), None)


def test_a_provider_opt_out_withdraws_consent_and_the_next_channel_is_tried() -> None:
    stop = Outcome("recipient", "sms 21610: unsubscribed", withdrew_consent=True)
    req = request("sms")

    plan = conclude(req, stop, 1, "+15550001", POLICY, NOW)

    following = fallback_of(req)
    assert following is not None
    assert plan.after == (WithdrawConsent(), Announce("failed", stop), FallBack(following))


@pytest.mark.parametrize(("channel", "reported"), [("email", None), ("push", "token-1")])
def test_a_dead_address_is_suppressed_and_a_dead_push_token_is_reported_back(
    channel: Channel, reported: str | None
) -> None:
    gone = Outcome("recipient", "gone", address_invalid=True)
    address = "token-1" if channel == "push" else "ada@example.com"

    plan = conclude(request(channel, fallbacks=False), gone, 1, address, POLICY, NOW)

    assert plan.after == (
        SuppressAddress(address),
        Announce("failed", gone, address_invalid=True, address=reported),
    )


def test_a_refusal_before_the_provider_call_suppresses_nothing() -> None:
    refused = Outcome("recipient", "refused", address_invalid=True)

    plan = conclude(request(fallbacks=False), refused, 1, None, POLICY, NOW)

    assert plan.after == (Announce("failed", refused),)


@pytest.mark.parametrize(
    ("reason", "falls_back"),
    [
        ("no_address: email", True),
        ("unsubscribed: email", True),
        ("template_error: hello: text: 'x' is undefined", True),
        ("frequency_capped: 2 today (limit 2 per day)", False),
    ],
)
def test_a_skip_tries_the_next_channel_only_when_this_one_cannot_reach_the_contact(
    reason: str, falls_back: bool
) -> None:
    plan = conclude(request(), Outcome("skipped", reason), 1, None, POLICY, NOW)

    assert plan.state == "skipped"
    assert any(isinstance(step, FallBack) for step in plan.after) is falls_back
