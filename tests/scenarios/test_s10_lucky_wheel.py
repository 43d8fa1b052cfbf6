"""S10 Lucky wheel: a prize by value and propensity, a coupon until local midnight, daily."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from shared.journey_engine.simulator import Simulation
from tests.scenarios.conftest import definition, rendered

FILE = definition("s10-lucky-wheel")
WHEEL = FILE.journey
# 10:00 in Seoul (UTC+9), the journey's zone.
MORNING = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)


def player(sim: Simulation, contact: str = "min", **traits: object) -> None:
    sim.identify(contact, push_tokens=["tok-1"], **traits)


@pytest.mark.parametrize(
    ("traits", "template", "prefix"),
    [
        ({"revenue_tier": "high", "purchase_propensity": 0.2}, "wheel-30000", "WHEEL30K-"),
        ({"revenue_tier": "high", "purchase_propensity": 0.9}, "wheel-5000", "WHEEL5K-"),
        ({"revenue_tier": "low", "purchase_propensity": 0.85}, "wheel-5000", "WHEEL5K-"),
        ({"revenue_tier": "mid", "purchase_propensity": 0.3}, "wheel-10000", "WHEEL10K-"),
        ({}, "wheel-10000", "WHEEL10K-"),
    ],
)
def test_the_prize_follows_value_and_propensity(
    traits: dict[str, object], template: str, prefix: str
) -> None:
    sim = Simulation([WHEEL], MORNING)
    player(sim, **traits)

    sim.track("min", "Application Opened")

    (push,) = sim.sent("min")
    assert (push.channel, push.template_id) == ("push", template)
    code = push.context["coupon"]["code"]
    assert code.startswith(prefix)
    assert rendered(push, FILE).text.endswith(f"valid until tonight: {code}")
    assert [c.code for c in sim.profile("min").coupons] == [code]


def test_the_coupon_expires_at_the_end_of_the_contacts_local_day() -> None:
    sim = Simulation([WHEEL], MORNING)
    player(sim, timezone="Europe/Warsaw")

    sim.track("min", "Application Opened")

    (coupon,) = sim.profile("min").coupons
    # 02:00 in Warsaw on 2 March: the day ends at 23:59:59 local time (UTC+1).
    assert coupon.expires_at == datetime(2026, 3, 2, 22, 59, 59, tzinfo=UTC)


def test_without_a_zone_trait_the_journeys_zone_decides_the_day() -> None:
    sim = Simulation([WHEEL], MORNING)
    player(sim)

    sim.track("min", "Application Opened")

    (coupon,) = sim.profile("min").coupons
    assert coupon.expires_at == datetime(2026, 3, 2, 14, 59, 59, tzinfo=UTC)  # Seoul midnight


def test_at_most_one_spin_per_local_day() -> None:
    sim = Simulation([WHEEL], MORNING)
    player(sim)
    sim.track("min", "Application Opened")
    sim.advance(timedelta(hours=13))  # 23:00 in Seoul, same day

    sim.track("min", "Application Opened")
    assert len(sim.sent("min")) == 1

    sim.advance(timedelta(hours=1, minutes=1))  # 00:01 the next day in Seoul
    sim.track("min", "Application Opened")

    codes = [s.context["coupon"]["code"] for s in sim.sent("min")]
    assert len(codes) == 2
    assert codes[0] != codes[1]


def test_a_local_day_is_the_contacts_own() -> None:
    # 23:30 UTC is already the next morning in Seoul but still the same evening in London.
    evening = datetime(2026, 3, 2, 22, 0, tzinfo=UTC)
    sim = Simulation([WHEEL], evening)
    player(sim, "ldn", timezone="Europe/London")
    sim.track("ldn", "Application Opened")

    sim.advance(timedelta(hours=1, minutes=30))
    sim.track("ldn", "Application Opened")
    assert len(sim.sent("ldn")) == 1

    sim.advance(timedelta(hours=1))  # 00:30 in London
    sim.track("ldn", "Application Opened")
    assert len(sim.sent("ldn")) == 2
