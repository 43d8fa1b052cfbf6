"""S3 Incubate trial users: highlights, then a coupon, tagging who ordered and who did not."""

from __future__ import annotations

from datetime import timedelta

from shared.journey_engine.simulator import Simulation
from tests.scenarios.conftest import T0, definition, rendered

FILE = definition("s03-incubate-trial-users")
INCUBATE = FILE.journey
WELCOME = definition("s02-welcome").journey
KEEP = definition("s04-keep-customers").journey


def trial_user(sim: Simulation, contact: str = "ada") -> None:
    sim.identify(contact, email=f"{contact}@example.com")
    sim.tag(contact, "trial not placed")


def test_the_tag_sends_the_highlights_at_once() -> None:
    sim = Simulation([INCUBATE], T0)
    trial_user(sim)

    assert sim.templates_sent("ada") == ["trial-highlights"]


def test_an_order_within_three_days_tags_first_order_and_ends() -> None:
    sim = Simulation([INCUBATE], T0)
    trial_user(sim)
    sim.advance(timedelta(days=2))

    sim.track("ada", "Order Completed", {"order_id": "o-1"})
    sim.advance(timedelta(days=10))

    assert sim.templates_sent("ada") == ["trial-highlights"]
    assert sim.profile("ada").tags == ("trial not placed", "first order")
    assert sim.exits("ada") == ["exit_step"]
    assert sim.profile("ada").coupons == ()


def test_no_order_sends_a_coupon_and_an_order_then_tags_first_order() -> None:
    sim = Simulation([INCUBATE], T0)
    trial_user(sim)
    sim.advance(timedelta(days=3))

    (_highlights, promotion) = sim.sent("ada")
    assert promotion.template_id == "trial-promotion"
    assert promotion.requested_at == T0 + timedelta(days=3)
    code = promotion.context["coupon"]["code"]
    assert code.startswith("HATCH-")
    assert [c.code for c in sim.profile("ada").coupons] == [code]
    email = rendered(promotion, FILE)
    assert code in email.subject
    assert "2026-03-12" in email.text  # issued on day 3, valid 7 days

    sim.advance(timedelta(days=1))
    sim.track("ada", "Order Completed", {"order_id": "o-1", "coupon": code})

    assert sim.profile("ada").tags == ("trial not placed", "first order")


def test_no_order_at_all_tags_not_hatched_after_six_days() -> None:
    sim = Simulation([INCUBATE], T0)
    trial_user(sim)

    sim.advance(timedelta(days=6) - timedelta(seconds=1))
    assert "not hatched" not in sim.profile("ada").tags
    sim.advance(timedelta(seconds=1))

    assert sim.profile("ada").tags == ("trial not placed", "not hatched")
    assert sim.templates_sent("ada") == ["trial-highlights", "trial-promotion"]
    assert sim.waiting("ada") == 0


def test_another_tag_starts_nothing() -> None:
    sim = Simulation([INCUBATE], T0)
    sim.identify("ada", email="ada@example.com")

    sim.tag("ada", "trial placed")

    assert sim.sent("ada") == []


def test_s2_tagging_trial_not_placed_starts_s3_and_its_first_order_starts_s4() -> None:
    sim = Simulation([WELCOME, INCUBATE, KEEP], T0)
    sim.identify("ada", email="ada@example.com", first_name="Ada")
    sim.track("ada", "Registered")

    sim.advance(timedelta(days=7))
    # The welcome journey's tag came back as `Tag Added` and started the incubation.
    assert sim.profile("ada").tags == ("trial not placed",)
    assert sim.templates_sent("ada") == ["welcome", "trial-reminder", "trial-highlights"]

    sim.advance(timedelta(days=3))
    promotion = sim.sent("ada")[-1]
    assert promotion.template_id == "trial-promotion"
    sim.track("ada", "Order Completed", {"coupon": promotion.context["coupon"]["code"]})

    assert sim.profile("ada").tags == ("trial not placed", "first order")
    entered = [r.journey_id for r in sim.log if r.kind == "entered"]
    assert entered == ["welcome", "incubate-trial-users", "keep-customers"]
    sim.advance(timedelta(days=30))
    assert sim.templates_sent("ada")[-1] == "satisfaction-survey"
