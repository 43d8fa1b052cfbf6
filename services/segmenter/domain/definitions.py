"""What the segmenter computes: the live segments, the aggregates they (and journeys) read, and
the object triggers whose relations it indexes. Pure; rebuilt when a definition is published."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from typing import Any

from services.segmenter.domain.relations import longest_within
from shared.conditions import Check, Condition, Flip, compile_condition, compile_next_change, reads
from shared.ids import stable_id
from shared.journeys import Journey, ObjectEventTrigger
from shared.segment_checks import aggregates_read, segments_read
from shared.segments import AggregateDefinition, SegmentDefinition

_AGGREGATES = "aggregates."


@dataclass(frozen=True)
class Definitions:
    """The live definitions, with segments in dependency order (a segment after those it reads)."""

    aggregates: tuple[AggregateDefinition, ...] = ()
    segments: tuple[SegmentDefinition, ...] = ()
    object_triggers: tuple[ObjectEventTrigger, ...] = ()
    # The aggregates segments read: only their windows sliding can change a membership.
    segment_aggregates: frozenset[str] = frozenset()
    # Changes whenever any segment's condition or any computed aggregate changes.
    digest: str = field(default="")

    @classmethod
    def of(
        cls,
        aggregates: Iterable[AggregateDefinition],
        segments: Iterable[SegmentDefinition],
        journeys: Iterable[Journey] = (),
        entering: Iterable[Journey] = (),
    ) -> Definitions:
        """Keep only the aggregates a segment or a journey reads (the rest cost nothing); index
        the relations of the object triggers of the journeys open for `entering`."""
        ordered = _in_dependency_order(list(segments))
        wanted: set[str] = set()
        for segment in ordered:
            wanted.update(aggregates_read(segment.condition))
        by_segments = frozenset(wanted)
        for journey in journeys:
            wanted.update(aggregate_ids(_fields_in(journey.model_dump(by_alias=True))))
        computed = tuple(sorted((a for a in aggregates if a.id in wanted), key=lambda a: a.id))
        triggers = tuple(j.trigger for j in entering if isinstance(j.trigger, ObjectEventTrigger))
        digest = stable_id(
            [(a.id, a.digest) for a in computed], [(s.id, s.digest) for s in ordered], length=16
        )
        return cls(computed, ordered, triggers, by_segments, digest)

    @cached_property
    def segment_ids(self) -> frozenset[str]:
        return frozenset(s.id for s in self.segments)

    @cached_property
    def relations_kept(self) -> timedelta | None:
        """How long the object index remembers a relation (None: no object trigger); read for
        every relation, worked out once."""
        return longest_within(self.object_triggers)

    @cached_property
    def compiled(self) -> Compiled:
        """The conditions worked out once per definitions set (every event reads them)."""
        by_event: dict[str, list[tuple[AggregateDefinition, Check | None]]] = {}
        for aggregate in self.aggregates:
            where = compile_condition(aggregate.where) if aggregate.where is not None else None
            by_event.setdefault(aggregate.event, []).append((aggregate, where))
        flips = [compile_next_change(s.condition) for s in self.segments]
        inputs = [
            _inputs_of(s.condition, timed=flip is not None)
            for s, flip in zip(self.segments, flips, strict=True)
        ]
        readers: dict[str, set[int]] = {}
        for index, read in enumerate(inputs):
            for name in (*(f"{_AGGREGATES}{a}" for a in read.aggregates), *read.roots):
                readers.setdefault(name, set()).add(index)
        return Compiled(
            segments=tuple((s.id, compile_condition(s.condition)) for s in self.segments),
            flips=tuple(flip for flip in flips if flip is not None),
            by_event={name: tuple(matching) for name, matching in by_event.items()},
            readers={name: frozenset(found) for name, found in readers.items()},
            aggregate_readers={
                name.removeprefix(_AGGREGATES): frozenset(found)
                for name, found in readers.items()
                if name.startswith(_AGGREGATES)
            },
            unconditional=frozenset(i for i, r in enumerate(inputs) if r.timed or r.always),
            membership_readers=tuple(r.segments for r in inputs),
            by_state_key={a.state_key: a for a in self.aggregates},
        )


@dataclass(frozen=True)
class Compiled:
    """`Definitions` as the fold runs them: segment conditions as checks (in dependency order),
    the relative-time flips of those that have any, and the aggregates by the event they count
    (in definition order) with their `where` as a check."""

    segments: tuple[tuple[str, Check], ...]
    flips: tuple[Flip, ...]
    by_event: Mapping[str, tuple[tuple[AggregateDefinition, Check | None], ...]]
    # Which segments (by index in `segments`) read an input: `aggregates.<id>`, or a root of
    # `PROFILE_ROOTS`; those re-checked whatever changed (time alone flips them, or they read
    # something not tracked); and whether each reads memberships.
    readers: Mapping[str, frozenset[int]] = field(default_factory=dict)
    # `readers` of `aggregates.<id>`, by the aggregate's id.
    aggregate_readers: Mapping[str, frozenset[int]] = field(default_factory=dict)
    unconditional: frozenset[int] = frozenset()
    membership_readers: tuple[bool, ...] = ()
    by_state_key: Mapping[str, AggregateDefinition] = field(default_factory=dict)


# The profile's roots other than aggregates and segments that a segment's condition may read.
PROFILE_ROOTS = ("traits", "tags", "consent", "contact")


@dataclass(frozen=True)
class Inputs:
    """What a segment's membership depends on, so a change re-checks only the segments it can
    move: the aggregates read, the other profile roots read, whether it reads memberships, and
    whether time alone can flip it (`ago`). `always` is set for a root the segmenter does not
    track (nothing but a re-check is safe)."""

    aggregates: frozenset[str]
    roots: frozenset[str]
    segments: bool
    timed: bool
    always: bool


def _inputs_of(condition: Condition, *, timed: bool) -> Inputs:
    aggregates: set[str] = set()
    roots: set[str] = set()
    for path in reads(condition):
        root, _, rest = path.partition(".")
        if root == "aggregates" and rest:
            aggregates.add(rest.split(".")[0])
        else:
            roots.add(root)
    return Inputs(
        aggregates=frozenset(aggregates),
        roots=frozenset(roots & set(PROFILE_ROOTS)),
        segments="segments" in roots,
        timed=timed,
        always=bool(roots - {*PROFILE_ROOTS, "segments"}) or "aggregates" in roots,
    )


def state_key(aggregate: AggregateDefinition) -> str:
    """Where an aggregate's state is kept: a changed computation starts from a fresh state."""
    return aggregate.state_key


