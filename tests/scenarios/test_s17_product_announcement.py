"""S17 Product announcement in the three audience modes: static, ongoing and recurring."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from shared.journey_engine.simulator import Simulation
from tests.scenarios.conftest import definition, rendered

FILE = definition("s17-product-announcement")
STATIC = FILE.journey
ONGOING = definition("s17-product-announcement-ongoing").journey
RECURRING = definition("s17-product-announcement-recurring").journey
# 10:00 on 10 March 2026 in Warsaw (UTC+1): the static and ongoing start; launch at 20:00.
START = datetime(2026, 3, 10, 9, 0, tzinfo=UTC)
LAUNCH = datetime(2026, 3, 10, 19, 0, tzinfo=UTC)
LINK = "https://acme.example/orbit"


def fans(sim: Simulation, *contacts: str) -> None:
    for contact in contacts:
        sim.identify(contact, email=f"{contact}@example.com", phone="+48600100200")
        sim.segment_changed(contact, "orbit-waitlist")


def clicked(sim: Simulation, contact: str, url: str = LINK) -> None:
    (announcement,) = [s for s in sim.sent(contact) if s.template_id == "orbit-announcement"]
    sim.track(
        contact,
        "Email Link Clicked",
        {"url": url, "message_id": announcement.message_id, "template_id": "orbit-announcement"},
    )


def channels(sim: Simulation, contact: str) -> list[tuple[str, str, datetime]]:
    return [(s.channel, s.template_id, s.requested_at) for s in sim.sent(contact)]


# --- static ---------------------------------------------------------------------------------


def test_the_run_sends_the_announcement_with_the_product_link() -> None:
    sim = Simulation([STATIC], START)
    fans(sim, "ada", "bob")

    sim.audience_run(STATIC.id, "run-1", ["ada", "bob"])

    assert [s.template_id for s in sim.sent()] == ["orbit-announcement"] * 2
    email = rendered(sim.sent("ada")[0], FILE)
    assert LINK in email.text
    assert email.subject == "Meet Orbit: on sale from 10 March, 20:00"


def test_a_click_before_the_launch_sends_the_sms_at_the_launch() -> None:
    sim = Simulation([STATIC], START)
    fans(sim, "ada")
    sim.audience_run(STATIC.id, "run-1", ["ada"])
    sim.advance(timedelta(minutes=30))

    clicked(sim, "ada")
    sim.advance(LAUNCH - sim.now - timedelta(seconds=1))
    assert len(sim.sent("ada")) == 1
    sim.advance(timedelta(seconds=1))

    assert channels(sim, "ada")[1] == ("sms", "orbit-launch-sms", LAUNCH)
    assert sim.sent("ada")[1].context["click"]["properties"]["url"] == LINK
    assert "STOP" in rendered(sim.sent("ada")[1], FILE).text
    assert sim.exits("ada") == ["exit_step"]


def test_a_click_after_the_launch_sends_the_sms_at_once() -> None:
    sim = Simulation([STATIC], START)
    fans(sim, "ada")
    sim.audience_run(STATIC.id, "run-1", ["ada"])
    sim.advance(timedelta(hours=12))  # 22:00 in Warsaw

    clicked(sim, "ada")

    assert channels(sim, "ada")[1] == ("sms", "orbit-launch-sms", START + timedelta(hours=12))


def test_no_click_within_a_day_ends_it_and_a_late_click_does_nothing() -> None:
    sim = Simulation([STATIC], START)
    fans(sim, "ada")
    sim.audience_run(STATIC.id, "run-1", ["ada"])

    sim.advance(timedelta(days=1))
    assert sim.exits("ada") == ["exit_step"]
    clicked(sim, "ada")
    sim.advance(timedelta(days=1))

    assert [s.template_id for s in sim.sent("ada")] == ["orbit-announcement"]


def test_a_click_on_another_link_is_not_the_one_awaited() -> None:
    sim = Simulation([STATIC], START)
    fans(sim, "ada")
    sim.audience_run(STATIC.id, "run-1", ["ada"])

    clicked(sim, "ada", url="https://acme.example/unsubscribe-preferences")
    sim.advance(timedelta(days=2))

    assert [s.template_id for s in sim.sent("ada")] == ["orbit-announcement"]


def test_a_clicker_without_a_phone_is_skipped_at_the_sms() -> None:
    sim = Simulation([STATIC], START)
    sim.identify("ada", email="ada@example.com")
    sim.audience_run(STATIC.id, "run-1", ["ada"])
    clicked(sim, "ada")

    sim.advance(timedelta(days=1))

    assert [s.template_id for s in sim.sent("ada")] == ["orbit-announcement"]
    assert [(r.step_id, r.reason) for r in sim.log if r.kind == "skipped"] == [
        ("launch-sms", "unreachable")
    ]


def test_static_joiners_after_the_run_do_not_enter() -> None:
    sim = Simulation([STATIC], START)
    fans(sim, "ada")
    sim.audience_run(STATIC.id, "run-1", ["ada"])
    sim.advance(timedelta(hours=1))

    fans(sim, "late")

    assert sim.sent("late") == []


# --- ongoing --------------------------------------------------------------------------------


def test_ongoing_joiners_enter_when_they_join() -> None:
    sim = Simulation([ONGOING], START)
    fans(sim, "ada")
    sim.audience_run(ONGOING.id, "run-1", ["ada"])
    sim.advance(timedelta(days=3))

    fans(sim, "late")

    assert channels(sim, "late") == [("email", "orbit-announcement", START + timedelta(days=3))]
    clicked(sim, "late")  # the launch has passed: the SMS goes at once
    assert channels(sim, "late")[1][:2] == ("sms", "orbit-launch-sms")


def test_ongoing_members_enter_once_ever_even_if_removed_and_re_added() -> None:
    sim = Simulation([ONGOING], START)
    fans(sim, "ada")
    sim.audience_run(ONGOING.id, "run-1", ["ada"])
    sim.advance(timedelta(days=2))

    sim.segment_changed("ada", "orbit-waitlist", entered=False)
    sim.advance(timedelta(days=1))
    sim.segment_changed("ada", "orbit-waitlist")
    fans(sim, "bob")
    sim.segment_changed("bob", "orbit-waitlist", entered=False)
    sim.advance(timedelta(days=1))
    sim.segment_changed("bob", "orbit-waitlist")

    assert len(sim.sent("ada")) == 1
    assert len(sim.sent("bob")) == 1


def test_ongoing_joiners_before_the_start_wait_for_the_first_run() -> None:
    sim = Simulation([ONGOING], START - timedelta(days=1))
    fans(sim, "early")
    assert sim.sent("early") == []

    sim.advance(timedelta(days=1))
    sim.audience_run(ONGOING.id, "run-1", ["early"])

    assert len(sim.sent("early")) == 1


# --- recurring ------------------------------------------------------------------------------


def test_recurring_runs_reach_members_who_joined_between_runs_at_the_next_run() -> None:
    first_run = datetime(2026, 3, 9, 9, 0, tzinfo=UTC)  # Monday 10:00 in Warsaw
    sim = Simulation([RECURRING], first_run)
    fans(sim, "ada")
    sim.audience_run(RECURRING.id, "2026-03-09", ["ada"])
    sim.advance(timedelta(days=2))

    fans(sim, "bob")
    assert sim.sent("bob") == []

    sim.advance(timedelta(days=5))
    sim.audience_run(RECURRING.id, "2026-03-16", ["ada", "bob"])

    assert [s.requested_at for s in sim.sent("bob")] == [first_run + timedelta(days=7)]
    assert len(sim.sent("ada")) == 1


def test_a_recurring_run_after_the_launch_sends_the_sms_on_click_at_once() -> None:
    second_run = datetime(2026, 3, 16, 9, 0, tzinfo=UTC)
    sim = Simulation([RECURRING], second_run)
    fans(sim, "cyd")
    sim.audience_run(RECURRING.id, "2026-03-16", ["cyd"])
    sim.advance(timedelta(hours=2))

    clicked(sim, "cyd")

    assert channels(sim, "cyd")[1] == ("sms", "orbit-launch-sms", second_run + timedelta(hours=2))


def test_the_three_modes_share_steps_and_templates() -> None:
    files = [
        definition(n)
        for n in ("s17-product-announcement-ongoing", "s17-product-announcement-recurring")
    ]
    for other in files:
        assert other.journey.steps == STATIC.steps
        assert other.templates == FILE.templates
    assert (STATIC.trigger.mode, ONGOING.trigger.mode, RECURRING.trigger.mode) == (
        "static",
        "ongoing",
        "recurring",
    )
