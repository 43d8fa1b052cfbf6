"""S13 Abandoned cart, rule form: no order within 4 hours of an addition -> cart and discount."""

from __future__ import annotations

from datetime import timedelta

from shared.journey_engine.simulator import Simulation
from tests.scenarios.conftest import T0, definition, rendered

FILE = definition("s13-abandoned-cart-rule")
RULE = FILE.journey
CART = {
    "product_id": "p-2",
    "name": "Rain Jacket",
    "price": 89.0,
    "products": [
        {"product_id": "p-1", "name": "Trail Boots", "price": 129.0},
        {"product_id": "p-2", "name": "Rain Jacket", "price": 89.0},
    ],
}


def shopper(sim: Simulation) -> None:
    sim.identify("ada", email="ada@example.com", first_name="Ada")


def test_four_hours_without_an_order_send_the_cart_with_a_discount() -> None:
    sim = Simulation([RULE], T0)
    shopper(sim)
    sim.track("ada", "Product Added", CART)

    sim.advance(timedelta(hours=4) - timedelta(seconds=1))
    assert sim.sent("ada") == []
    sim.advance(timedelta(seconds=1))

    (email,) = sim.sent("ada")
    assert (email.channel, email.template_id) == ("email", "abandoned-cart-discount")
    code = email.context["coupon"]["code"]
    assert code.startswith("CART4H-")
    text = rendered(email, FILE).text
    assert "- Trail Boots (129.0)" in text
    assert "- Rain Jacket (89.0)" in text
    assert f"Use {code} for 10% off until 2026-03-05." in text
    assert sim.exits("ada") == ["exit_step"]


def test_without_the_whole_cart_the_added_product_is_listed() -> None:
    sim = Simulation([RULE], T0)
    shopper(sim)
    sim.track("ada", "Product Added", {"product_id": "p-9", "name": "Wool Hat"})

    sim.advance(timedelta(hours=4))

    (email,) = sim.sent("ada")
    text = rendered(email, FILE).text
    assert "- Wool Hat\n" in text


def test_an_order_within_four_hours_ends_it_without_a_message_or_coupon() -> None:
    sim = Simulation([RULE], T0)
    shopper(sim)
    sim.track("ada", "Product Added", CART)
    sim.advance(timedelta(hours=3, minutes=59))

    sim.track("ada", "Order Completed", {"order_id": "o-1"})
    sim.advance(timedelta(days=1))

    assert sim.sent("ada") == []
    assert sim.profile("ada").coupons == ()
    assert sim.exits("ada") == ["exit_step"]


def test_the_next_cart_after_the_rule_fired_is_watched_again() -> None:
    sim = Simulation([RULE], T0)
    shopper(sim)
    sim.track("ada", "Product Added", CART)
    sim.advance(timedelta(hours=5))

    sim.track("ada", "Product Added", {"product_id": "p-3", "name": "Scarf"})
    sim.advance(timedelta(hours=4))

    assert sim.templates_sent("ada") == ["abandoned-cart-discount"] * 2
    codes = {s.context["coupon"]["code"] for s in sim.sent("ada")}
    assert len(codes) == 2
