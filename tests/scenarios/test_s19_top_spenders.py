"""S19 Top spenders: two orders above 100 EUR in a row earn a coupon a month later."""

from __future__ import annotations

from datetime import timedelta

import pytest

from shared.journey_engine.simulator import Simulation
from tests.scenarios.conftest import T0, definition, rendered

FILE = definition("s19-top-spenders")
TOP = FILE.journey
MONTH = timedelta(days=30)


def order(sim: Simulation, revenue: float, currency: str = "EUR") -> None:
    sim.track("ada", "Order Completed", {"revenue": revenue, "currency": currency})


def customer(sim: Simulation) -> None:
    sim.identify("ada", email="ada@example.com", first_name="Ada")


def test_two_orders_above_100_send_a_coupon_mentioning_both_a_month_later() -> None:
    sim = Simulation([TOP], T0)
    customer(sim)
    order(sim, 120.5)
    sim.advance(timedelta(days=10))
    order(sim, 180)

    sim.advance(MONTH - timedelta(seconds=1))
    assert sim.sent("ada") == []
    sim.advance(timedelta(seconds=1))

    (email,) = sim.sent("ada")
    assert email.requested_at == T0 + timedelta(days=40)
    assert email.context["first_revenue"] == 120.5
    assert email.context["second_order"]["properties"]["revenue"] == 180
    text = rendered(email, FILE).text
    assert "120.5 EUR and 180 EUR" in text
    assert email.context["coupon"]["code"] in text
    assert email.context["coupon"]["code"].startswith("TOP10-")


@pytest.mark.parametrize("second", [100, 99.99, 40])
def test_a_second_order_of_100_or_less_ends_it(second: float) -> None:
    sim = Simulation([TOP], T0)
    customer(sim)
    order(sim, 150)
    sim.advance(timedelta(days=3))

    order(sim, second)
    sim.advance(2 * MONTH)

    assert sim.sent("ada") == []
    assert sim.exits("ada") == ["exit_step"]


@pytest.mark.parametrize("first", [100, 80])
def test_a_first_order_of_100_or_less_does_not_enter(first: float) -> None:
    sim = Simulation([TOP], T0)
    customer(sim)

    order(sim, first)

    assert not any(r.kind == "entered" for r in sim.log)


def test_orders_in_another_currency_do_not_count() -> None:
    sim = Simulation([TOP], T0)
    customer(sim)
    order(sim, 500, currency="USD")
    assert not any(r.kind == "entered" for r in sim.log)

    order(sim, 150)
    order(sim, 500, currency="USD")
    sim.advance(2 * MONTH)

    assert sim.sent("ada") == []


def test_the_entering_order_is_not_taken_for_the_next_one() -> None:
    sim = Simulation([TOP], T0)
    customer(sim)

    order(sim, 150)
    sim.advance(2 * MONTH)

    assert sim.sent("ada") == []
    assert sim.waiting("ada") == 1
    (instance,) = sim.states["ada"].instances.values()
    assert instance.step_id == "next-order"


def test_orders_during_the_month_wait_start_no_second_instance() -> None:
    sim = Simulation([TOP], T0)
    customer(sim)
    order(sim, 150)
    order(sim, 200)
    sim.advance(timedelta(days=5))

    order(sim, 300)
    sim.advance(MONTH)

    assert len(sim.sent("ada")) == 1
    assert sum(1 for r in sim.log if r.kind == "entered") == 1


def test_no_second_order_within_180_days_ends_it() -> None:
    sim = Simulation([TOP], T0)
    customer(sim)
    order(sim, 150)

    sim.advance(timedelta(days=180))

    assert sim.exits("ada") == ["exit_step"]
    assert sim.sent("ada") == []
