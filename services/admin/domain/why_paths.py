"""A contact's path through each journey it met, from its journey log: every record in the
order the engine wrote it, with the why text that says what decided it.

Pure. Records of one decision share a time, so they are put back in the engine's order by kind
and by the step's place in the journey version."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

# Within one decision: entry first, then goals reached (checked before the steps), then the
# steps in their order (a step's wait after its completion), the exit last.
_BEFORE_STEPS = {"not_entered": 0, "entered": 1, "holdout": 2, "converted": 3}
_LAST = 1_000_000


def journey_paths(
    records: Iterable[Mapping[str, Any]], step_orders: Mapping[tuple[str, int], Mapping[str, int]]
) -> list[dict[str, Any]]:
    """Per journey (most recent first): its records oldest first, as lines with the why text.

    `step_orders` gives, per (journey id, version), each step id's position."""
    by_journey: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        if isinstance(record.get("at"), datetime) and record.get("journey_id"):
            by_journey.setdefault(str(record["journey_id"]), []).append(record)
    paths = []
    for journey_id, held in by_journey.items():
        held.sort(key=lambda r: (r["at"], _rank(r, step_orders)))
        paths.append(
            {
                "journey_id": journey_id,
                "last_at": held[-1]["at"],
                "entered": any(r.get("kind") == "entered" for r in held),
                "lines": [_line(r) for r in held],
            }
        )
    paths.sort(key=lambda p: p["last_at"], reverse=True)
    return paths


def _rank(
    record: Mapping[str, Any], step_orders: Mapping[tuple[str, int], Mapping[str, int]]
) -> int:
    kind = str(record.get("kind"))
    if kind in _BEFORE_STEPS:
        return _BEFORE_STEPS[kind]
    if kind == "exited":
        return _LAST
    version = record.get("journey_version")
    order = step_orders.get((str(record.get("journey_id")), int(version or 0)), {})
    position = order.get(str(record.get("step_id")), len(order))
    return 10 + 2 * position + (1 if kind == "waiting" else 0)


def _line(record: Mapping[str, Any]) -> dict[str, Any]:
    fallback = " ".join(str(record[k]) for k in ("kind", "reason", "detail") if record.get(k))
    return {
        "at": record["at"],
        "kind": record.get("kind"),
        "version": record.get("journey_version"),
        "instance_id": record.get("instance_id") or None,
        "step_id": record.get("step_id"),
        "why": record.get("why") or fallback,
    }
