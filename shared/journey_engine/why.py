"""The "why" texts the engine writes into its journey log: a decision in the marketer's words,
with the values that decided it ("branch else: traits.plan = free").

Pure: conditions are evaluated again over the same facts the engine read, and only the parts
that decided the outcome are named.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from shared.conditions import (
    All,
    AnyOf,
    Condition,
    Facts,
    HasTag,
    InSegment,
    Not,
    evaluate,
)

# A value longer than this is cut: a why text names a value, it does not copy a document.
MAX_VALUE_CHARS = 60
_OPS = {
    "eq": "=",
    "ne": "≠",
    "gt": ">",
    "gte": "≥",
    "lt": "<",
    "lte": "≤",
    "in": "in",
    "not_in": "not in",
    "contains": "contains",
    "not_contains": "does not contain",
    "exists": "exists",
    "not_exists": "does not exist",
    "starts_with": "starts with",
    "before": "before",
    "after": "after",
}


def shown(value: Any) -> str:
    """A value as a why text shows it: text bare, others as JSON, cut when long."""
    if isinstance(value, datetime):
        text = value.isoformat()
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, default=str, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def day(moment: datetime) -> str:
    """A date as the why texts write it (UTC)."""
    return moment.strftime("%Y-%m-%d")


def minute(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def rule(condition: Condition) -> str:
    """The condition as written, short: `traits.plan = pro`, `all(…, …)`."""
    if isinstance(condition, All | AnyOf) and len(parts := _parts(condition)) == 1:
        return rule(parts[0])
    if isinstance(condition, All):
        return "all(" + ", ".join(rule(c) for c in condition.all) + ")"
    if isinstance(condition, AnyOf):
        return "any(" + ", ".join(rule(c) for c in condition.any) + ")"
    if isinstance(condition, Not):
        return f"not({rule(condition.not_)})"
    if isinstance(condition, HasTag):
        return f"has tag {condition.tag}"
    if isinstance(condition, InSegment):
        return f"in segment {condition.segment}"
    op = _OPS[condition.op]
    if condition.op in ("exists", "not_exists"):
        return f"{condition.field} {op}"
    if condition.value_from is not None:
        return f"{condition.field} {op} {condition.value_from}"
    if condition.ago is not None:
        return f"{condition.field} {op} {condition.ago} ago"
    return f"{condition.field} {op} {shown(condition.value)}"


def _parts(condition: All | AnyOf) -> tuple[Condition, ...]:
    return condition.all if isinstance(condition, All) else condition.any


def values_read(condition: Condition, facts: Facts, now: datetime) -> str:
    """The values that decided the condition's outcome, as `field = value` joined by commas."""
    seen: list[str] = []
    for text in _decisive(condition, facts, now):
        if text not in seen:
            seen.append(text)
    return ", ".join(seen)


def _decisive(condition: Condition, facts: Facts, now: datetime) -> list[str]:
    """What decided: for a failed `all` its first failing part, for a held `any` its first
    holding part, otherwise every part."""
    if isinstance(condition, All | AnyOf):
        parts = _parts(condition)
        holds = evaluate(condition, facts, now)
        deciding = isinstance(condition, All) != holds  # all failed, or any held
        if deciding:
            for part in parts:
                if evaluate(part, facts, now) == holds:
                    return _decisive(part, facts, now)
        return [text for part in parts for text in _decisive(part, facts, now)]
    if isinstance(condition, Not):
        return _decisive(condition.not_, facts, now)
    if isinstance(condition, HasTag):
        verb = "has" if evaluate(condition, facts, now) else "lacks"
        return [f"{verb} tag {condition.tag}"]
    if isinstance(condition, InSegment):
        member = evaluate(condition, facts, now)
        return [f"{'in' if member else 'not in'} segment {condition.segment}"]
    return [_read(condition.field, facts)] + (
        [_read(condition.value_from, facts)] if condition.value_from is not None else []
    )


def _read(path: str, facts: Facts) -> str:
    found, value = facts.read(path)
    return f"{path} = {shown(value)}" if found else f"{path} is absent"


def outcome(condition: Condition, facts: Facts, now: datetime) -> str:
    """`<rule> held|failed (<values read>)`."""
    verdict = "held" if evaluate(condition, facts, now) else "failed"
    return f"{rule(condition)} {verdict} ({values_read(condition, facts, now)})"
