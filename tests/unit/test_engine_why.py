"""The engine's why texts: each decision with the values that decided it, word for word."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import yaml

from shared.journey_engine.simulator import Simulation
from shared.journeys import JourneyFile

T0 = datetime(2026, 11, 3, 9, 0, tzinfo=UTC)


def journey_file(text: str) -> JourneyFile:
    return JourneyFile.model_validate(yaml.safe_load(text))


COUPON = """
journey:
  id: coupon
  name: Coupon for pro plans
  version: 1
  trigger:
    type: event
    event: Order Completed
    where: {field: event.properties.total, op: gte, value: 50}
  entry: {reentry: cooldown, cooldown: 7d}
  goals:
    - id: came-back
      event: Order Completed
      where: {field: event.properties.total, op: gte, value: 100}
  steps:
    - id: plan
      type: branch
      arms:
        - if: {field: traits.plan, op: eq, value: pro}
          next: coupon-email
      else: done
    - id: coupon-email
      type: send
      channels:
        - {channel: sms, template: coupon-sms}
        - {channel: email, template: coupon}
    - id: wait-order
      type: wait_for_event
      event: Order Completed
      timeout: 2d
    - id: done
      type: exit
"""


def whys(sim: Simulation, contact: str = "ada") -> list[tuple[str, str | None, str | None]]:
    return [(r.kind, r.step_id, r.why) for r in sim.log if r.contact_key == contact]


def ada(sim: Simulation, **traits: Any) -> None:
    sim.identify("ada", email="ada@example.com", **traits)


def test_a_branch_says_which_arm_and_the_value_it_read() -> None:
    sim = Simulation([journey_file(COUPON).journey], T0)
    ada(sim, plan="free")

    sim.track("ada", "Order Completed", {"total": 80})

    assert whys(sim) == [
        (
            "entered",
            None,
            "trigger event Order Completed; where event.properties.total ≥ 50"
            " held (event.properties.total = 80)",
        ),
        ("step_completed", "plan", "branch else: traits.plan = free"),
        ("exited", "done", "exit step done"),
    ]


def test_a_send_names_the_channels_passed_over_and_a_timeout_its_deadline() -> None:
    sim = Simulation([journey_file(COUPON).journey], T0)
    ada(sim, plan="pro")

    sim.track("ada", "Order Completed", {"total": 80})
    sim.advance(timedelta(days=3))

    assert whys(sim)[1:] == [
        ("step_completed", "plan", "branch arm 1: traits.plan = pro"),
        ("step_completed", "coupon-email", "send coupon on email; passed over sms: no address"),
        ("waiting", "wait-order", "wait for Order Completed until 2026-11-05 09:00 UTC"),
        ("step_completed", "wait-order", "timeout: no Order Completed by 2026-11-05 09:00 UTC"),
        ("exited", "done", "exit step done"),
    ]


def test_a_goal_names_the_values_that_reached_it() -> None:
    sim = Simulation([journey_file(COUPON).journey], T0)
    ada(sim, plan="pro")
    sim.track("ada", "Order Completed", {"total": 80})
    sim.advance(timedelta(hours=1))

    sim.track("ada", "Order Completed", {"total": 120})

    converted = [r.why for r in sim.log if r.kind == "converted"]
    assert converted == ["goal came-back: Order Completed (event.properties.total = 120)"]
    waited = [r.why for r in sim.log if r.step_id == "wait-order" and r.kind == "step_completed"]
    assert waited == ["Order Completed arrived"]


def test_refusals_name_the_trigger_condition_and_the_entry_rule() -> None:
    sim = Simulation([journey_file(COUPON).journey], T0)
    ada(sim, plan="free")

    sim.track("ada", "Order Completed", {"total": 20})
    sim.track("ada", "Order Completed", {"total": 70})
    sim.advance(timedelta(days=1))
    sim.track("ada", "Order Completed", {"total": 90})

    refused = [(r.reason, r.why) for r in sim.log if r.kind == "not_entered"]
    assert refused == [
        (
            "trigger",
            "not entered: trigger event Order Completed, but where event.properties.total ≥ 50"
            " failed (event.properties.total = 20)",
        ),
        ("cooldown", "not entered: re-entry after a cooldown of 7d, entered 2026-11-03"),
    ]
    # Only near misses are recorded: an event no trigger names leaves no record.
    sim.track("ada", "Page Viewed")
    assert len([r for r in sim.log if r.kind == "not_entered"]) == 2


def test_a_holdout_and_its_skips_say_so() -> None:
    text = COUPON.replace("cooldown, cooldown: 7d}", "never, holdout: 99.9}")
    sim = Simulation([journey_file(text).journey], T0)
    ada(sim, plan="pro")

    sim.track("ada", "Order Completed", {"total": 80})

    assert whys(sim)[1:4] == [
        ("holdout", None, "holdout: 99.9% of contacts receive nothing, this one among them"),
        ("step_completed", "plan", "branch arm 1: traits.plan = pro"),
        (
            "skipped",
            "coupon-email",
            "skipped: holdout, this contact receives nothing from the journey",
        ),
    ]


def test_the_same_refusal_again_is_not_recorded_again() -> None:
    sim = Simulation([journey_file(COUPON).journey], T0)
    ada(sim, plan="pro")
    sim.track("ada", "Order Completed", {"total": 80})  # enters; waits for the next order

    for total in (60, 70, 75):  # every later order is refused the same way: still in it
        sim.advance(timedelta(minutes=5))
        sim.track("ada", "Order Completed", {"total": total})

    refused = [(r.reason, r.why) for r in sim.log if r.kind == "not_entered"]
    assert refused == [
        ("cooldown", "not entered: re-entry after a cooldown of 7d, entered 2026-11-03"),
    ]


def test_a_refusal_that_says_something_new_is_recorded_and_entering_starts_afresh() -> None:
    sim = Simulation([journey_file(COUPON).journey], T0)
    ada(sim, plan="free")

    sim.track("ada", "Order Completed", {"total": 20})
    sim.track("ada", "Order Completed", {"total": 20})  # the same words: not again
    sim.track("ada", "Order Completed", {"total": 30})  # other values: recorded
    sim.track("ada", "Order Completed", {"total": 80})  # enters
    sim.advance(timedelta(days=8))  # the instance ended and the cooldown passed
    sim.track("ada", "Order Completed", {"total": 20})  # the same words as the first: recorded

    refused = [r.why for r in sim.log if r.kind == "not_entered"]
    failed = "not entered: trigger event Order Completed, but where event.properties.total ≥ 50"
    assert refused == [
        f"{failed} failed (event.properties.total = 20)",
        f"{failed} failed (event.properties.total = 30)",
        f"{failed} failed (event.properties.total = 20)",
    ]


BIG_ORDER = """
journey:
  id: big-order
  name: Thanks for a big order
  version: 1
  trigger: {type: event, event: Cart Viewed}
  entry: {reentry: after_exit}
  steps:
    - id: wait-order
      type: wait_for_event
      event: Order Completed
      where:
        all:
          - {field: event.properties.total, op: gte, value: 100}
          - {field: event.properties.currency, op: eq, value: EUR}
      timeout: 2d
    - id: done
      type: exit
