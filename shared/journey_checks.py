"""Rules a journey must satisfy beyond the shape of each field, and readable problem reports.

Every `DefinitionProblem` names the journey, the step (when there is one) and the rule, so the
CLI, the admin API and the tests all report the same sentence.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from shared.conditions import Condition, reads
from shared.journeys import (
    WAITING_STEPS,
    AssignOwnerStep,
    BranchStep,
    CaptureStep,
    CouponStep,
    GotoStep,
    Journey,
    JourneyFile,
    SendStep,
    SplitStep,
    UpdateContactStep,
    ValueFrom,
    WaitForEventStep,
    WebhookStep,
)

# Context names every instance has without a step writing them.
BUILT_IN_CONTEXT = ("trigger", "variant", "entered_at")


class DefinitionProblem(BaseModel):
    """One thing wrong with a definition, naming where and which rule."""

    model_config = ConfigDict(frozen=True)

    journey: str
    step: str | None
    rule: str
    message: str

    def __str__(self) -> str:
        where = f"journey '{self.journey}'" + (f", step '{self.step}'" if self.step else "")
        return f"{where}: {self.message} [{self.rule}]"


def parse_journey_file(
    raw: Any, known_templates: Collection[str] = ()
) -> tuple[JourneyFile | None, list[DefinitionProblem]]:
    """Validate a decoded YAML/JSON document; every problem found, or the journey file."""
    if not isinstance(raw, dict) or not isinstance(raw.get("journey"), dict):
        problem = DefinitionProblem(
            journey="?",
            step=None,
            rule="file-shape",
            message="the file must hold a mapping with a `journey` mapping",
        )
        return None, [problem]
    journey_id = str(raw["journey"].get("id", "?"))
    try:
        parsed = JourneyFile.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        # A list whose items failed is also reported as too short: keep only the item errors.
        nested = {tuple(e["loc"][:n]) for e in errors for n in range(1, len(e["loc"]))}
        errors = [e for e in errors if not (e["type"] == "too_short" and tuple(e["loc"]) in nested)]
        return None, [_problem_from_error(journey_id, raw, e) for e in errors]
    problems = check_journey(parsed, known_templates)
    return (None, problems) if problems else (parsed, [])


def _problem_from_error(journey_id: str, raw: Any, error: Any) -> DefinitionProblem:
    loc = list(error["loc"])
    step = None
    if len(loc) >= 3 and loc[:2] == ["journey", "steps"] and isinstance(loc[2], int):
        try:
            step = raw["journey"]["steps"][loc[2]].get("id") or f"#{loc[2] + 1}"
        except (KeyError, IndexError, TypeError, AttributeError):
            step = f"#{loc[2] + 1}"
    field = ".".join(str(part) for part in loc)
    return DefinitionProblem(
        journey=journey_id, step=step, rule=error["type"], message=f"{field}: {error['msg']}"
    )


def check_journey(
    journey_file: JourneyFile, known_templates: Collection[str] = ()
) -> list[DefinitionProblem]:
    """Graph and reference rules that a single field cannot check on its own."""
    journey = journey_file.journey
    problems: list[DefinitionProblem] = []

    def problem(step: str | None, rule: str, message: str) -> None:
        problems.append(
            DefinitionProblem(journey=journey.id, step=step, rule=rule, message=message)
        )

    ids = [s.id for s in journey.steps]
    seen: set[str] = set()
    for step_id in ids:
        if step_id in seen:
            problem(step_id, "unique-step-ids", "two steps share this id")
        seen.add(step_id)
    for step in journey.steps:
        for field, target in _references(step):
            if target not in seen:
                problem(step.id, "next-exists", f"'{field}' names unknown step '{target}'")
        if step.type == "exit" and step.next is not None:
            problem(step.id, "exit-is-final", "an exit step cannot have 'next'")
        if isinstance(step, SendStep):
            _check_send(journey_file, step, known_templates, problem)
        if isinstance(step, SplitStep) and len({v.name for v in step.variants}) < len(
            step.variants
        ):
            problem(step.id, "unique-variants", "two variants share a name")
    if problems:
        return problems

    reachable = _reachable(journey)
    for step_id in ids:
        if step_id not in reachable:
            problem(step_id, "reachable", "no path from the first step reaches this step")
    looping = _step_in_unbounded_loop(journey)
    if looping is not None:
        problem(looping, "bounded-loops", "this step is in a loop with no wait and no goto bound")
    _check_context_reads(journey, problem)
    _check_trigger_reads(journey, problem)
    return problems


def _references(step: Any) -> Iterator[tuple[str, str]]:
    for field in ("next", "on_event", "on_timeout", "on_failure", "to"):
        target = getattr(step, field, None)
        if target is not None:
            yield field, target
    if isinstance(step, BranchStep):
        for arm in step.arms:
            yield "arms.next", arm.next
        if step.otherwise is not None:
            yield "else", step.otherwise
    if isinstance(step, SplitStep):
        for variant in step.variants:
            if variant.next is not None:
                yield f"variants.{variant.name}.next", variant.next


def _check_send(
    journey_file: JourneyFile, step: SendStep, known: Collection[str], problem: Any
) -> None:
    channels = [choice.channel for choice in step.choices]
    if len(set(channels)) < len(channels):
        problem(step.id, "unique-channels", "a channel appears twice in the priority list")
    for choice in step.choices:
        template = journey_file.templates.get(choice.template)
        if template is None and choice.template not in known:
            problem(step.id, "template-exists", f"template '{choice.template}' is not defined")
        elif template is not None and template.channel != choice.channel:
            problem(
                step.id,
                "template-channel",
                f"template '{choice.template}' is for {template.channel}, not {choice.channel}",
            )


def _reachable(journey: Journey) -> set[str]:
    reachable: set[str] = set()
    frontier = [journey.steps[0].id]
    while frontier:
        current = frontier.pop()
        if current not in reachable:
            reachable.add(current)
            frontier.extend(journey.successors(current))
    return reachable


def _step_in_unbounded_loop(journey: Journey) -> str | None:
    """A step on a cycle that neither waits nor passes a bounded goto (it would spin), or None."""
    stops = {s.id for s in journey.steps if isinstance(s, (*WAITING_STEPS, GotoStep))}
    # Depth-first search for a cycle in the graph without the stopping steps.
    state: dict[str, int] = {}

    def visit(step_id: str) -> str | None:
        state[step_id] = 1
        for following in journey.successors(step_id):
            if following in stops:
                continue
            if state.get(following) == 1:
                return following
            if following not in state:
                found = visit(following)
                if found is not None:
                    return found
        state[step_id] = 2
        return None

    for step in journey.steps:
        if step.id not in stops and step.id not in state:
            found = visit(step.id)
            if found is not None:
                return found
    return None


def context_written(journey: Journey) -> set[str]:
    """The names of an instance's context: built in, or written by some step of the journey."""
    written = set(BUILT_IN_CONTEXT)
    if journey.goals:
        written.add("goals")
    for step in journey.steps:
        if isinstance(step, WaitForEventStep | WebhookStep):
            written.add(step.context_name)
        elif isinstance(step, CouponStep):
            written.add(step.save_as)
        elif isinstance(step, CaptureStep):
            written.update(step.values)
        elif isinstance(step, AssignOwnerStep):
            written.add(step.attribute)
    return written


