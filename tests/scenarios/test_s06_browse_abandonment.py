"""S6 Browse abandonment: a push two hours after a view without a cart or an order, weekly."""

from __future__ import annotations

from datetime import timedelta

import pytest

from shared.journey_engine.simulator import Simulation
from tests.scenarios.conftest import T0, definition, rendered

FILE = definition("s06-browse-abandonment")
BROWSE = FILE.journey


def browser(sim: Simulation, contact: str = "ada") -> None:
    sim.identify(contact, push_tokens=["tok-1"])


def viewed(sim: Simulation, name: str = "Trail Boots", contact: str = "ada") -> None:
    sim.track(contact, "Product Viewed", {"product_id": "p-1", "name": name})


def test_two_hours_without_a_cart_or_an_order_send_the_push() -> None:
    sim = Simulation([BROWSE], T0)
    browser(sim)
    viewed(sim)

    sim.advance(timedelta(hours=2) - timedelta(seconds=1))
    assert sim.sent("ada") == []
    sim.advance(timedelta(seconds=1))

    (push,) = sim.sent("ada")
    assert (push.channel, push.template_id) == ("push", "browse-push")
    assert rendered(push, FILE).subject == "Still interested in Trail Boots?"
    assert sim.exits("ada") == ["completed"]


@pytest.mark.parametrize(
    ("event", "reason"),
    [("Product Added", "added to cart"), ("Order Completed", "ordered")],
)
def test_a_cart_or_an_order_within_two_hours_ends_it_without_a_push(
    event: str, reason: str
) -> None:
    sim = Simulation([BROWSE], T0)
    browser(sim)
    viewed(sim)
    sim.advance(timedelta(minutes=90))

    sim.track("ada", event, {"product_id": "p-1"})
    sim.advance(timedelta(hours=3))

    assert sim.sent("ada") == []
    assert sim.exits("ada") == [f"exit_rule:{reason}"]
    assert sim.waiting("ada") == 0


def test_more_views_while_waiting_start_nothing_more() -> None:
    sim = Simulation([BROWSE], T0)
    browser(sim)
    viewed(sim, "Trail Boots")
    sim.advance(timedelta(minutes=30))
    viewed(sim, "Rain Jacket")

    sim.advance(timedelta(hours=3))

    (push,) = sim.sent("ada")
    assert rendered(push, FILE).subject == "Still interested in Trail Boots?"


def test_at_most_one_push_per_seven_days() -> None:
    sim = Simulation([BROWSE], T0)
    browser(sim)
    viewed(sim)
    sim.advance(timedelta(days=1))
    viewed(sim, "Rain Jacket")
    sim.advance(timedelta(days=5))
    viewed(sim, "Wool Hat")
    sim.advance(timedelta(hours=3))
    assert len(sim.sent("ada")) == 1

    sim.advance(timedelta(days=1))  # seven days and a bit after the first entry
    viewed(sim, "Wool Hat")
    sim.advance(timedelta(hours=2))

    assert [rendered(s, FILE).subject for s in sim.sent("ada")] == [
        "Still interested in Trail Boots?",
        "Still interested in Wool Hat?",
    ]


def test_without_a_push_token_the_push_is_skipped_as_unreachable() -> None:
    sim = Simulation([BROWSE], T0)
    sim.identify("ada", email="ada@example.com")
    viewed(sim)

    sim.advance(timedelta(hours=2))

    assert sim.sent("ada") == []
    assert [r.reason for r in sim.log if r.kind == "skipped"] == ["unreachable"]
