"""S1 Channel by reachability: one audience run, WeChat else email else SMS else skipped."""

from __future__ import annotations

from datetime import timedelta

from shared.journey_engine.simulator import Simulation
from tests.scenarios.conftest import T0, definition, rendered

FILE = definition("s01-channel-by-reachability")
JOURNEY = FILE.journey


def audience(sim: Simulation) -> None:
    sim.identify(
        "wei",
        wechat_openid="oWx_account_openid_wei",
        wechat_unionid="o6_bmasdasdsad6_2sgVt7hMZOPfL",
        email="wei@example.com",
    )
    sim.identify("eva", email="eva@example.com", phone="+48600100200")
    sim.identify("sam", phone="+48600100300")
    sim.identify("nia", first_name="Nia")
    # The run reaches the members of both segments; wei is in both.
    members_a = ["wei", "eva", "nia"]
    members_b = ["wei", "sam"]
    sim.audience_run(JOURNEY.id, "run-1", [*members_a, *members_b])


def test_each_contact_gets_the_first_channel_it_can_receive() -> None:
    sim = Simulation([JOURNEY], T0)
    audience(sim)

    chosen = {s.contact_key: (s.channel, s.template_id) for s in sim.sent()}

    assert chosen == {
        "wei": ("wechat", "spring-wechat-news"),
        "eva": ("email", "spring-email"),
        "sam": ("sms", "spring-sms"),
    }


def test_a_contact_in_both_segments_enters_and_is_sent_once() -> None:
    sim = Simulation([JOURNEY], T0)
    audience(sim)

    assert len(sim.sent("wei")) == 1
    assert sum(1 for r in sim.log if r.kind == "entered" and r.contact_key == "wei") == 1


def test_a_contact_without_any_address_is_skipped_as_unreachable_and_finishes() -> None:
    sim = Simulation([JOURNEY], T0)
    audience(sim)

    assert sim.sent("nia") == []
    (skipped,) = [r for r in sim.log if r.contact_key == "nia" and r.kind == "skipped"]
    assert (skipped.step_id, skipped.reason) == ("announce", "unreachable")
    assert sim.exits("nia") == ["exit_step"]


def test_the_rest_of_the_priority_list_travels_as_fallbacks() -> None:
    sim = Simulation([JOURNEY], T0)
    audience(sim)

    (wechat,) = sim.sent("wei")
    (email,) = sim.sent("eva")
    assert [f.channel for f in wechat.fallbacks] == ["email"]
    assert [f.channel for f in email.fallbacks] == ["sms"]


def test_a_unionid_alone_is_no_wechat_address_and_the_email_goes_out() -> None:
    # Only the Official Account's openid can be sent to; the dispatcher would skip a unionid-only
    # WeChat send, so the orchestrator does not pick it either (shared/channels.py).
    sim = Simulation([JOURNEY], T0)
    sim.identify("uma", wechat_unionid="o6_bmasdasdsad6_uma", email="uma@example.com")

    sim.audience_run(JOURNEY.id, "run-1", ["uma"])

    ((channel, fallbacks),) = [(s.channel, s.fallbacks) for s in sim.sent("uma")]
    assert (channel, fallbacks) == ("email", ())


def test_withdrawn_consent_makes_a_channel_unreachable() -> None:
    sim = Simulation([JOURNEY], T0)
    sim.identify("eva", email="eva@example.com", phone="+48600100200")
    sim.profiles["eva"] = sim.profile("eva").model_copy(update={"consent": {"email": False}})

    sim.audience_run(JOURNEY.id, "run-1", ["eva"])

    assert [(s.channel, s.template_id) for s in sim.sent("eva")] == [("sms", "spring-sms")]


def test_a_second_run_or_a_replayed_run_sends_nothing_more() -> None:
    sim = Simulation([JOURNEY], T0)
    audience(sim)

    sim.audience_run(JOURNEY.id, "run-1", ["wei", "eva"])
    sim.advance(timedelta(days=1))
    sim.audience_run(JOURNEY.id, "run-2", ["wei", "eva", "sam"])

    assert len(sim.sent()) == 3


def test_every_message_renders_for_its_channel() -> None:
    sim = Simulation([JOURNEY], T0)
    audience(sim)

    texts = {s.channel: rendered(s, FILE) for s in sim.sent()}

    assert texts["wechat"].subject == "The spring collection is here"
    assert "https://acme.example/spring" in texts["wechat"].text
    assert texts["email"].subject == "Hello, the spring collection is here"
    assert "STOP" in texts["sms"].text


def test_a_contact_joining_a_segment_after_the_run_does_not_enter() -> None:
    sim = Simulation([JOURNEY], T0)
    audience(sim)
    sim.advance(timedelta(hours=2))

    sim.identify("late", email="late@example.com")
    sim.segment_changed("late", "newsletter-readers")

    assert sim.sent("late") == []