def _check_context_reads(journey: Journey, problem: Any) -> None:
    """Every `context.<name>` a condition or value reads must be written by some step."""
    written = context_written(journey)
    for step_id, path in _context_reads(journey):
        parts = path.split(".")
        if parts[0] == "context" and (len(parts) < 2 or parts[1] not in written):
            name = parts[1] if len(parts) > 1 else ""
            problem(
                step_id,
                "context-written",
                f"reads '{path}' but no step writes context '{name}'",
            )


def _check_trigger_reads(journey: Journey, problem: Any) -> None:
    """A trigger is checked before there is an instance, so it cannot read a context."""
    trigger = journey.trigger
    for condition in (trigger.condition, getattr(trigger, "where", None)):
        for path in _of(condition):
            if path.split(".")[0] == "context":
                problem(
                    None,
                    "trigger-context",
                    f"the trigger reads '{path}', but an instance's context exists only after "
                    "it entered",
                )


def _of(condition: Condition | None) -> Iterator[str]:
    if condition is not None:
        yield from reads(condition)


def _context_reads(journey: Journey) -> Iterator[tuple[str | None, str]]:
    for rule in journey.exit_rules:
        yield from ((None, p) for p in _of(rule.where))
    for goal in journey.goals:
        yield from ((None, p) for p in _of(goal.where))
    for step in journey.steps:
        paths: list[str] = []
        if isinstance(step, WaitForEventStep):
            paths.extend(_of(step.where))
        elif isinstance(step, BranchStep):
            for arm in step.arms:
                paths.extend(_of(arm.condition))
        elif isinstance(step, CaptureStep):
            paths.extend(step.values.values())
        elif isinstance(step, UpdateContactStep | WebhookStep):
            values = step.set_attributes if isinstance(step, UpdateContactStep) else step.body
            paths.extend(v.from_ for v in values.values() if isinstance(v, ValueFrom))
        yield from ((step.id, p) for p in paths)
