"""A journey's flow as the admin draws it: one box per step, in the definition's order, each
with a short summary and its ways out (labelled, pointing at the step they lead to, or the end).

Pure: read from the journey definition alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.journeys import (
    AssignOwnerStep,
    BranchStep,
    CaptureStep,
    CouponStep,
    ExitStep,
    GotoStep,
    Journey,
    SendStep,
    SplitStep,
    UpdateContactStep,
    WaitForEventStep,
    WaitStep,
    WebhookStep,
)

END = None  # an edge's target when the instance ends there


@dataclass(frozen=True)
class Edge:
    label: str
    target: str | None
    # True when the target is the very next box: drawn as the flow going straight on.
    straight_on: bool


@dataclass(frozen=True)
class StepBox:
    step_id: str
    kind: str
    summary: str
    edges: tuple[Edge, ...]
    waits: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "step_id": self.step_id,
            "kind": self.kind,
            "summary": self.summary,
            "waits": self.waits,
            "edges": [
                {"label": e.label, "target": e.target, "straight_on": e.straight_on}
                for e in self.edges
            ],
        }


def flow(journey: Journey) -> list[StepBox]:
    """Every step of `journey` as a box, in order; the first is where instances start."""
    ids = [step.id for step in journey.steps]
    boxes = []
    for index, step in enumerate(journey.steps):
        below = ids[index + 1] if index + 1 < len(ids) else None
        following = journey.next_of(step.id)
        labelled: list[tuple[str, str | None]]
        if isinstance(step, ExitStep):
            labelled = []
        elif isinstance(step, WaitForEventStep):
            labelled = [
                (f"on {step.event}", step.on_event or following),
                (f"after {step.timeout}", step.on_timeout or following),
            ]
        elif isinstance(step, BranchStep):
            labelled = [
                (
                    f"if {_condition(arm.condition.model_dump(by_alias=True, exclude_none=True))}",
                    arm.next,
                )
                for arm in step.arms
            ]
            labelled.append(("else", step.otherwise or following))
        elif isinstance(step, SplitStep):
            labelled = [(f"{v.name} ({v.weight:g})", v.next or following) for v in step.variants]
        elif isinstance(step, GotoStep):
            labelled = [(f"up to {step.max_times} times", step.to), ("then", following)]
        elif isinstance(step, WebhookStep):
            labelled = [("ok", following), ("on failure", step.on_failure or following)]
        else:
            labelled = [("", following)]
        edges = tuple(
            Edge(label, target, target is not None and target == below and index + 1 < len(ids))
            for label, target in labelled
        )
        boxes.append(
            StepBox(
                step_id=step.id,
                kind=step.type,
                summary=_summary(step),
                edges=edges,
                waits=isinstance(step, (WaitStep, WaitForEventStep, WebhookStep)),
            )
        )
    return boxes


def trigger_summary(journey: Journey) -> str:
    trigger = journey.trigger.model_dump(exclude_none=True, by_alias=True)
    kind = trigger.pop("type", "event")
    if kind == "event":
        return f"event {trigger.get('event', '')}"
    if kind == "segment":
        return f"segment {trigger.get('segment', '')} {trigger.get('on', 'entered')}"
    details = ", ".join(f"{k}={v}" for k, v in trigger.items() if not isinstance(v, (dict, list)))
    return f"{kind} {details}".strip()


def _summary(step: Any) -> str:
    if isinstance(step, SendStep):
        return " or ".join(f"{c.channel}: {c.template}" for c in step.choices)
    if isinstance(step, WaitStep):
        if step.duration:
            return f"wait {step.duration}"
        if step.until is not None:
            return f"wait until {step.until.isoformat()}"
        if step.until_time:
            return f"wait until {step.until_time} (contact's time)"
        return f"wait until the date in {step.until_attribute}"
    if isinstance(step, WaitForEventStep):
        return f"wait up to {step.timeout} for {step.event}"
    if isinstance(step, BranchStep):
        return f"first of {len(step.arms)} conditions, else"
    if isinstance(step, SplitStep):
        return " / ".join(v.name for v in step.variants)
    if isinstance(step, UpdateContactStep):
        return "update the contact"
    if isinstance(step, AssignOwnerStep):
        return "assign an owner"
    if isinstance(step, CouponStep):
        return "generate a coupon"
    if isinstance(step, CaptureStep):
        return "capture values"
    if isinstance(step, WebhookStep):
        return f"{step.method} webhook"
    if isinstance(step, GotoStep):
        return f"go to {step.to}"
    if isinstance(step, ExitStep):
        return "exit"
    return str(getattr(step, "type", ""))


def _condition(condition: Any, depth: int = 0) -> str:
    """A condition in a line: short enough for a box; whole in the definition shown below it."""
    text = _condition_text(condition, depth)
    return text if len(text) <= 80 else text[:79] + "…"


def _condition_text(condition: Any, depth: int) -> str:
    if depth > 3 or not isinstance(condition, dict):
        return "…" if depth > 3 else str(condition)
    if "all" in condition or "any" in condition:
        name = "all" if "all" in condition else "any"
        joiner = " and " if name == "all" else " or "
        return "(" + joiner.join(_condition_text(c, depth + 1) for c in condition[name]) + ")"
    if "not" in condition:
        return f"not {_condition_text(condition['not'], depth + 1)}"
    if "tag" in condition:
        return f"has tag {condition['tag']}"
    if "segment" in condition:
        return f"in segment {condition['segment']}"
    operand = (
        next(
            (f"{condition[k]}" if k == "value" else f"{k} {condition[k]}")
            for k in ("value", "value_from", "ago")
            if k in condition
        )
        if any(k in condition for k in ("value", "value_from", "ago"))
        else ""
    )
    return f"{condition.get('field', '')} {condition.get('op', 'eq')} {operand}".strip()
