"""Live figures the admin shows: where a journey's instances stand step by step (folded from
its journey log), and delivery funnels (summed from the message ledger's states).

Pure: the records and counts come in already read."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

# Within one decision several records share a time; this is the order the engine writes them.
_KIND_ORDER = {
    "entered": 0,
    "holdout": 1,
    "step_completed": 2,
    "skipped": 2,
    "waiting": 3,
    "converted": 4,
    "exited": 5,
}


@dataclass
class StepFigures:
    """One step: instances that reached it, wait there now, moved on, and skips by reason."""

    reached: int = 0
    waiting_now: int = 0
    moved_on: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    # What the step chose when it completed: channel, variant, branch target, "timeout", …
    outcomes: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "reached": self.reached,
            "waiting_now": self.waiting_now,
            "moved_on": self.moved_on,
            "skipped": dict(sorted(self.skipped.items())),
            "outcomes": dict(sorted(self.outcomes.items())),
        }


@dataclass(frozen=True)
class JourneyFigures:
    entered: int
    active_now: int
    converted: int
    holdout: int
    exited: dict[str, int]
    steps: dict[str, StepFigures]

    def as_dict(self) -> dict[str, Any]:
        return {
            "entered": self.entered,
            "active_now": self.active_now,
            "converted": self.converted,
            "holdout": self.holdout,
            "exited": dict(sorted(self.exited.items())),
            "steps": {step: figures.as_dict() for step, figures in self.steps.items()},
        }


def journey_figures(records: Iterable[Mapping[str, Any]]) -> JourneyFigures:
    """Fold a journey's log records (any order): each instance's last record says where it is;
    `waiting` as its last record means it waits at that step now."""
    steps: dict[str, StepFigures] = {}
    reached: dict[str, set[str]] = {}
    last: dict[str, tuple[datetime, int, str, str | None]] = {}
    entered: set[str] = set()
    converted: set[str] = set()
    holdout: set[str] = set()
    exited: Counter[str] = Counter()
    for record in records:
        kind = str(record.get("kind", ""))
        instance = str(record.get("instance_id", ""))
        step = record.get("step_id")
        at = record.get("at")
        if kind not in _KIND_ORDER or not instance or not isinstance(at, datetime):
            continue
        if kind == "entered":
            entered.add(instance)
        elif kind == "converted":
            converted.add(instance)
        elif kind == "holdout":
            holdout.add(instance)
        elif kind == "exited":
            exited[str(record.get("reason") or "end")] += 1
        if isinstance(step, str) and kind in ("step_completed", "skipped", "waiting"):
            figures = steps.setdefault(step, StepFigures())
            reached.setdefault(step, set()).add(instance)
            if kind == "step_completed":
                figures.moved_on += 1
                detail = record.get("detail")
                if detail:
                    figures.outcomes[str(detail)] = figures.outcomes.get(str(detail), 0) + 1
            elif kind == "skipped":
                reason = str(record.get("reason") or "unknown")
                figures.skipped[reason] = figures.skipped.get(reason, 0) + 1
        if kind == "converted":
            continue  # a goal reached says nothing of where the instance is
        place = (at, _KIND_ORDER[kind], kind, step if isinstance(step, str) else None)
        if instance not in last or place[:2] >= last[instance][:2]:
            last[instance] = place
    for step, instances in reached.items():
        steps[step].reached = len(instances)
    active = 0
    for _at, _order, kind, step in last.values():
        if kind == "exited":
            continue
        active += 1
        if kind == "waiting" and step is not None:
            steps[step].waiting_now += 1
    return JourneyFigures(
        entered=len(entered),
        active_now=active,
        converted=len(converted),
        holdout=len(holdout),
        exited=dict(exited),
        steps=steps,
    )


def contact_positions(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A contact's journey instances from their log records: the journey and version, when it
    entered, its last record (the step it is at, or how it ended), newest instance first."""
    by_instance: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        if isinstance(record.get("at"), datetime) and record.get("kind") in _KIND_ORDER:
            by_instance.setdefault(str(record.get("instance_id")), []).append(record)
    positions = []
    for instance, held in by_instance.items():
        held.sort(key=lambda r: (r["at"], _KIND_ORDER[str(r["kind"])]))
        where = [r for r in held if r["kind"] != "converted"] or held
        latest = where[-1]
        positions.append(
            {
                "instance_id": instance,
                "journey_id": latest.get("journey_id"),
                "journey_version": latest.get("journey_version"),
                "entered_at": held[0]["at"],
                "state": _state(str(latest["kind"])),
                "step_id": latest.get("step_id"),
                "reason": latest.get("reason"),
                "at": latest["at"],
                "converted": any(r["kind"] == "converted" for r in held),
                "holdout": bool(latest.get("holdout")),
            }
        )
    positions.sort(key=lambda p: p["entered_at"], reverse=True)
    return positions


def _state(kind: str) -> str:
    return {"exited": "exited", "waiting": "waiting"}.get(kind, "running")


# --- delivery ----------------------------------------------------------------------------

# The ledger's states in the order a message moves through them; reaching one counts as having
# passed every earlier one.
FUNNEL = ("requested", "sent", "delivered", "opened", "clicked")
_REACHED = {"sent": 1, "delivered": 2, "opened": 3, "clicked": 4}
FUNNEL_DIMENSIONS = ("journey_id", "template_id", "channel")


@dataclass
class Funnel:
    """How many messages reached each stage, and how many ended skipped, failed or with an
    unknown outcome (a worker stopped during the provider call), by reason."""

    stages: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FUNNEL, 0))
    skipped: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    unknown: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0

    def add(self, state: str, reason: str | None, count: int) -> None:
        self.stages["requested"] += count
        reached = _REACHED.get(state)
        if reached is not None:
            for stage in FUNNEL[1 : reached + 1]:
                self.stages[stage] += count
        elif state == "skipped":
            key = reason or "unknown"
            self.skipped[key] = self.skipped.get(key, 0) + count
        elif state == "failed":
            key = reason or "unknown"
            self.failed[key] = self.failed.get(key, 0) + count
        elif state == "unknown":  # concluded: it may or may not have arrived
            key = reason or "unknown"
            self.unknown[key] = self.unknown.get(key, 0) + count
        else:  # requested, sending, retrying: not concluded yet
            self.in_flight += count

    def as_dict(self) -> dict[str, Any]:
        requested = self.stages["requested"]
        return {
            "stages": dict(self.stages),
            "rates": {
                stage: round(self.stages[stage] / requested, 4) if requested else None
                for stage in FUNNEL[1:]
            },
            "skipped": dict(sorted(self.skipped.items())),
            "failed": dict(sorted(self.failed.items())),
            "unknown": dict(sorted(self.unknown.items())),
            "in_flight": self.in_flight,
        }


def funnels(rows: Iterable[Mapping[str, Any]], by: str) -> list[dict[str, Any]]:
    """One funnel per value of `by` (journey_id, template_id or channel) from rows of
    `{<dimension>…, "state", "reason", "count"}`; the biggest first."""
    if by not in FUNNEL_DIMENSIONS:
        raise ValueError(f"by must be one of {', '.join(FUNNEL_DIMENSIONS)}")
    grouped: dict[str, Funnel] = {}
    for row in rows:
        value = row.get(by)
        funnel = grouped.setdefault(str(value) if value is not None else "", Funnel())
        funnel.add(str(row.get("state", "")), row.get("reason"), int(row.get("count", 0)))
    ordered = sorted(grouped.items(), key=lambda item: (-item[1].stages["requested"], item[0]))
    return [{by: value, **funnel.as_dict()} for value, funnel in ordered]
