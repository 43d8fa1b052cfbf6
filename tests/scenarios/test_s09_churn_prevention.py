"""S9 Churn prevention: four weekly emails, an order ends it, a holdout measures the uplift."""

from __future__ import annotations

from datetime import timedelta

from shared.conditions import condition_from, evaluate, facts_of, next_change
from shared.contracts import Profile
from shared.journey_engine.simulator import Simulation
from tests.scenarios.conftest import T0, definition, rendered, segment_in_header

FILE = definition("s09-churn-prevention")
CHURN = FILE.journey
WEEK = timedelta(days=7)
WEEKLY = ["churn-week-1", "churn-week-2", "churn-week-3", "churn-week-4"]


def at_risk(sim: Simulation, contact: str) -> None:
    sim.identify(contact, email=f"{contact}@example.com")
    sim.segment_changed(contact, "churn-risk")


def holdout_of(sim: Simulation) -> set[str]:
    return {r.contact_key for r in sim.log if r.kind == "holdout"}


def treated_contact(sim: Simulation) -> str:
    """The first of c-0, c-1, … that the stable holdout hash treats (9 in 10 are)."""
    for n in range(100):
        contact = f"c-{n}"
        at_risk(sim, contact)
        if contact not in holdout_of(sim):
            return contact
    raise AssertionError("no treated contact")


def held_out_contact(sim: Simulation) -> str:
    for n in range(200):
        contact = f"h-{n}"
        at_risk(sim, contact)
        if contact in holdout_of(sim):
            return contact
    raise AssertionError("no holdout contact")


def test_one_different_email_a_week_for_four_weeks() -> None:
    sim = Simulation([CHURN], T0)
    contact = treated_contact(sim)

    sim.advance(4 * WEEK + timedelta(days=1))

    sends = sim.sent(contact)
    assert [s.template_id for s in sends] == WEEKLY
    assert [s.requested_at - T0 for s in sends] == [n * WEEK for n in range(4)]
    assert len({rendered(s, FILE).subject for s in sends}) == 4
    assert sim.exits(contact) == ["exit_step"]


def test_an_order_mid_wait_ends_the_journey_at_once_and_converts() -> None:
    sim = Simulation([CHURN], T0)
    contact = treated_contact(sim)
    sim.advance(WEEK + timedelta(days=2))

    sim.track(contact, "Order Completed", {"order_id": "o-1", "revenue": 80})
    sim.advance(5 * WEEK)

    assert [s.template_id for s in sim.sent(contact)] == WEEKLY[:2]
    assert sim.exits(contact) == ["exit_rule:ordered"]
    assert sim.waiting(contact) == 0
    (converted,) = [r for r in sim.log if r.kind == "converted"]
    assert (converted.contact_key, converted.detail, converted.holdout) == (
        contact,
        "ordered",
        False,
    )


def test_a_holdout_contact_enters_receives_nothing_and_its_conversion_is_logged() -> None:
    sim = Simulation([CHURN], T0)
    contact = held_out_contact(sim)
    sim.advance(2 * WEEK)

    sim.track(contact, "Order Completed", {"order_id": "o-2"})

    assert sim.sent(contact) == []
    skipped = [r for r in sim.log if r.contact_key == contact and r.kind == "skipped"]
    assert {(r.step_id, r.reason) for r in skipped} == {
        ("week-1", "holdout"),
        ("week-2", "holdout"),
        ("week-3", "holdout"),
    }
    (converted,) = [r for r in sim.log if r.kind == "converted" and r.contact_key == contact]
    assert converted.holdout is True
    assert sim.exits(contact) == ["exit_rule:ordered"]


def test_about_a_tenth_of_contacts_are_held_out_and_conversion_splits_by_group() -> None:
    sim = Simulation([CHURN], T0)
    contacts = [f"c-{n}" for n in range(400)]
    for contact in contacts:
        at_risk(sim, contact)
    held_out = holdout_of(sim)
    sim.advance(timedelta(days=10))
    for contact in contacts[::5]:
        sim.track(contact, "Order Completed", {"order_id": f"o-{contact}"})

    assert 20 <= len(held_out) <= 60
    assert not any(s.contact_key in held_out for s in sim.sent())
    converted = [r for r in sim.log if r.kind == "converted"]
    by_group = {
        True: sum(r.holdout for r in converted),
        False: sum(not r.holdout for r in converted),
    }
    assert by_group[True] + by_group[False] == 80
    assert by_group[True] == sum(1 for c in contacts[::5] if c in held_out)
    entered = [r for r in sim.log if r.kind == "entered"]
    assert sum(r.holdout for r in entered) == len(held_out)


def test_an_order_after_the_last_email_still_counts_within_the_attribution_week() -> None:
    sim = Simulation([CHURN], T0)
    contact = treated_contact(sim)
    sim.advance(3 * WEEK + timedelta(days=4))

    sim.track(contact, "Order Completed", {"order_id": "o-3"})

    assert [r.detail for r in sim.log if r.kind == "converted"] == ["ordered"]


def test_leaving_and_reentering_the_segment_later_starts_again_after_the_end() -> None:
    sim = Simulation([CHURN], T0)
    contact = treated_contact(sim)
    sim.track(contact, "Order Completed", {"order_id": "o-1"})
    sim.segment_changed(contact, "churn-risk", entered=False)
    sim.advance(timedelta(days=100))

    sim.segment_changed(contact, "churn-risk")

    assert [s.template_id for s in sim.sent(contact)] == ["churn-week-1", "churn-week-1"]


def test_the_segment_in_the_header_holds_90_days_after_the_last_order() -> None:
    segment = segment_in_header("s09-churn-prevention", "churn-risk")
    condition = condition_from(segment["condition"])
    last_order = T0 - timedelta(days=60)
    profile = Profile(
        contact_key="ada",
        first_seen=T0,
        last_seen=T0,
        updated_at=T0,
        aggregates={"orders_total": 2, "last_order_at": last_order.isoformat()},
    )
    facts = facts_of(profile)

    assert segment["id"] == "churn-risk"
    assert not evaluate(condition, facts, T0)
    # With no new event, time alone makes the contact a member: the segmenter's timer.
    flips_at = next_change(condition, facts, T0)
    assert flips_at is not None
    assert last_order + timedelta(days=90) < flips_at <= last_order + timedelta(days=90, seconds=1)
    assert evaluate(condition, facts, flips_at)
    never_ordered = profile.model_copy(update={"aggregates": {"orders_total": 0}})
    assert not evaluate(condition, facts_of(never_ordered), T0 + timedelta(days=365))
