"""Rules segment and aggregate definitions must satisfy beyond the shape of each field, and the
publish and delete decisions that the `waypost` CLI and the admin API share.

Every `SegmentProblem` names the segment (or aggregate) and the rule, so the CLI, the admin API
and the tests all report the same sentence.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from shared.bodies import YamlRefused, read_yaml
from shared.conditions import All, AnyOf, Compare, Condition, HasTag, InSegment, Not, reads
from shared.journeys import PublishedJourney
from shared.segments import (
    AggregateDefinition,
    PublishedAggregate,
    PublishedSegment,
    SegmentDefinition,
    SegmentFile,
)

# A segment is a contact's state: it reads the profile, never an event or an instance context.
SEGMENT_ROOTS = ("traits", "tags", "segments", "consent", "aggregates", "contact")
# An aggregate's `where` is checked against each event it counts.
AGGREGATE_ROOTS = ("event",)
# The operators that read `segments` as a membership test of one named segment.
_MEMBERSHIP_OPS = ("contains", "not_contains")


class SegmentProblem(BaseModel):
    """One thing wrong with a segment or aggregate definition, naming which one and the rule."""

    model_config = ConfigDict(frozen=True)

    segment: str | None = None
    aggregate: str | None = None
    rule: str
    message: str

    def __str__(self) -> str:
        if self.segment is not None:
            where = f"segment '{self.segment}'"
        elif self.aggregate is not None:
            where = f"aggregate '{self.aggregate}'"
        else:
            where = "file"
        return f"{where}: {self.message} [{self.rule}]"


class SegmentFileProblems(Exception):
    """A segment file that cannot be read or is invalid, with every problem found."""

    def __init__(self, source: str, problems: Iterable[SegmentProblem]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__("\n".join(f"{source}: {p}" for p in self.problems))


# --- reading files ----------------------------------------------------------------------------


def parse_segment_file(path: Path) -> SegmentFile:
    """Read and validate a YAML or JSON segment file; raise with every problem named."""
    try:
        text = path.read_text()
        raw: Any = json.loads(text) if path.suffix == ".json" else read_yaml(text)
    except (OSError, UnicodeDecodeError, YamlRefused, json.JSONDecodeError) as exc:
        problem = SegmentProblem(rule="file-read", message=f"cannot read: {exc}")
        raise SegmentFileProblems(str(path), [problem]) from exc
    parsed, problems = segment_file_from(raw)
    if parsed is None:
        raise SegmentFileProblems(str(path), problems)
    return parsed


def segment_file_from(raw: Any) -> tuple[SegmentFile | None, list[SegmentProblem]]:
    """Validate the shape of a decoded YAML/JSON document (references are `check_segments`')."""
    if not isinstance(raw, dict) or not ({"aggregates", "segments"} & set(raw)):
        problem = SegmentProblem(
            rule="file-shape",
            message="the file must hold a mapping with `aggregates` and/or `segments` lists",
        )
        return None, [problem]
    try:
        return SegmentFile.model_validate(raw), []
    except ValidationError as exc:
        errors = exc.errors()
    # A list whose items failed is also reported as too short: keep only the item errors.
    nested = {tuple(e["loc"][:n]) for e in errors for n in range(1, len(e["loc"]))}
    problems: dict[str, SegmentProblem] = {}
    for error in errors:
        if error["type"] == "too_short" and tuple(error["loc"]) in nested:
            continue
        loc, rule, message = list(error["loc"]), error["type"], error["msg"]
        branch = _condition_branch(raw, loc)
        if branch == _OTHER_BRANCH:
            continue
        if branch == _UNKNOWN_NODE:
            loc = loc[: next(i for i, part in enumerate(loc) if _branch_of(part))]
            rule = "condition-shape"
            message = "not a condition: a condition has one of the keys " + ", ".join(
                _BRANCH_BY_KEY
            )
        problem = _problem_at(raw, loc, rule, message)
        problems.setdefault(str(problem), problem)
    return None, list(problems.values())


# A condition node is the kind its key says; pydantic reports a failure against every kind.
_BRANCH_BY_KEY = {
    "all": "All",
    "any": "AnyOf",
    "not": "Not",
    "tag": "HasTag",
    "segment": "InSegment",
    "field": "Compare",
}
_UNKNOWN_NODE = "unknown"
_OTHER_BRANCH = "other"


def _branch_of(part: Any) -> str | None:
    if not isinstance(part, str):
        return None
    if part in _BRANCH_BY_KEY.values():
        return part
    return "Compare" if part.endswith(", Compare]") else None


def _condition_branch(raw: Any, loc: list[Any]) -> str | None:
    """For an error inside a condition: `_OTHER_BRANCH` when it is about another kind of node
    than the one written, `_UNKNOWN_NODE` when the node has no condition key at all."""
    node = raw
    for part in loc:
        branch = _branch_of(part)
        if branch is not None:
            written = [
                b for key, b in _BRANCH_BY_KEY.items() if isinstance(node, dict) and key in node
            ]
            if not written:
                return _UNKNOWN_NODE
            if branch not in written:
                return _OTHER_BRANCH
            continue
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return None


def _problem_at(
    raw: dict[str, Any], error_loc: list[Any], rule: str, message: str
) -> SegmentProblem:
    loc = [part for part in error_loc if _branch_of(part) is None]
    named: dict[str, str] = {}
    if len(loc) >= 2 and loc[0] in ("segments", "aggregates") and isinstance(loc[1], int):
        try:
            item = raw[loc[0]][loc[1]]
            name = str(item.get("id") or f"#{loc[1] + 1}")
        except (KeyError, IndexError, TypeError, AttributeError):
            name = f"#{loc[1] + 1}"
        named = {"segment" if loc[0] == "segments" else "aggregate": name}
    field = ".".join(str(part) for part in loc)
    return SegmentProblem(**named, rule=rule, message=f"{field}: {message}")


# --- what a condition reads -------------------------------------------------------------------


def aggregates_read(condition: Condition) -> set[str]:
    """The ids of the aggregates a condition reads (`aggregates.<id>…`)."""
    found = set()
    for path in reads(condition):
        parts = path.split(".")
        if parts[0] == "aggregates" and len(parts) > 1:
            found.add(parts[1])
    return found


def segments_read(condition: Condition) -> set[str]:
    """The ids of the segments a condition tests membership of (`segment: <id>`, or
    `{field: segments, op: contains|not_contains, value: <id>}`)."""
    found = set()
    for leaf in _leaves(condition):
        if isinstance(leaf, InSegment):
            found.add(leaf.segment)
        elif isinstance(leaf, Compare) and _is_membership_test(leaf):
            found.add(str(leaf.value))
    return found


def _leaves(condition: Condition) -> Iterator[Condition]:
    if isinstance(condition, All | AnyOf):
        for child in condition.all if isinstance(condition, All) else condition.any:
            yield from _leaves(child)
    elif isinstance(condition, Not):
        yield from _leaves(condition.not_)
    else:
        yield condition


def _is_membership_test(leaf: Compare) -> bool:
    return leaf.field == "segments" and leaf.op in _MEMBERSHIP_OPS and isinstance(leaf.value, str)


def _unnamed_segment_reads(condition: Condition) -> Iterator[str]:
    """Reads of `segments` that do not name one segment (so no dependency can be known)."""
    for leaf in _leaves(condition):
        if not isinstance(leaf, Compare) or _is_membership_test(leaf):
            continue
        for path in (leaf.field, leaf.value_from):
            if path is not None and path.split(".")[0] == "segments":
                yield path


# --- checks -----------------------------------------------------------------------------------

Definition = AggregateDefinition | SegmentDefinition


def check_segments(
    file_or_defs: SegmentFile | Iterable[Definition],
    known_aggregates: Collection[str] = (),
    known_segments: Collection[str] | Mapping[str, SegmentDefinition] = (),
) -> list[SegmentProblem]:
    """Reference and graph rules over a set of definitions, given what is already published.

    `known_segments` may map ids to their published definitions; then a cycle through a
    published segment is found too. Definitions in the set replace published ones of their id.
    """
    if isinstance(file_or_defs, SegmentFile):
        aggregates = list(file_or_defs.aggregates)
        segments = list(file_or_defs.segments)
    else:
        given = list(file_or_defs)
        aggregates = [d for d in given if isinstance(d, AggregateDefinition)]
        segments = [d for d in given if isinstance(d, SegmentDefinition)]
    problems: list[SegmentProblem] = []
    problems += _duplicates("aggregate", [a.id for a in aggregates])
    problems += _duplicates("segment", [s.id for s in segments])

    for aggregate in aggregates:
        if aggregate.where is None:
            continue
        for path in dict.fromkeys(reads(aggregate.where)):
            if path.split(".")[0] not in AGGREGATE_ROOTS:
                problems.append(
                    SegmentProblem(
                        aggregate=aggregate.id,
                        rule="aggregate-roots",
                        message=f"`where` reads '{path}'; it is checked against each event, so "
                        "it can read only event.*",
                    )
                )

    defined_aggregates = {a.id for a in aggregates} | set(known_aggregates)
    defined_segments = {s.id for s in segments} | set(known_segments)
    for segment in segments:
        for path in dict.fromkeys(reads(segment.condition)):
            if path.split(".")[0] not in SEGMENT_ROOTS:
                problems.append(
                    SegmentProblem(
                        segment=segment.id,
                        rule="segment-roots",
                        message=f"reads '{path}'; a segment is a contact's state and can read "
                        f"only {', '.join(SEGMENT_ROOTS)}",
                    )
                )
        for path in dict.fromkeys(_unnamed_segment_reads(segment.condition)):
            problems.append(
                SegmentProblem(
                    segment=segment.id,
                    rule="segment-reference",
                    message=f"reads '{path}' without naming a segment; write "
                    "{segment: <id>} or {field: segments, op: contains, value: <id>}",
                )
            )
        for missing in sorted(aggregates_read(segment.condition) - defined_aggregates):
            problems.append(
                SegmentProblem(
                    segment=segment.id,
                    rule="unknown-aggregate",
                    message=f"reads aggregates.{missing}, but no aggregate '{missing}' is "
                    "defined in the file or published",
                )
            )
        for missing in sorted(segments_read(segment.condition) - defined_segments):
            problems.append(
                SegmentProblem(
                    segment=segment.id,
                    rule="unknown-segment",
                    message=f"refers to segment '{missing}', which is neither in the file nor "
                    "published",
                )
            )

    graph: dict[str, set[str]] = {}
    if isinstance(known_segments, Mapping):
        graph.update({i: segments_read(d.condition) for i, d in known_segments.items()})
    graph.update({s.id: segments_read(s.condition) for s in segments})
    for cycle in _cycles(graph, [s.id for s in segments]):
        problems.append(
            SegmentProblem(
                segment=cycle[0],
                rule="segment-cycle",
                message="segments refer to each other in a cycle: " + " -> ".join(cycle),
            )
        )
    return problems


def _duplicates(kind: str, ids: list[str]) -> list[SegmentProblem]:
    problems = []
    seen: set[str] = set()
    for item in ids:
        if item in seen:
            problems.append(
                SegmentProblem(
                    **{kind: item}, rule="duplicate-id", message=f"two {kind}s share this id"
                )
            )
        seen.add(item)
    return problems


def _cycles(graph: Mapping[str, set[str]], starts: list[str]) -> list[list[str]]:
    """Each cycle through at least one of `starts`, once, as a closed path from that start."""
    found: list[list[str]] = []
    reported: set[frozenset[str]] = set()
    for start in dict.fromkeys(starts):
        # Depth-first from `start`, looking for a path back to it.
        path = [start]
        stack = [iter(sorted(graph.get(start, ())))]
        visited = {start}
        while stack:
            following = next(stack[-1], None)
            if following is None:
                stack.pop()
                path.pop()
                continue
            if following == start:
                members = frozenset(path)
                if members not in reported:
                    reported.add(members)
                    found.append([*path, start])
                continue
            if following in visited:
                continue
            visited.add(following)
            path.append(following)
            stack.append(iter(sorted(graph.get(following, ()))))
    return found


# --- publishing and deleting ------------------------------------------------------------------

PublishedDefinition = PublishedAggregate | PublishedSegment


@dataclass(frozen=True)
class SegmentsRefused:
    """Nothing may be published or deleted; every reason, each naming its segment and rule."""

    problems: tuple[SegmentProblem, ...]

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


@dataclass(frozen=True)
class SegmentsPublish:
    """Write `records` (aggregates first, so a segment never reads one not yet published);
    `unchanged` are already published exactly as given."""

    records: tuple[PublishedDefinition, ...]
    unchanged: tuple[PublishedDefinition, ...]


def decide_segments_publish(
    segment_file: SegmentFile,
    aggregates: Iterable[PublishedAggregate],
    segments: Iterable[PublishedSegment],
    now: datetime,
) -> SegmentsPublish | SegmentsRefused:
    """Publish every definition of the file that differs from the published one of its id, or
    refuse the whole file when a rule fails against what is published."""
    old_aggregates = {p.aggregate.id: p for p in aggregates}
    old_segments = {p.segment.id: p for p in segments}
    problems = check_segments(
        segment_file,
        known_aggregates=old_aggregates,
        known_segments={i: p.segment for i, p in old_segments.items()},
    )
    if problems:
        return SegmentsRefused(tuple(problems))
    records: list[PublishedDefinition] = []
    unchanged: list[PublishedDefinition] = []
    for aggregate in segment_file.aggregates:
        old_aggregate = old_aggregates.get(aggregate.id)
        if old_aggregate is not None and old_aggregate.aggregate == aggregate:
            unchanged.append(old_aggregate)
        else:
            records.append(PublishedAggregate(aggregate=aggregate, published_at=now))
    for segment in segment_file.segments:
        old_segment = old_segments.get(segment.id)
        if old_segment is not None and old_segment.segment == segment:
            unchanged.append(old_segment)
        else:
            records.append(PublishedSegment(segment=segment, published_at=now))
    return SegmentsPublish(tuple(records), tuple(unchanged))


def decide_segment_delete(
    segment_id: str,
    segments: Iterable[PublishedSegment],
    journeys: Iterable[PublishedJourney],
) -> PublishedSegment | SegmentsRefused:
    """The published segment to delete (write a tombstone for its key), or why not: it is not
    published (`segment-published`), or another segment or a journey that is not archived
    refers to it (`segment-in-use`)."""
    published = {p.segment.id: p for p in segments}
    target = published.get(segment_id)
    if target is None:
        return SegmentsRefused(
            (
                SegmentProblem(
                    segment=segment_id,
                    rule="segment-published",
                    message="no such segment is published",
                ),
            )
        )
    problems = [
        SegmentProblem(
            segment=segment_id,
            rule="segment-in-use",
            message=f"segment '{other.segment.id}' refers to it: change or delete that first",
        )
        for other in published.values()
        if other.segment.id != segment_id and segment_id in segments_read(other.segment.condition)
    ]
    problems += [
        SegmentProblem(
            segment=segment_id,
            rule="segment-in-use",
            message=f"journey '{journey_id}' ({status}) refers to it in version(s) "
            f"{', '.join(str(v) for v in versions)}: archive the journey first",
        )
        for journey_id, status, versions in journeys_referring(segment_id, journeys)
    ]
    return SegmentsRefused(tuple(problems)) if problems else target


def journeys_referring(
    segment_id: str, journeys: Iterable[PublishedJourney]
) -> list[tuple[str, str, list[int]]]:
    """Journeys that are not archived and refer to the segment in any version (running
    instances finish on the version they entered): (id, status, versions)."""
    by_journey: dict[str, list[PublishedJourney]] = {}
    for record in journeys:
        by_journey.setdefault(record.journey.id, []).append(record)
    referring: list[tuple[str, str, list[int]]] = []
    for journey_id, records in sorted(by_journey.items()):
        records.sort(key=lambda r: r.journey.version)
        status = records[-1].status
        if status == "archived":
            continue
        versions = [r.journey.version for r in records if segment_id in segments_named(r)]
        if versions:
            referring.append((journey_id, status, versions))
    return referring


def segments_named(record: PublishedJourney) -> set[str]:
    """Every segment a journey version names: its trigger's, and any its conditions test."""
    trigger = record.journey.trigger
    named = set(getattr(trigger, "segments", ()))
    segment = getattr(trigger, "segment", None)
    if isinstance(segment, str):
        named.add(segment)
    for condition in _conditions_in(record.journey):
        named |= segments_read(condition)
    return named


_CONDITION_TYPES = (All, AnyOf, Not, HasTag, InSegment, Compare)


def _conditions_in(value: Any) -> Iterator[Condition]:
    """Every condition tree held anywhere in a definition (each tree once, at its root)."""
    if isinstance(value, _CONDITION_TYPES):
        yield value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _conditions_in(getattr(value, name))
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _conditions_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _conditions_in(item)