def aggregate_ids(paths: Iterable[str]) -> set[str]:
    """The aggregate ids among field paths (`aggregates.<id>` or deeper)."""
    return {p[len(_AGGREGATES) :].split(".")[0] for p in paths if p.startswith(_AGGREGATES)}


def _fields_in(node: Any) -> Iterator[str]:
    """Every condition field path in a dumped definition (`field` and `value_from` keys)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("field", "value_from") and isinstance(value, str):
                yield value
            else:
                yield from _fields_in(value)
    elif isinstance(node, list | tuple):
        for item in node:
            yield from _fields_in(item)


def _in_dependency_order(segments: list[SegmentDefinition]) -> tuple[SegmentDefinition, ...]:
    """Segments after the segments they read; a cycle (refused at publish) keeps file order."""
    by_id = {s.id: s for s in segments}
    ordered: list[SegmentDefinition] = []
    state: dict[str, str] = {}

    def visit(segment: SegmentDefinition) -> None:
        if state.get(segment.id) is not None:
            return
        state[segment.id] = "visiting"
        for other in sorted(segments_read(segment.condition)):
            if other in by_id and state.get(other) is None:
                visit(by_id[other])
        state[segment.id] = "done"
        ordered.append(segment)

    for segment in sorted(segments, key=lambda s: s.id):
        visit(segment)
    return tuple(ordered)
