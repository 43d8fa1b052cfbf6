"""S2 Welcome new users: welcome at once, reminder after 6 days, a tag one day later."""

from __future__ import annotations

from datetime import timedelta

from shared.journey_engine.simulator import Simulation
from tests.scenarios.conftest import T0, definition, rendered

FILE = definition("s02-welcome")
WELCOME = FILE.journey


def registered(sim: Simulation, contact: str = "ada") -> None:
    sim.identify(contact, email=f"{contact}@example.com", first_name=contact.title())
    sim.track(contact, "Registered", {"plan": "pro"})


def test_the_welcome_email_goes_out_at_once() -> None:
    sim = Simulation([WELCOME], T0)
    registered(sim)

    (welcome,) = sim.sent("ada")
    assert (welcome.channel, welcome.template_id, welcome.step_id) == (
        "email",
        "welcome",
        "welcome-email",
    )
    email = rendered(welcome, FILE)
    assert email.subject == "Welcome to Acme, Ada!"
    assert "for the pro plan" in email.text


def test_the_trial_reminder_comes_six_days_later() -> None:
    sim = Simulation([WELCOME], T0)
    registered(sim)

    sim.advance(timedelta(days=6) - timedelta(seconds=1))
    assert sim.templates_sent("ada") == ["welcome"]
    sim.advance(timedelta(seconds=1))

    assert sim.templates_sent("ada") == ["welcome", "trial-reminder"]
    assert sim.sent("ada")[1].requested_at == T0 + timedelta(days=6)


def test_no_order_tags_trial_not_placed_a_day_after_the_reminder() -> None:
    sim = Simulation([WELCOME], T0)
    registered(sim)

    sim.advance(timedelta(days=7) - timedelta(seconds=1))
    assert sim.profile("ada").tags == ()
    sim.advance(timedelta(seconds=1))

    assert sim.profile("ada").tags == ("trial not placed",)
    assert sim.exits("ada") == ["exit_step"]


def test_an_order_early_in_the_week_tags_first_order_on_day_seven() -> None:
    sim = Simulation([WELCOME], T0)
    registered(sim)
    sim.advance(timedelta(days=2))
    sim.track("ada", "Order Completed", {"order_id": "o-1", "revenue": 49})

    sim.advance(timedelta(days=5))

    assert sim.profile("ada").tags == ("first order",)
    assert [r.detail for r in sim.log if r.kind == "converted"] == ["ordered"]
    # The reminder still goes out: the scenario sends it to everyone on day 6.
    assert sim.templates_sent("ada") == ["welcome", "trial-reminder"]


def test_an_order_between_reminder_and_branch_counts_too() -> None:
    sim = Simulation([WELCOME], T0)
    registered(sim)
    sim.advance(timedelta(days=6, hours=12))
    sim.track("ada", "Order Completed", {"order_id": "o-1"})

    sim.advance(timedelta(days=1))

    assert sim.profile("ada").tags == ("first order",)


def test_an_order_before_registering_does_not_count() -> None:
    sim = Simulation([WELCOME], T0)
    sim.identify("ada", email="ada@example.com", first_name="Ada")
    sim.track("ada", "Order Completed", {"order_id": "o-0"})
    sim.track("ada", "Registered")

    sim.advance(timedelta(days=7))

    assert sim.profile("ada").tags == ("trial not placed",)


def test_registering_again_starts_nothing() -> None:
    sim = Simulation([WELCOME], T0)
    registered(sim)
    sim.advance(timedelta(days=10))

    sim.track("ada", "Registered")
    sim.advance(timedelta(days=10))

    assert sim.templates_sent("ada") == ["welcome", "trial-reminder"]
