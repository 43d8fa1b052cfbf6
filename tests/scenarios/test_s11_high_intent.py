"""S11 High-intent segment: entering it nudges at once (the segment itself is the segmenter's)."""

from __future__ import annotations

from datetime import timedelta

from shared.conditions import condition_from, evaluate, facts_of
from shared.contracts import Profile
from shared.journey_engine.simulator import Simulation
from tests.scenarios.conftest import T0, definition, rendered, segment_in_header

FILE = definition("s11-high-intent")
NUDGE = FILE.journey


def test_entering_the_segment_sends_a_push_at_once() -> None:
    sim = Simulation([NUDGE], T0)
    sim.identify("ada", push_tokens=["tok-1"], email="ada@example.com")

    sim.segment_changed("ada", "high-intent")

    (push,) = sim.sent("ada")
    assert (push.channel, push.template_id) == ("push", "high-intent-push")
    assert rendered(push, FILE).subject == "Still deciding?"


def test_without_a_push_token_the_nudge_is_an_email() -> None:
    sim = Simulation([NUDGE], T0)
    sim.identify("ada", email="ada@example.com")

    sim.segment_changed("ada", "high-intent")

    (email,) = sim.sent("ada")
    assert (email.channel, email.template_id) == ("email", "high-intent-email")


def test_leaving_or_another_segment_starts_nothing() -> None:
    sim = Simulation([NUDGE], T0)
    sim.identify("ada", push_tokens=["tok-1"])

    sim.segment_changed("ada", "high-intent", entered=False)
    sim.segment_changed("ada", "churn-risk")

    assert sim.sent("ada") == []


def test_flapping_in_and_out_nudges_at_most_once_a_week() -> None:
    sim = Simulation([NUDGE], T0)
    sim.identify("ada", push_tokens=["tok-1"])
    sim.segment_changed("ada", "high-intent")
    sim.advance(timedelta(days=2))
    sim.segment_changed("ada", "high-intent", entered=False)
    sim.advance(timedelta(days=1))
    sim.segment_changed("ada", "high-intent")
    assert len(sim.sent("ada")) == 1

    sim.advance(timedelta(days=5))
    sim.segment_changed("ada", "high-intent", entered=False)
    sim.segment_changed("ada", "high-intent")

    assert len(sim.sent("ada")) == 2


def test_the_segment_condition_in_the_header_is_valid_and_reads_as_specified() -> None:
    segment = segment_in_header("s11-high-intent", "high-intent")
    condition = condition_from(segment["condition"])

    def member(**aggregates: object) -> bool:
        profile = Profile(
            contact_key="ada", first_seen=T0, last_seen=T0, updated_at=T0, aggregates=aggregates
        )
        return evaluate(condition, facts_of(profile), T0)

    assert segment["id"] == "high-intent"
    assert member(product_views_7d=2, orders_7d=0, lifetime_value=150)
    assert member(product_views_7d=3, lifetime_value=101)  # no order ever: the count is absent
    assert not member(product_views_7d=1, orders_7d=0, lifetime_value=150)
    assert not member(product_views_7d=5, orders_7d=1, lifetime_value=150)
    assert not member(product_views_7d=5, orders_7d=0, lifetime_value=100)
