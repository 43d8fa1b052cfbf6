"""S7 Cross-sell: adding a product pushes its complement at once; the template holds the pairs."""

from __future__ import annotations

from datetime import timedelta

import pytest

from shared.journey_engine.simulator import Simulation
from tests.scenarios.conftest import T0, definition, rendered

FILE = definition("s07-cross-sell")
CROSS_SELL = FILE.journey


@pytest.mark.parametrize(
    ("category", "complement"),
    [
        ("shoes", "Complete it with Merino socks: https://acme.example/p/merino-socks"),
        ("cameras", "Complete it with a 128 GB memory card: https://acme.example/p/sd-128"),
        ("garden", "Complete it with our new arrivals: https://acme.example/new"),
    ],
)
def test_the_push_offers_the_complement_of_the_added_category(
    category: str, complement: str
) -> None:
    sim = Simulation([CROSS_SELL], T0)
    sim.identify("ada", push_tokens=["tok-1"])

    sim.track("ada", "Product Added", {"product_id": "p-9", "name": "Item", "category": category})

    (push,) = sim.sent("ada")
    assert (push.channel, push.requested_at) == ("push", T0)
    message = rendered(push, FILE)
    assert message.text == complement
    assert message.subject == "Goes well with your Item"


def test_each_addition_cross_sells_once() -> None:
    sim = Simulation([CROSS_SELL], T0)
    sim.identify("ada", push_tokens=["tok-1"])

    sim.track("ada", "Product Added", {"product_id": "p-1", "category": "shoes"})
    sim.advance(timedelta(minutes=5))
    sim.track("ada", "Product Added", {"product_id": "p-2", "category": "coffee"})

    texts = [rendered(s, FILE).text for s in sim.sent("ada")]
    assert texts == [
        "Complete it with Merino socks: https://acme.example/p/merino-socks",
        "Complete it with the burr grinder: https://acme.example/p/grinder",
    ]
    assert len({s.message_id for s in sim.sent("ada")}) == 2
