"""S8 Price drop: one object event reaches every related contact with one push each."""

from __future__ import annotations

from shared.journey_engine.simulator import Simulation
from tests.scenarios.conftest import T0, definition, rendered

FILE = definition("s08-price-drop")
PRICE_DROP = FILE.journey
DROP = {"product_id": "p-7", "name": "Orbit Lamp", "old_price": 129.0, "new_price": 99.0}


def viewers(sim: Simulation, *contacts: str) -> None:
    for contact in contacts:
        sim.identify(contact, push_tokens=[f"tok-{contact}"])


def test_the_trigger_names_who_is_related_to_the_product() -> None:
    trigger = PRICE_DROP.trigger
    assert trigger.type == "object_event"
    assert (trigger.related_by.event, trigger.related_by.property) == (
        "Product Viewed",
        "product_id",
    )
    assert trigger.related_by.within == "30d"


def test_every_related_contact_gets_one_push_with_both_prices() -> None:
    sim = Simulation([PRICE_DROP], T0)
    viewers(sim, "ada", "bob", "cyd")

    sim.object_event("Price Dropped", DROP, related=["ada", "bob"])

    assert sorted(s.contact_key for s in sim.sent()) == ["ada", "bob"]
    for push in sim.sent():
        message = rendered(push, FILE)
        assert message.subject == "Orbit Lamp is cheaper now"
        assert message.text == "Now 99.0 instead of 129.0. https://acme.example/p/p-7"
    assert sim.sent("cyd") == []


def test_a_replayed_drop_sends_nothing_twice() -> None:
    sim = Simulation([PRICE_DROP], T0)
    viewers(sim, "ada")

    sim.object_event("Price Dropped", DROP, related=["ada"])
    sim.object_event("Price Dropped", DROP, related=["ada"])

    assert len(sim.sent("ada")) == 1


def test_a_later_drop_of_the_same_product_is_a_new_push() -> None:
    sim = Simulation([PRICE_DROP], T0)
    viewers(sim, "ada")

    sim.object_event("Price Dropped", DROP, related=["ada"])
    sim.object_event("Price Dropped", {**DROP, "old_price": 99.0, "new_price": 79.0}, ["ada"])

    texts = [rendered(s, FILE).text for s in sim.sent("ada")]
    assert texts == [
        "Now 99.0 instead of 129.0. https://acme.example/p/p-7",
        "Now 79.0 instead of 99.0. https://acme.example/p/p-7",
    ]


def test_a_drop_without_a_new_price_enters_nobody() -> None:
    sim = Simulation([PRICE_DROP], T0)
    viewers(sim, "ada")

    sim.object_event("Price Dropped", {"product_id": "p-7"}, related=["ada"])

    assert sim.sent() == []
