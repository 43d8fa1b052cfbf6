"""Definition checks: references, reachability, loops, templates and channels, schedules,
durations and context reads; every problem names the journey, the step and the rule."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from shared.journey_checks import DefinitionProblem, parse_journey_file

TEMPLATES = {
    "mail": {"channel": "email", "subject": "s", "text": "t"},
    "text": {"channel": "sms", "text": "t"},
    "note": {"channel": "push", "text": "t"},
}


def raw(steps: list[dict[str, Any]], **journey: Any) -> dict[str, Any]:
    """A definition file as decoded from YAML: journey `j`, triggered by `Signed Up`."""
    return {
        "journey": {
            "id": "j",
            "name": "J",
            "trigger": {"event": "Signed Up"},
            "steps": steps,
            **journey,
        },
        "templates": TEMPLATES,
    }


def problems(steps: list[dict[str, Any]], **journey: Any) -> list[DefinitionProblem]:
    parsed, found = parse_journey_file(raw(steps, **journey))
    assert (parsed is None) == bool(found)
    return found


def where(found: list[DefinitionProblem]) -> list[tuple[str | None, str]]:
    assert {p.journey for p in found} == {"j"}
    return [(p.step, p.rule) for p in found]


def send(step_id: str, **extra: Any) -> dict[str, Any]:
    return {"id": step_id, "type": "send", "template": "mail", **extra}


def wait(step_id: str, **extra: Any) -> dict[str, Any]:
    return {"id": step_id, "type": "wait", "duration": "1d", **extra}


def wait_for(step_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": step_id,
        "type": "wait_for_event",
        "event": "Order Completed",
        "timeout": "3d",
    } | extra


def end(step_id: str = "end") -> dict[str, Any]:
    return {"id": step_id, "type": "exit"}


def branch(step_id: str, *arms: tuple[dict[str, Any], str], **extra: Any) -> dict[str, Any]:
    return {
        "id": step_id,
        "type": "branch",
        "arms": [{"if": condition, "next": target} for condition, target in arms],
        **extra,
    }


HAS_VIP = {"tag": "vip"}


# --- references -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "field"),
    [
        (wait_for("w", on_event="nowhere"), "on_event"),
        (wait_for("w", on_timeout="nowhere"), "on_timeout"),
        (branch("w", (HAS_VIP, "nowhere")), "arms.next"),
        (branch("w", (HAS_VIP, "end"), **{"else": "nowhere"}), "else"),
        (
            {
                "id": "w",
                "type": "split",
                "variants": [
                    {"name": "a", "weight": 1, "next": "nowhere"},
                    {"name": "b", "weight": 1},
                ],
            },
            "variants.a.next",
        ),
        ({"id": "w", "type": "goto", "to": "nowhere", "max_times": 2}, "to"),
        (
            {"id": "w", "type": "webhook", "url": "https://x.example", "on_failure": "nowhere"},
            "on_failure",
        ),
        (send("w", next="nowhere"), "next"),
    ],
)
def test_a_reference_to_an_unknown_step_names_the_step_and_the_field(
    step: dict[str, Any], field: str
) -> None:
    (problem,) = problems([step, end()])

    assert (problem.journey, problem.step, problem.rule) == ("j", "w", "next-exists")
    assert problem.message == f"'{field}' names unknown step 'nowhere'"


def test_every_known_reference_is_fine() -> None:
    steps = [
        wait_for("w", on_event="b", on_timeout="g"),
        branch("b", (HAS_VIP, "s"), **{"else": "end"}),
        {
            "id": "s",
            "type": "split",
            "variants": [{"name": "a", "weight": 1, "next": "end"}, {"name": "b", "weight": 3}],
        },
        {"id": "g", "type": "goto", "to": "w", "max_times": 2, "next": "end"},
        end(),
    ]

    assert problems(steps) == []


# --- reachability and loops -----------------------------------------------------------------


def test_steps_no_path_reaches_are_each_named() -> None:
    found = problems([send("a", next="end"), send("b"), send("c"), end()])

    assert where(found) == [("b", "reachable"), ("c", "reachable")]
    assert found[0].message == "no path from the first step reaches this step"


def test_a_step_reached_only_from_an_unreachable_step_is_unreachable_too() -> None:
    found = problems(
        [branch("a", (HAS_VIP, "end"), **{"else": "end"}), send("b", next="c"), send("c"), end()]
    )

    assert where(found) == [("b", "reachable"), ("c", "reachable")]


def test_a_loop_of_sends_and_branches_without_a_wait_is_an_unbounded_loop() -> None:
    found = problems([send("a"), branch("b", (HAS_VIP, "a"), **{"else": "end"}), end()])

    (problem,) = found
    assert (problem.step in {"a", "b"}, problem.rule) == (True, "bounded-loops")


def test_a_loop_through_a_goto_is_bounded() -> None:
    steps = [send("a"), {"id": "again", "type": "goto", "to": "a", "max_times": 3}, end()]

    assert problems(steps) == []


def test_a_loop_through_a_wait_is_bounded_by_time() -> None:
    assert problems([send("a"), wait("w", next="a")]) == []
    assert problems([send("a"), wait_for("w", on_event="a", on_timeout="end"), end()]) == []


def test_a_wait_for_event_may_loop_on_itself() -> None:
    assert problems([wait_for("w", on_event="w", on_timeout="end"), end()]) == []


# --- templates and channels -----------------------------------------------------------------


def test_an_unknown_template_in_a_channel_list_is_named() -> None:
    step = {
        "id": "reach",
        "type": "send",
        "channels": [
            {"channel": "email", "template": "mail"},
            {"channel": "sms", "template": "gone"},
        ],
    }

    (problem,) = problems([step])

    assert (problem.step, problem.rule) == ("reach", "template-exists")
    assert "'gone'" in problem.message


def test_a_template_of_another_channel_in_a_channel_list_is_named() -> None:
    step = {"id": "reach", "type": "send", "channels": [{"channel": "push", "template": "text"}]}

    (problem,) = problems([step])

    assert (problem.step, problem.rule) == ("reach", "template-channel")
    assert problem.message == "template 'text' is for sms, not push"


def test_an_unknown_channel_in_a_channel_list_names_the_step() -> None:
    step = {"id": "reach", "type": "send", "channels": [{"channel": "fax", "template": "mail"}]}

    (problem,) = problems([step])

    assert (problem.journey, problem.step, problem.rule) == ("j", "reach", "literal_error")
    assert "journey.steps.0.send.channels.0.channel" in problem.message
    assert "'email', 'sms', 'push' or 'wechat'" in problem.message


def test_a_channel_twice_in_a_channel_list_is_named() -> None:
    step = {
        "id": "reach",
        "type": "send",
        "channels": [
            {"channel": "email", "template": "mail"},
            {"channel": "email", "template": "mail"},
        ],
    }

    assert where(problems([step])) == [("reach", "unique-channels")]


def test_a_send_with_both_forms_is_refused() -> None:
    step = send("reach", channels=[{"channel": "email", "template": "mail"}])

    (problem,) = problems([step])

    assert (problem.step, problem.rule) == ("reach", "value_error")


# --- schedules, zones, durations ------------------------------------------------------------


def recurring(**recurrence: Any) -> dict[str, Any]:
    return {
        "type": "audience",
        "segments": ["s"],
        "mode": "recurring",
        "recurrence": {"start": "2026-03-02T09:00:00+01:00", **recurrence},
    }


def test_a_bad_cron_names_the_journey_the_field_and_the_rule() -> None:
    (problem,) = problems([send("a")], trigger=recurring(cron="every monday"))

    assert (problem.journey, problem.step, problem.rule) == ("j", None, "value_error")
    assert "journey.trigger.audience.recurrence.cron" in problem.message
    assert "'every monday' is not a cron expression" in problem.message


def test_a_bad_time_zone_of_a_recurrence_is_named() -> None:
    (problem,) = problems(
        [send("a")], trigger=recurring(cron="0 9 * * MON", timezone="Mars/Olympus")
    )

    assert "journey.trigger.audience.recurrence.timezone" in problem.message
    assert "'Mars/Olympus' is not an IANA time zone" in problem.message


def test_a_bad_journey_time_zone_is_named() -> None:
    (problem,) = problems([send("a")], settings={"timezone": "Europe/Nowhere"})

    assert (problem.step, problem.rule) == (None, "value_error")
    assert "journey.settings.timezone" in problem.message


def test_a_recurrence_needs_exactly_one_rhythm() -> None:
    (problem,) = problems([send("a")], trigger=recurring(cron="0 9 * * MON", every="1d"))

    assert "exactly one of cron or every" in problem.message


@pytest.mark.parametrize(
    ("step", "field"),
    [
        (wait("pause", duration="a week"), "journey.steps.0.wait.duration"),
        (wait_for("pause", timeout="3 days"), "journey.steps.0.wait_for_event.timeout"),
        (
            {"id": "pause", "type": "coupon", "expires": "tomorrow"},
            "journey.steps.0.coupon.expires",
        ),
        (
            {"id": "pause", "type": "webhook", "url": "https://x.example", "timeout": "slow"},
            "journey.steps.0.webhook.timeout",
        ),
    ],
)
def test_a_bad_duration_names_the_journey_the_step_and_the_field(
    step: dict[str, Any], field: str
) -> None:
    (problem,) = problems([step])

    assert (problem.journey, problem.step, problem.rule) == ("j", "pause", "value_error")
    assert field in problem.message
    assert "is not a duration such as 30s" in problem.message


def test_a_bad_cooldown_names_the_entry_rules() -> None:
    (problem,) = problems([send("a")], entry={"reentry": "cooldown", "cooldown": "daily"})

    assert "journey.entry.cooldown" in problem.message


# --- context reads --------------------------------------------------------------------------


def test_a_branch_reading_context_no_step_writes_is_a_problem() -> None:
    arm = ({"field": "context.coupon.code", "op": "exists"}, "end")

    (problem,) = problems([branch("check", arm, **{"else": "end"}), end()])

    assert (problem.journey, problem.step, problem.rule) == ("j", "check", "context-written")
    assert problem.message == "reads 'context.coupon.code' but no step writes context 'coupon'"


def test_a_value_from_reading_unwritten_context_is_a_problem() -> None:
    arm = ({"field": "event.properties.coupon", "op": "eq", "value_from": "context.code"}, "end")

    (problem,) = problems([wait_for("w"), branch("check", arm), end()])

    assert (problem.step, problem.rule) == ("check", "context-written")


@pytest.mark.parametrize(
    "writer",
    [
        {"id": "write", "type": "coupon"},
        {"id": "write", "type": "capture", "values": {"coupon": "event.properties.code"}},
        wait_for("write", save_as="coupon"),
        wait_for("coupon"),
        {"id": "write", "type": "webhook", "url": "https://x.example", "save_as": "coupon"},
        {"id": "write", "type": "assign_owner", "group": ["a"], "attribute": "coupon"},
    ],
)
def test_a_step_writing_the_context_satisfies_the_read(writer: dict[str, Any]) -> None:
    arm = ({"field": "context.coupon.code", "op": "exists"}, "end")

    assert problems([writer, branch("check", arm), end()]) == []


def test_built_in_context_needs_no_writer() -> None:
    arm = ({"field": "context.trigger.properties.plan", "op": "eq", "value": "pro"}, "end")
    later = ({"field": "context.entered_at", "op": "before", "ago": "1d"}, "end")

    assert problems([branch("check", arm, later), end()]) == []


def test_goals_write_their_context_only_when_the_journey_has_goals() -> None:
    arm = ({"field": "context.goals.ordered", "op": "exists"}, "end")
    steps = [wait("w"), branch("check", arm), end()]

    assert where(problems(steps)) == [("check", "context-written")]
    assert problems(steps, goals=[{"id": "ordered", "event": "Order Completed"}]) == []


@pytest.mark.parametrize(
    ("extra", "step"),
    [
        ({"exit_rules": [{"event": "X", "where": {"field": "context.x", "op": "exists"}}]}, None),
        ({"goals": [{"event": "X", "where": {"field": "context.x", "op": "exists"}}]}, None),
    ],
)
def test_journey_level_reads_of_unwritten_context_name_no_step(
    extra: dict[str, Any], step: None
) -> None:
    (problem,) = problems([send("a")], **extra)

    assert (problem.step, problem.rule) == (step, "context-written")


@pytest.mark.parametrize("part", ["condition", "where"])
def test_a_trigger_cannot_read_the_context_it_does_not_have_yet(part: str) -> None:
    trigger = {"event": "X", part: {"field": "context.trigger.properties.x", "op": "exists"}}

    (problem,) = problems([send("a")], trigger=trigger)

    assert (problem.journey, problem.step, problem.rule) == ("j", None, "trigger-context")
    assert "'context.trigger.properties.x'" in problem.message


@pytest.mark.parametrize(
    "reader",
    [
        wait_for(
            "r", where={"field": "event.properties.id", "op": "eq", "value_from": "context.x.id"}
        ),
        {"id": "r", "type": "capture", "values": {"y": "context.x.value"}},
        {"id": "r", "type": "update_contact", "set_attributes": {"y": {"from": "context.x.value"}}},
        {
            "id": "r",
            "type": "webhook",
            "url": "https://x.example",
            "body": {"y": {"from": "context.x"}},
        },
    ],
)
def test_steps_reading_unwritten_context_are_named(reader: dict[str, Any]) -> None:
    (problem,) = problems([reader])

    assert (problem.step, problem.rule) == ("r", "context-written")


# --- YAML -----------------------------------------------------------------------------------


def test_a_bare_on_key_in_yaml_reads_as_written() -> None:
    text = """
journey:
  id: j
  name: J
  trigger:
    type: segment
    segment: churn-risk
    on: left
  steps:
    - {id: a, type: exit}
"""
    parsed, found = parse_journey_file(yaml.safe_load(text))

    assert found == []
    assert parsed is not None
    assert parsed.journey.trigger.model_dump()["on"] == "left"


def test_a_problem_reads_as_one_sentence() -> None:
    (problem,) = problems([send("a", next="zz"), end()])

    assert str(problem) == "journey 'j', step 'a': 'next' names unknown step 'zz' [next-exists]"
