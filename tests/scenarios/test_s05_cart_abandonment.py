"""S5 Cart abandonment, played in virtual time through the engine."""

from __future__ import annotations

from datetime import timedelta

from shared.journey_engine.simulator import Simulation
from tests.scenarios.conftest import T0, journey

CART = journey("s05-cart-abandonment")


def shopper(sim: Simulation, contact: str = "ada", **traits: object) -> None:
    sim.identify(contact, email=f"{contact}@example.com", **traits)


def test_no_order_within_an_hour_sends_an_email_when_there_is_no_push_token() -> None:
    sim = Simulation([CART], T0)
    shopper(sim)
    sim.track("ada", "Product Added", {"product_id": "p1", "name": "Boots"})

    sim.advance(timedelta(minutes=59))
    assert sim.sent("ada") == []
    sim.advance(timedelta(minutes=1))

    (reminder,) = sim.sent("ada")
    assert (reminder.channel, reminder.template_id) == ("email", "cart-email")
    assert reminder.fallbacks == ()


def test_a_push_token_makes_the_reminder_a_push_with_email_as_fallback() -> None:
    sim = Simulation([CART], T0)
    shopper(sim, push_tokens=["tok-1"])
    sim.track("ada", "Product Added", {"product_id": "p1"})

    sim.advance(timedelta(hours=1))

    (reminder,) = sim.sent("ada")
    assert (reminder.channel, reminder.template_id) == ("push", "cart-push")
    assert [(f.channel, f.template_id) for f in reminder.fallbacks] == [("email", "cart-email")]


def test_no_order_for_a_day_more_sends_a_coupon_email_and_ends() -> None:
    sim = Simulation([CART], T0)
    shopper(sim)
    sim.track("ada", "Product Added", {"product_id": "p1"})

    sim.advance(timedelta(hours=25))

    assert sim.templates_sent("ada") == ["cart-email", "cart-coupon"]
    coupon = sim.sent("ada")[1].context["coupon"]
    assert coupon["code"].startswith("CART-")
    assert [c.code for c in sim.profile("ada").coupons] == [coupon["code"]]
    assert sim.exits("ada") == ["exit_step"]
    assert sim.waiting("ada") == 0


def test_an_order_within_the_hour_ends_as_converted_without_a_message() -> None:
    sim = Simulation([CART], T0)
    shopper(sim)
    sim.track("ada", "Product Added", {"product_id": "p1"})
    sim.advance(timedelta(minutes=30))

    sim.track("ada", "Order Completed", {"order_id": "o1"})
    sim.advance(timedelta(days=3))

    assert sim.sent("ada") == []
    assert [r.detail for r in sim.log if r.kind == "converted"] == ["ordered"]
    assert sim.exits("ada") == ["exit_rule:ordered"]
    assert sim.waiting("ada") == 0


def test_an_order_mid_wait_after_the_reminder_ends_the_journey_at_once() -> None:
    sim = Simulation([CART], T0)
    shopper(sim)
    sim.track("ada", "Product Added", {"product_id": "p1"})
    sim.advance(timedelta(hours=2))

    sim.track("ada", "Order Completed", {"order_id": "o1"})
    sim.advance(timedelta(days=3))

    assert sim.templates_sent("ada") == ["cart-email"]
    assert sim.exits("ada") == ["exit_rule:ordered"]


def test_a_second_product_added_inside_does_not_start_a_second_instance() -> None:
    sim = Simulation([CART], T0)
    shopper(sim)
    sim.track("ada", "Product Added", {"product_id": "p1"})
    sim.advance(timedelta(minutes=10))
    sim.track("ada", "Product Added", {"product_id": "p2"})

    sim.advance(timedelta(hours=30))

    assert sim.templates_sent("ada") == ["cart-email", "cart-coupon"]
    assert sum(1 for r in sim.log if r.kind == "entered") == 1


def test_after_the_journey_ended_a_new_cart_enters_again() -> None:
    sim = Simulation([CART], T0)
    shopper(sim)
    sim.track("ada", "Product Added", {"product_id": "p1"})
    sim.track("ada", "Order Completed", {"order_id": "o1"})

    sim.track("ada", "Product Added", {"product_id": "p2"})
    sim.advance(timedelta(hours=1))

    assert sim.templates_sent("ada") == ["cart-email"]
    assert sum(1 for r in sim.log if r.kind == "entered") == 2
