"""S14 Coupon on tag: a tagged customer gets a coupon by email with a men's section image."""

from __future__ import annotations

from shared.journey_engine.simulator import Simulation
from tests.scenarios.conftest import T0, definition, rendered

FILE = definition("s14-coupon-on-tag")
COUPON = FILE.journey


def test_a_tagged_customer_gets_a_coupon_email_with_a_matching_image() -> None:
    sim = Simulation([COUPON], T0)
    sim.identify("ada", email="ada@example.com", status="customer", mens_category="jackets")

    sim.tag("ada", "mens-section-buyer")

    (email,) = sim.sent("ada")
    code = email.context["coupon"]["code"]
    assert code.startswith("MENS-")
    assert [c.code for c in sim.profile("ada").coupons] == [code]
    message = rendered(email, FILE)
    assert code in message.text
    assert message.html is not None
    assert '<img src="https://cdn.acme.example/men/jackets.jpg"' in message.html


def test_without_a_favourite_category_the_seasons_pick_is_shown() -> None:
    sim = Simulation([COUPON], T0)
    sim.identify("ada", email="ada@example.com", status="customer")

    sim.tag("ada", "mens-section-buyer")

    message = rendered(sim.sent("ada")[0], FILE)
    assert message.html is not None
    assert "men/new-season.jpg" in message.html


def test_a_contact_who_is_not_a_customer_does_not_enter() -> None:
    sim = Simulation([COUPON], T0)
    sim.identify("ada", email="ada@example.com", status="lead")
    sim.identify("bob", email="bob@example.com")

    sim.tag("ada", "mens-section-buyer")
    sim.tag("bob", "mens-section-buyer")

    assert sim.sent() == []
    assert sim.profile("ada").coupons == ()


def test_another_tag_does_nothing_and_a_second_tagging_gives_no_second_coupon() -> None:
    sim = Simulation([COUPON], T0)
    sim.identify("ada", email="ada@example.com", status="customer")
    sim.tag("ada", "womens-section-buyer")
    assert sim.sent("ada") == []

    sim.tag("ada", "mens-section-buyer")
    sim.tag("ada", "mens-section-buyer", added=False)
    sim.tag("ada", "mens-section-buyer")

    assert len(sim.sent("ada")) == 1
    assert len(sim.profile("ada").coupons) == 1
