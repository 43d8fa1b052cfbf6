"""What changed between two versions of a journey, as the admin lists it: steps added, removed
or changed (field by field), and the journey's other settings; and the text diff of the two
definitions as YAML. Pure: reads two definitions."""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import yaml

# Fields that differ between every two versions and say nothing of what changed.
_IGNORED = frozenset({"version"})
_MAX_VALUE_CHARS = 120
# Lines of unchanged text shown around each change of a text diff.
DIFF_CONTEXT = 3

DiffKind = Literal["file", "hunk", "added", "removed", "same"]


@dataclass(frozen=True)
class Change:
    """One difference: `where` is `step <id>` or `journey`, `field` a dotted path."""

    where: str
    kind: str  # added, removed, changed
    field: str = ""
    before: str = ""
    after: str = ""

    def as_dict(self) -> dict[str, str]:
        return {
            "where": self.where,
            "kind": self.kind,
            "field": self.field,
            "before": self.before,
            "after": self.after,
        }


def journey_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[Change]:
    """The differences from `before` to `after` (journey definitions as JSON): the journey's own
    fields first, then steps in the order of `after` (added or changed), then removed steps."""
    changes: list[Change] = []
    for name in sorted(set(before) | set(after)):
        if name in _IGNORED or name == "steps":
            continue
        changes += _field_changes("journey", name, before.get(name), after.get(name))
    old_steps = {str(s.get("id")): s for s in before.get("steps") or [] if isinstance(s, Mapping)}
    new_steps = [s for s in after.get("steps") or [] if isinstance(s, Mapping)]
    old_order = [str(s.get("id")) for s in before.get("steps") or [] if isinstance(s, Mapping)]
    new_order = [str(s.get("id")) for s in new_steps]
    for step in new_steps:
        step_id = str(step.get("id"))
        where = f"step {step_id}"
        if step_id not in old_steps:
            changes.append(Change(where, "added", after=_short(step)))
            continue
        old = old_steps[step_id]
        for name in sorted(set(old) | set(step)):
            changes += _field_changes(where, name, old.get(name), step.get(name))
    kept = [s for s in old_order if s in new_order]
    if kept != [s for s in new_order if s in old_steps]:
        changes.append(
            Change("journey", "changed", "step order", " → ".join(old_order), " → ".join(new_order))
        )
    for step_id in old_order:
        if step_id not in {str(s.get("id")) for s in new_steps}:
            changes.append(Change(f"step {step_id}", "removed", before=_short(old_steps[step_id])))
    return changes


def _field_changes(where: str, path: str, before: Any, after: Any) -> list[Change]:
    if before == after:
        return []
    if before is None:
        return [Change(where, "added", path, after=_short(after))]
    if after is None:
        return [Change(where, "removed", path, before=_short(before))]
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        found: list[Change] = []
        for name in sorted(set(before) | set(after)):
            found += _field_changes(where, f"{path}.{name}", before.get(name), after.get(name))
        return found
    return [Change(where, "changed", path, _short(before), _short(after))]


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 1] + "…"


@dataclass(frozen=True)
class DiffLine:
    """One line of a unified diff: `file` (the two headers), `hunk` (`@@ … @@`), `added`,
    `removed` or `same`; `text` is the line as the unified diff writes it, its sign first."""

    kind: DiffKind
    text: str

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "text": self.text}


def definition_text(definition: Mapping[str, Any]) -> str:
    """A journey definition (as JSON) as YAML, its fields in the order the format lists them."""
    return yaml.safe_dump(dict(definition), sort_keys=False, allow_unicode=True, width=100)


def definition_diff(
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    *,
    from_version: int,
    to_version: int,
    context: int = DIFF_CONTEXT,
) -> list[DiffLine]:
    """The unified diff (`difflib`) from `before` to `after` as YAML, line by line; empty when
    the two texts are the same."""
    lines = difflib.unified_diff(
        definition_text(before).splitlines(),
        definition_text(after).splitlines(),
        fromfile=f"version {from_version}",
        tofile=f"version {to_version}",
        n=context,
        lineterm="",
    )
    found: list[DiffLine] = []
    for index, text in enumerate(lines):
        found.append(DiffLine(_diff_kind(index, text), text))
    return found


def _diff_kind(index: int, text: str) -> DiffKind:
    if index < 2:  # `--- version 1` and `+++ version 2` (a removed `-- x` line is not one)
        return "file"
    if text.startswith("@@"):
        return "hunk"
    if text.startswith("+"):
        return "added"
    return "removed" if text.startswith("-") else "same"
