"""The admin's live figures (pure): where a journey's instances stand from its log, a contact's
journeys, delivery funnels from ledger states, and the flow drawn from a definition."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from jinja2 import Environment, FileSystemLoader
from pydantic import ValidationError

from services.admin.domain.contact_changes import ContactChanges, change_commands
from services.admin.domain.figures import FUNNEL, contact_positions, funnels, journey_figures
from services.admin.domain.flow import flow, trigger_summary
from services.admin.domain.versions import definition_diff, journey_changes
from services.admin.ui.pages import HERE, NAV
from shared.journeys import Journey, JourneyFile

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "journeys"
TEMPLATES = HERE / "templates"


def _record(
    instance: str, kind: str, step: str | None = None, minutes: int = 0, **more: Any
) -> dict[str, Any]:
    return {
        "instance_id": instance,
        "journey_id": "welcome",
        "journey_version": 1,
        "kind": kind,
        "step_id": step,
        "at": T0 + timedelta(minutes=minutes),
        **more,
    }


def test_each_instance_stands_where_its_last_record_says() -> None:
    records = [
        # a: sent the welcome and waits at the pause (same instant: the order of the engine)
        _record("a", "entered"),
        _record("a", "waiting", "pause"),
        _record("a", "step_completed", "hello", detail="email"),
        # b: waited, moved on, was skipped at the reminder, and exited at the end
        _record("b", "entered"),
        _record("b", "step_completed", "hello", detail="email"),
        _record("b", "waiting", "pause"),
        _record("b", "step_completed", "pause", 60, detail="due"),
        _record("b", "skipped", "reminder", 60, reason="unreachable"),
        _record("b", "exited", "reminder", 60, reason="end"),
        _record("b", "converted", None, 61, detail="ordered"),
    ]

    figures = journey_figures(reversed(records)).as_dict()

    assert figures["entered"] == 2
    assert figures["active_now"] == 1
    assert figures["converted"] == 1
    assert figures["exited"] == {"end": 1}
    assert figures["steps"]["hello"] == {
        "reached": 2,
        "waiting_now": 0,
        "moved_on": 2,
        "skipped": {},
        "outcomes": {"email": 2},
    }
    assert figures["steps"]["pause"]["waiting_now"] == 1
    assert figures["steps"]["pause"]["reached"] == 2
    assert figures["steps"]["reminder"]["skipped"] == {"unreachable": 1}


def test_a_contact_s_journeys_newest_first_with_the_step_each_is_at() -> None:
    records = [
        _record("a", "entered"),
        _record("a", "waiting", "pause", 1),
        _record("c", "entered", minutes=5),
        _record("c", "exited", "hello", 5, reason="ordered"),
        _record("c", "converted", None, 5),
    ]

    positions = contact_positions(records)

    assert [(p["instance_id"], p["state"], p["step_id"]) for p in positions] == [
        ("c", "exited", "hello"),
        ("a", "waiting", "pause"),
    ]
    assert positions[0]["converted"] is True
    assert positions[0]["reason"] == "ordered"


def test_an_event_that_failed_a_wait_s_where_leaves_the_instance_waiting_there() -> None:
    records = [
        _record("a", "entered"),
        _record("a", "waiting", "wait-order", 1, detail="timeout"),
        _record("a", "waiting", "wait-order", 30, reason="where_failed", detail="1"),
    ]

    figures = journey_figures(records).as_dict()
    (position,) = contact_positions(records)

    assert figures["steps"]["wait-order"]["waiting_now"] == 1
    assert figures["steps"]["wait-order"]["reached"] == 1
    assert figures["active_now"] == 1
    assert (position["state"], position["step_id"]) == ("waiting", "wait-order")


def test_a_funnel_counts_each_stage_reached_and_ends_by_reason() -> None:
    rows = [
        {"journey_id": "w", "state": "clicked", "count": 1},
        {"journey_id": "w", "state": "opened", "count": 2},
        {"journey_id": "w", "state": "delivered", "count": 3},
        {"journey_id": "w", "state": "sent", "count": 4},
        {"journey_id": "w", "state": "skipped", "reason": "no_address", "count": 5},
        {"journey_id": "w", "state": "failed", "reason": "bounced", "count": 1},
        {"journey_id": "w", "state": "retrying", "count": 2},
        {"journey_id": "w", "state": "unknown", "reason": "a worker stopped", "count": 2},
        {"journey_id": "x", "state": "sent", "count": 1},
    ]

    found = funnels(rows, "journey_id")

    assert [f["journey_id"] for f in found] == ["w", "x"]
    assert found[0]["stages"] == {
        "requested": 20,
        "sent": 10,
        "delivered": 6,
        "opened": 3,
        "clicked": 1,
    }
    assert found[0]["skipped"] == {"no_address": 5}
    assert found[0]["failed"] == {"bounced": 1}
    assert found[0]["unknown"] == {"a worker stopped": 2}  # concluded, not in flight
    assert found[0]["in_flight"] == 2
    assert found[0]["rates"]["sent"] == round(10 / 20, 4)
    with pytest.raises(ValueError, match="by must be one of"):
        funnels(rows, "contact_key")


def test_the_flow_has_a_box_per_step_with_its_ways_out() -> None:
    journey = Journey.model_validate(
        {
            "id": "cart",
            "name": "Cart",
            "trigger": {"event": "Product Added"},
            "steps": [
                {
                    "id": "wait-order",
                    "type": "wait_for_event",
                    "event": "Order Completed",
                    "timeout": "1h",
                    "on_event": "done",
                },
                {
                    "id": "check",
                    "type": "branch",
                    "arms": [
                        {"if": {"field": "traits.plan", "op": "eq", "value": "pro"}, "next": "done"}
                    ],
                },
                {"id": "remind", "type": "send", "template": "cart-email"},
                {"id": "done", "type": "exit"},
            ],
        }
    )

    boxes = {box.step_id: box for box in flow(journey)}

    assert [(e.label, e.target, e.straight_on) for e in boxes["wait-order"].edges] == [
        ("on Order Completed", "done", False),
        ("after 1h", "check", True),
    ]
    assert [(e.label, e.target) for e in boxes["check"].edges] == [
        ("if traits.plan eq pro", "done"),
        ("else", "remind"),
    ]
    assert boxes["remind"].summary == "email: cart-email"
    assert boxes["wait-order"].waits
    assert boxes["done"].edges == ()


def test_changes_between_versions_name_the_step_and_the_field() -> None:
    before = {
        "id": "cart",
        "version": 1,
        "name": "Cart",
        "trigger": {"type": "event", "event": "Product Added"},
        "steps": [
            {"id": "wait", "type": "wait", "duration": "1h"},
            {"id": "remind", "type": "send", "template": "cart-email"},
            {"id": "old", "type": "exit"},
        ],
    }
    after = {
        "id": "cart",
        "version": 2,
        "name": "Cart reminder",
        "trigger": {"type": "event", "event": "Product Added"},
        "steps": [
            {"id": "wait", "type": "wait", "duration": "2h"},
            {"id": "remind", "type": "send", "template": "cart-email"},
            {"id": "coupon", "type": "coupon", "prefix": "C-"},
        ],
    }

    found = [(c.where, c.kind, c.field, c.before, c.after) for c in journey_changes(before, after)]

    assert found == [
        ("journey", "changed", "name", "Cart", "Cart reminder"),
        ("step wait", "changed", "duration", "1h", "2h"),
        ("step coupon", "added", "", "", '{"id": "coupon", "prefix": "C-", "type": "coupon"}'),
        ("step old", "removed", "", '{"id": "old", "type": "exit"}', ""),
    ]
    assert journey_changes(before, {**before, "version": 3}) == []
    reordered = {**before, "steps": [before["steps"][1], before["steps"][0], before["steps"][2]]}
    assert [c.field for c in journey_changes(before, reordered)] == ["step order"]


def test_contact_changes_become_one_command_each_and_bad_ones_name_the_field() -> None:
    changes = ContactChanges(
        add_tags=("vip", "vip"), remove_tags=("trial",), set_traits={"plan": "pro"}
    )

    commands = change_commands("ada", changes, T0)

    assert [(c.kind, c.tag, c.attribute, c.value) for c in commands] == [
        ("add_tag", "vip", None, None),
        ("remove_tag", "trial", None, None),
        ("set_attribute", None, "plan", "pro"),
    ]
    assert all(c.reason == "admin" and c.contact_key == "ada" for c in commands)
    assert change_commands("ada", changes, T0) == commands  # the same ids on a replay
    for bad, field in (
        ({}, "nothing to change"),
        ({"add_tags": [" "]}, "add_tags"),
        ({"set_traits": {"a.b": 1}}, "set_traits"),
        ({"set_traits": {"notes": "x" * 2000}}, "set_traits"),
        ({"add_tags": ["a"], "remove_tags": ["a"]}, "both added and removed"),
        ({"add_tag": ["a"]}, "add_tag"),
    ):
        with pytest.raises(ValidationError, match=field):
            ContactChanges.model_validate(bad)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_example_journey_draws_and_its_page_renders(path: Path) -> None:
    parsed = JourneyFile.model_validate(yaml.safe_load(path.read_text())).journey
    # The page reads the journey back from the API's JSON.
    journey = Journey.model_validate(parsed.model_dump(mode="json"))
    boxes = flow(journey)
    ids = {box.step_id for box in boxes}

    assert [box.step_id for box in boxes] == [step.id for step in journey.steps]
    assert all(edge.target is None or edge.target in ids for box in boxes for edge in box.edges)
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True)
    env.globals.update(nav=NAV, funnel_stages=FUNNEL, quote=str)
    page = env.get_template("journey.html").render(
        request=SimpleNamespace(url=SimpleNamespace(path=f"/journeys/{journey.id}")),
        signed=SimpleNamespace(
            may=lambda _role: True, csrf="t", key=SimpleNamespace(name="ops", role="publisher")
        ),
        csrf_field="csrf_token",
        current={"status": "active", "journey": journey.model_dump(mode="json")},
        journey=journey,
        trigger=trigger_summary(journey),
        boxes=boxes,
        figures={
            "entered": 0,
            "active_now": 0,
            "converted": 0,
            "holdout": 0,
            "exited": {},
            "steps": {},
            "sends": {},
        },
        conversion={"treated": None, "holdout": None, "uplift": None},
        versions=[{"journey": journey.model_dump(mode="json"), "status": "active"}],
        draft=None,
        changes={},
        diffs={},
        numbers=[journey.version],
        done=None,
    )
    assert all(f'id="step-{step_id}"' in page for step_id in ids)


CART_V1 = {
    "id": "cart",
    "name": "Cart",
    "version": 1,
    "trigger": {"type": "event", "event": "Product Added"},
    "steps": [
        {"id": "wait", "type": "wait", "duration": "1h"},
        {"id": "remind", "type": "send", "template": "cart-email"},
    ],
}
CART_V2 = {
    **CART_V1,
    "version": 2,
    "steps": [
        {"id": "wait", "type": "wait", "duration": "2h"},
        {"id": "remind", "type": "send", "template": "cart-email"},
        {"id": "done", "type": "exit"},
    ],
}


def test_a_text_diff_marks_each_line_added_or_removed_in_the_definition_s_order() -> None:
    lines = [
        (line.kind, line.text)
        for line in definition_diff(CART_V1, CART_V2, from_version=1, to_version=2)
    ]

    assert lines[:3] == [
        ("file", "--- version 1"),
        ("file", "+++ version 2"),
        ("hunk", "@@ -1,13 +1,15 @@"),
    ]
    changed = [(kind, text) for kind, text in lines if kind in ("added", "removed")]
    assert changed == [
        ("removed", "-version: 1"),
        ("added", "+version: 2"),
        ("removed", "-  duration: 1h"),
        ("added", "+  duration: 2h"),
        ("added", "+- id: done"),
        ("added", "+  type: exit"),
    ]
    # Fields keep the order they are written in, not the alphabet's.
    assert [text for kind, text in lines if kind == "same"][:2] == [" id: cart", " name: Cart"]
    assert definition_diff(CART_V1, CART_V1, from_version=1, to_version=1) == []
    # Either way round: the older version may be the "to".
    backwards = definition_diff(CART_V2, CART_V1, from_version=2, to_version=1)
    assert ("removed", "-- id: done") in [(line.kind, line.text) for line in backwards]


def test_the_text_diff_page_shows_added_and_removed_lines_without_script() -> None:
    lines = definition_diff(CART_V1, CART_V2, from_version=1, to_version=2)
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True)
    env.globals.update(nav=NAV, funnel_stages=FUNNEL, quote=str)
    diff = {
        "from": 1,
        "to": 2,
        "added": 4,
        "removed": 2,
        "lines": [line.as_dict() for line in lines],
    }
    page = env.get_template("journey_diff.html").render(
        request=SimpleNamespace(url=SimpleNamespace(path="/journeys/cart/diff")),
        signed=SimpleNamespace(
            may=lambda _role: False, csrf="t", key=SimpleNamespace(name="ana", role="viewer")
        ),
        csrf_field="csrf_token",
        journey_id="cart",
        numbers=[1, 2],
        diff=diff,
        diff_from=1,
        diff_to=2,
    )

    assert '<ins class="diff-line">+  duration: 2h</ins>' in page
    assert '<del class="diff-line">-  duration: 1h</del>' in page
    assert '<option value="1" selected>1</option>' in page
    assert '<option value="2" selected>2</option>' in page
    assert '<form method="get" action="/journeys/cart/diff" id="diff-form">' in page
    assert "<script" not in page.split("</head>", 1)[1]