"""


def misses(sim: Simulation) -> list[tuple[str | None, str | None, str | None]]:
    return [
        (r.reason, r.detail, r.why)
        for r in sim.log
        if r.kind == "waiting" and r.reason == "where_failed"
    ]


def test_an_event_that_fails_the_waits_where_says_which_part_and_the_value_read() -> None:
    sim = Simulation([journey_file(BIG_ORDER).journey], T0)
    ada(sim)
    sim.track("ada", "Cart Viewed")
    sim.advance(timedelta(hours=1))

    sim.track("ada", "Order Completed", {"total": 40, "currency": "EUR"})

    assert misses(sim) == [
        (
            "where_failed",
            "1",
            "not moved on: Order Completed arrived, but where"
            " all(event.properties.total ≥ 100, event.properties.currency = EUR) failed"
            " (event.properties.total = 40); still waiting until 2026-11-05 09:00 UTC",
        )
    ]
    # The instance still waits at the step: the next matching order ends the wait.
    sim.track("ada", "Order Completed", {"total": 140, "currency": "EUR"})
    assert whys(sim)[-2:] == [
        (
            "step_completed",
            "wait-order",
            "Order Completed arrived (event.properties.total = 140,"
            " event.properties.currency = EUR)",
        ),
        ("exited", "done", "exit step done"),
    ]


def test_only_the_first_misses_of_a_wait_are_recorded_and_a_new_wait_counts_again() -> None:
    sim = Simulation([journey_file(BIG_ORDER).journey], T0)
    ada(sim)
    sim.track("ada", "Cart Viewed")

    for total in (10, 20, 30, 40, 50):
        sim.track("ada", "Order Completed", {"total": total, "currency": "EUR"})
    sim.track("ada", "Order Completed", {"total": 500, "currency": "USD"})
    sim.track("ada", "Page Viewed")  # an event the wait does not name is never recorded

    recorded = misses(sim)
    assert [detail for _reason, detail, _why in recorded] == ["1", "2", "3"]
    assert "(event.properties.total = 30)" in str(recorded[2][2])
    assert str(recorded[2][2]).endswith("; later Order Completed that fail it are not recorded")
    assert len({r.record_id for r in sim.log}) == len(sim.log)

    # The wait times out and the contact enters again: the new wait records its own misses.
    sim.advance(timedelta(days=3))
    sim.track("ada", "Cart Viewed")
    sim.track("ada", "Order Completed", {"total": 60, "currency": "EUR"})
    assert [detail for _reason, detail, _why in misses(sim)] == ["1", "2", "3", "1"]
