"""Dry runs of a draft: the real engine in virtual time, with sends and changes as "would …"."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import yaml
from pydantic import ValidationError

from shared.contracts import Profile
from shared.journey_engine.dry_run import WEBHOOK_NOTE, DryRunResult, PastedEvent, dry_run
from shared.journeys import Journey, JourneyFile

T0 = datetime(2026, 11, 3, 9, 0, tzinfo=UTC)
CART = """
journey:
  id: cart
  name: Cart reminder
  version: 2
  trigger: {type: event, event: Cart Updated}
  goals:
    - {id: bought, event: Order Completed, exit: true}
  steps:
    - {id: wait-order, type: wait_for_event, event: Order Completed, timeout: 1h}
    - id: plan
      type: branch
      arms:
        - {if: {field: traits.plan, op: eq, value: pro}, next: split}
      else: done
    - id: split
      type: split
      variants:
        - {name: A, weight: 50}
        - {name: B, weight: 50}
    - id: nudge
      type: send
      channels:
        - {channel: sms, template: cart-sms}
        - {channel: email, template: cart-nudge}
    - {id: pause, type: wait, duration: 1d}
    - {id: tag, type: update_contact, add_tags: [nudged]}
    - {id: done, type: exit}
"""


def cart(text: str = CART) -> Journey:
    return JourneyFile.model_validate(yaml.safe_load(text)).journey


def path(result: DryRunResult) -> list[tuple[str, str, str | None, str]]:
    return [
        (line.at.strftime("%d %H:%M"), line.kind, line.step_id, line.text) for line in result.lines
    ]


def test_a_timeout_a_branch_a_split_a_send_and_a_wait_play_in_virtual_time() -> None:
    events = (
        PastedEvent(type="identify", traits={"email": "ada@example.com", "plan": "pro"}),
        PastedEvent(event="Cart Updated", properties={"total": 30}),
    )

    result = dry_run(cart(), T0, contact_key="ada", events=events)

    assert path(result) == [
        ("03 09:00", "event", None, "identify email = ada@example.com, plan = pro"),
        ("03 09:00", "event", None, "Cart Updated (total = 30)"),
        ("03 09:00", "entered", None, "trigger event Cart Updated"),
        (
            "03 09:00",
            "waiting",
            "wait-order",
            "wait for Order Completed until 2026-11-03 10:00 UTC",
        ),
        (
            "03 10:00",
            "step_completed",
            "wait-order",
            "timeout: no Order Completed by 2026-11-03 10:00 UTC",
        ),
        ("03 10:00", "step_completed", "plan", "branch arm 1: traits.plan = pro"),
        ("03 10:00", "step_completed", "split", "split: variant A (weights A 50, B 50)"),
        (
            "03 10:00",
            "would_send",
            "nudge",
            "would send template cart-nudge on channel email; passed over sms: no address",
        ),
        ("03 10:00", "waiting", "pause", "wait until 2026-11-04 10:00 UTC"),
        ("04 10:00", "step_completed", "pause", "waited until 2026-11-04 10:00 UTC"),
        ("04 10:00", "would_change", "tag", "would add tag nudged"),
        ("04 10:00", "step_completed", "tag", "update contact: add tag nudged"),
        ("04 10:00", "exited", "done", "exit step done"),
    ]
    assert result.outcome == "ended: exit_step"
    assert WEBHOOK_NOTE not in result.notes


def test_a_pasted_event_ends_a_wait_and_reaches_the_goal() -> None:
    events = (PastedEvent(event="Cart Updated"), PastedEvent(event="Order Completed", after="30m"))

    result = dry_run(cart(), T0, contact_key="ada", events=events)

    assert path(result)[3:] == [
        ("03 09:30", "event", None, "Order Completed"),
        ("03 09:30", "converted", None, "goal bought: Order Completed"),
        ("03 09:30", "exited", "wait-order", "goal bought reached: exit"),
    ]
    assert result.outcome == "ended: goal:bought"


def test_a_stored_profile_starts_the_run_and_the_trigger_plays_itself() -> None:
    profile = Profile(
        contact_key="stored",
        traits={"plan": "free"},
        first_seen=T0,
        last_seen=T0,
        updated_at=T0,
    )

    result = dry_run(cart(), T0, contact_key="ada", profile=profile)

    texts = [line.text for line in result.lines]
    assert texts[0] == "Cart Updated (the trigger, with no properties)"
    assert "branch else: traits.plan = free" in texts
    assert not [line for line in result.lines if line.kind == "would_send"]


def test_a_refused_entry_is_the_outcome() -> None:
    text = CART.replace(
        "trigger: {type: event, event: Cart Updated}",
        "trigger: {type: event, event: Cart Updated, where: {currency: EUR}}",
    )

    result = dry_run(cart(text), T0, contact_key="ada", events=(PastedEvent(event="Cart Updated"),))

    assert result.outcome == (
        "not entered: trigger event Cart Updated, but where event.properties.currency = EUR"
        " failed (event.properties.currency is absent)"
    )


def test_a_webhook_is_not_called_and_the_run_says_so() -> None:
    text = CART.replace(
        "    - {id: done, type: exit}",
        "    - {id: tell-crm, type: webhook, url: 'https://crm.example.com/hook', timeout: 5s}\n"
        "    - {id: done, type: exit}",
    ).replace("else: done", "else: tell-crm")

    result = dry_run(cart(text), T0, contact_key="ada", events=(PastedEvent(event="Cart Updated"),))

    calls = [line.text for line in result.lines if line.kind == "would_call"]
    assert calls == [
        "would call POST https://crm.example.com/hook (not called: taken as answered 200)"
    ]
    assert WEBHOOK_NOTE in result.notes


def test_a_track_event_needs_a_name_and_a_delay_a_duration() -> None:
    with pytest.raises(ValidationError, match="needs 'event'"):
        PastedEvent(properties={"a": 1})
    with pytest.raises(ValidationError, match="after"):
        PastedEvent(event="X", after="soon")
