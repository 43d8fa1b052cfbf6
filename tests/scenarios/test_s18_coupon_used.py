"""S18 Did they use our coupon? The order's code against the code this instance generated."""

from __future__ import annotations

from datetime import timedelta

from shared.journey_engine.simulator import Simulation
from tests.scenarios.conftest import T0, definition, rendered

FILE = definition("s18-coupon-used")
COUPON_USED = FILE.journey


def subscribed(sim: Simulation, contact: str = "ada") -> str:
    """The contact subscribes; the code it was sent."""
    sim.identify(contact, email=f"{contact}@example.com")
    sim.track(contact, "Newsletter Subscribed")
    (email,) = sim.sent(contact)
    code: str = email.context["coupon"]["code"]
    return code


def test_the_generated_code_is_sent_and_kept_on_the_profile() -> None:
    sim = Simulation([COUPON_USED], T0)
    code = subscribed(sim)

    (email,) = sim.sent("ada")
    assert code.startswith("HELLO-")
    assert code in rendered(email, FILE).subject
    assert [c.code for c in sim.profile("ada").coupons] == [code]


def test_an_order_with_our_code_takes_the_used_it_path() -> None:
    sim = Simulation([COUPON_USED], T0)
    code = subscribed(sim)
    sim.advance(timedelta(days=3))

    sim.track("ada", "Order Completed", {"order_id": "o-1", "coupon": code})

    assert sim.profile("ada").tags == ("coupon used",)
    assert sim.templates_sent("ada") == ["newsletter-coupon", "coupon-thank-you"]
    assert code in rendered(sim.sent("ada")[1], FILE).text


def test_an_order_with_another_code_takes_the_did_not_path() -> None:
    sim = Simulation([COUPON_USED], T0)
    subscribed(sim, "ada")
    bobs_code = subscribed(sim, "bob")

    sim.track("ada", "Order Completed", {"order_id": "o-1", "coupon": bobs_code})

    assert sim.profile("ada").tags == ("coupon not used",)
    assert sim.templates_sent("ada") == ["newsletter-coupon"]


def test_an_order_without_a_code_takes_the_did_not_path() -> None:
    sim = Simulation([COUPON_USED], T0)
    subscribed(sim)

    sim.track("ada", "Order Completed", {"order_id": "o-1"})

    assert sim.profile("ada").tags == ("coupon not used",)


def test_no_order_within_seven_days_takes_the_did_not_path() -> None:
    sim = Simulation([COUPON_USED], T0)
    code = subscribed(sim)

    sim.advance(timedelta(days=7))
    sim.track("ada", "Order Completed", {"order_id": "o-late", "coupon": code})

    assert sim.profile("ada").tags == ("coupon not used",)
    assert sim.exits("ada") == ["exit_step"]


def test_the_code_is_compared_as_typed_text() -> None:
    sim = Simulation([COUPON_USED], T0)
    code = subscribed(sim)

    sim.track("ada", "Order Completed", {"order_id": "o-1", "coupon": code.lower()})

    assert sim.profile("ada").tags == ("coupon not used",)
