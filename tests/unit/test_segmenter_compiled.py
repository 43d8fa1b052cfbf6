"""The segmenter's compiled definitions answer exactly as the straightforward reference.

Conditions compiled once per definitions set (`compile_condition`, `compile_next_change`) against
`evaluate` and `next_change` on random condition trees and facts, odd types and absent fields
included; an aggregate's one-pass `settle` against `prune`, `next_change` and combining the
accumulators one by one; and the compiled `Definitions` of the segmenter bench.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.segmenter.domain import aggregates
from services.segmenter.domain.aggregates import _combine, _result
from services.segmenter.domain.definitions import Definitions
from shared.conditions import (
    Condition,
    Facts,
    compile_condition,
    compile_next_change,
    condition_from,
    evaluate,
    next_change,
)
from shared.segments import AggregateDefinition, SegmentDefinition

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
DAY = timedelta(days=1)

TIMES = [
    NOW,
    NOW - 20 * DAY,
    NOW.replace(tzinfo=None),
    "2026-03-02T09:00:00+00:00",
    "2026-03-02T10:00:00+01:00",
    "2026-02-01T09:00:00Z",
    "2026-03-02",
    "2026-13-99T00:00:00",
]
TEXTS = ["pro", "DE", "FR", "", "vip", "no-marketing", "1", "Pro"]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from([0.0, -0.0, 1.0, 2.5, float("nan"), float("inf")]),
    st.sampled_from(TEXTS),
    st.sampled_from(TIMES),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.lists(scalars, max_size=3).map(tuple),
    st.frozensets(st.sampled_from(TEXTS), max_size=3),
    st.dictionaries(st.sampled_from(["a", "vip", "email"]), scalars, max_size=2),
)
FIELDS = [
    "traits.x",
    "traits.y",
    "traits.l.0",
    "traits.l.1",
    "traits.l.²",
    "traits.d.a",
    "traits.2",
    "tags",
    "segments",
    "consent.email",
    "aggregates.n",
    "aggregates.at",
    "contact.first_seen",
    "event.properties.total",
    "context.missing",
]
OPS = [
    "eq",
    "ne",
    "gt",
    "gte",
    "lt",
    "lte",
    "in",
    "not_in",
    "contains",
    "not_contains",
    "exists",
    "not_exists",
    "starts_with",
    "before",
    "after",
]
AGOS = ["0s", "90s", "1.5h", "1d", "14d", "200000w"]


@st.composite
def comparisons(draw: st.DrawFn) -> dict[str, Any]:
    spec: dict[str, Any] = {"field": draw(st.sampled_from(FIELDS))}
    op = draw(st.sampled_from(OPS))
    spec["op"] = op
    if op in ("exists", "not_exists"):
        return spec
    operand = draw(
        st.sampled_from(
            ["value", "value_from", "ago"] if op in ("before", "after") else ["value", "value_from"]
        )
    )
    if operand == "ago":
        spec["ago"] = draw(st.sampled_from(AGOS))
    elif operand == "value_from":
        spec["value_from"] = draw(st.sampled_from(FIELDS))
    elif op in ("in", "not_in"):
        present = scalars.filter(lambda v: v is not None)
        spec["value"] = draw(st.lists(st.sampled_from(TEXTS) | present, max_size=3))
    else:
        spec["value"] = draw(scalars.filter(lambda v: v is not None))
    return spec


leaves = st.one_of(
    comparisons(),
    st.sampled_from(["vip", "no-marketing", "2026-03-02T09:00:00Z", "1"]).map(lambda t: {"tag": t}),
    st.sampled_from(["buyers", "vip", "2026-03-02"]).map(lambda s: {"segment": s}),
)
specs = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=3).map(lambda c: {"all": c}),
        st.lists(children, min_size=1, max_size=3).map(lambda c: {"any": c}),
        children.map(lambda c: {"not": c}),
    ),
    max_leaves=6,
)

roots = st.fixed_dictionaries(
    {},
    optional={
        "traits": st.dictionaries(st.sampled_from(["x", "y", "l", "d", "2"]), values, max_size=5),
        "tags": values,
        "segments": st.lists(st.sampled_from(["buyers", "vip", "2026-03-02"]), max_size=2),
        "consent": st.dictionaries(st.sampled_from(["email", "sms"]), st.booleans(), max_size=2),
        "aggregates": st.dictionaries(st.sampled_from(["n", "at"]), values, max_size=2),
        "contact": st.fixed_dictionaries({"first_seen": st.sampled_from(TIMES)}),
        "event": st.fixed_dictionaries({"properties": st.dictionaries(st.just("total"), values)}),
    },
)


def condition(spec: dict[str, Any]) -> Condition:
    try:
        return condition_from(spec)
    except ValidationError:
        assume(False)
        raise


def outcome(call: Any) -> tuple[str, Any]:
    """The answer, or the kind of error, so both sides can be compared either way."""
    try:
        return "ok", call()
    except Exception as error:  # noqa: BLE001 - the reference's errors are part of its behaviour
        return "raised", type(error).__name__


def same_instant(a: tuple[str, Any], b: tuple[str, Any]) -> bool:
    """Equal answers; instants also with the same offset (the timer's JSON shows it)."""
    if a != b:
        return False
    first, second = a[1], b[1]
    return not isinstance(first, datetime) or first.utcoffset() == second.utcoffset()


@settings(max_examples=300, deadline=None)
@given(spec=specs, facts=roots, at=st.sampled_from([NOW, NOW - 30 * DAY, NOW + 30 * DAY]))
def test_a_compiled_condition_answers_as_evaluate(
    spec: dict[str, Any], facts: dict[str, Any], at: datetime
) -> None:
    tree = condition(spec)
    expected = outcome(lambda: evaluate(tree, Facts(facts), at))
    assert outcome(lambda: compile_condition(tree)(Facts(facts), at)) == expected


@settings(max_examples=300, deadline=None)
@given(spec=specs, facts=roots, at=st.sampled_from([NOW, NOW - 30 * DAY, NOW + 30 * DAY]))
def test_a_compiled_next_change_answers_as_next_change(
    spec: dict[str, Any], facts: dict[str, Any], at: datetime
) -> None:
    tree = condition(spec)
    flip = compile_next_change(tree)
    expected = outcome(lambda: next_change(tree, Facts(facts), at))
    got = outcome(lambda: flip(Facts(facts), at) if flip is not None else None)
    assert same_instant(got, expected)


# Every operator with every kind of operand, against every kind of field value (each shortcut of
# the compiled form, and what falls through it).
ABSENT = object()
LEFTS: list[Any] = [
    ABSENT,
    None,
    True,
    False,
    0,
    1,
    1.0,
    -0.0,
    2.5,
    float("nan"),
    float("inf"),
    *TEXTS,
    "2026-03-02T09:00:00Z",
    "2026-03-02T10:00:00+01:00",
    NOW,
    NOW.replace(tzinfo=None),
    ["pro"],
    ("pro", 1),
    [],
    {"pro": True},
    frozenset({"pro"}),
]
RIGHTS: list[Any] = [
    "pro",
    "",
    "1",
    "2026-03-02T09:00:00Z",
    0,
    1,
    1.0,
    2.5,
    True,
    NOW,
    ["pro", "DE"],
    ["pro", 1],
    ["2026-03-02T09:00:00Z"],
    [],
]
TABLE = [
    *({"field": "traits.x", "op": op} for op in ("exists", "not_exists")),
    *({"field": "traits.x", "op": op, "value": right} for op in OPS for right in RIGHTS),
    *({"field": "traits.x", "op": op, "value_from": "traits.y"} for op in OPS),
    *({"field": "traits.x", "op": op, "ago": "1d"} for op in ("before", "after")),
    *({"tag": tag} for tag in ("pro", "1", "2026-03-02T09:00:00Z")),
]


def test_every_operator_and_operand_kind_answers_as_evaluate() -> None:
    checked = 0
    for spec in TABLE:
        try:
            tree = condition_from(spec)
        except ValidationError:
            continue
        compiled = compile_condition(tree)
        for left in LEFTS:
            for other in (ABSENT, "pro", 1, NOW) if "value_from" in spec else (ABSENT,):
                traits = {k: v for k, v in (("x", left), ("y", other)) if v is not ABSENT}
                facts = Facts({"traits": traits, "tags": [left, "1"] if left is not ABSENT else ()})
                expected = outcome(lambda: evaluate(tree, facts, NOW))  # noqa: B023
                assert outcome(lambda: compiled(facts, NOW)) == expected, (spec, left, other)  # noqa: B023
                checked += 1
    assert checked > 5_000


def test_equal_instants_in_other_offsets_keep_the_first_as_min_does() -> None:
    tree = condition(
        {
            "any": [
                {"field": "traits.x", "op": "after", "ago": "1d"},
                {"field": "traits.y", "op": "after", "ago": "1d"},
            ]
        }
    )
    facts = Facts({"traits": {"x": "2026-03-02T10:00:00+01:00", "y": "2026-03-02T09:00:00+00:00"}})
    flip = compile_next_change(tree)
    assert flip is not None
    got, expected = flip(facts, NOW), next_change(tree, facts, NOW)
    assert got is not None
    assert expected is not None
    assert got == expected
    assert got.utcoffset() == expected.utcoffset() == timedelta(hours=1)


def test_a_condition_without_relative_time_has_no_flip() -> None:
    assert compile_next_change(condition({"field": "traits.x", "op": "eq", "value": 1})) is None


# --- aggregates: one pass against prune, value and next_change --------------------------------

AGGREGATES = [
    AggregateDefinition.model_validate(
        {"id": "a", "event": "E", "function": function, "window": window, **reads}
    )
    for function, reads in (
        ("count", {}),
        ("sum", {"property": "p"}),
        ("min", {"property": "p"}),
        ("max", {"property": "p"}),
        ("last", {"property": "p"}),
        ("first_at", {}),
        ("last_at", {}),
    )
    for window in (None, "1h", "7d")
]
HOUR = 3600
BASE = int(NOW.timestamp()) // HOUR * HOUR


def accumulators(function: str) -> st.SearchStrategy[Any]:
    millis = st.integers(0, 2_000_000_000_000)
    numbers = st.one_of(st.integers(-1000, 1000), st.sampled_from([0.5, -0.0, 1.0, 2.25]))
    if function == "count":
        return st.integers(1, 50)
    if function == "sum":
        return st.one_of(
            st.integers(-1000, 1000),
            st.fractions(max_denominator=1000).map(str),
            st.sampled_from(["1e308", "1/3", "-7/2"]),
        )
    if function in ("min", "max"):
        return numbers
    if function == "last":
        return st.tuples(millis, st.sampled_from(["m-1", "m-2"]), numbers).map(list)
    return millis


@st.composite
def states(draw: st.DrawFn, definition: AggregateDefinition) -> dict[str, Any] | None:
    each = accumulators(definition.function)
    if draw(st.booleans()):
        return None
    if definition.window is None:
        return {"all": draw(each)}
    starts = st.integers(-200, 2).map(lambda hours: str(BASE + hours * HOUR))
    return {"buckets": draw(st.dictionaries(starts, each, max_size=8))}


def combined_one_by_one(state: dict[str, Any] | None, definition: AggregateDefinition) -> Any:
    """The value as combining accumulators pairwise, through `_combine`, reads it."""
    if state is None:
        found: list[Any] = []
    elif definition.window is None:
        found = [state["all"]]
    else:
        found = list(state["buckets"].values())
    total = None
    for accumulator in found:
        total = accumulator if total is None else _combine(definition, total, accumulator)
    return _result(definition, total)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), definition=st.sampled_from(AGGREGATES), minutes=st.integers(0, 120))
def test_settle_is_prune_value_and_next_change_in_one_pass(
    data: st.DataObject, definition: AggregateDefinition, minutes: int
) -> None:
    state = data.draw(states(definition))
    now = NOW + timedelta(minutes=minutes)
    pruned = aggregates.prune(state, definition, now)
    expected = outcome(lambda: combined_one_by_one(pruned, definition))
    assert outcome(lambda: aggregates.value(state, definition, now)) == expected
    answer = outcome(lambda: aggregates.settle(state, definition, aggregates.epoch_micros(now)))
    if answer[0] == "raised":
        assert answer == expected  # a sum beyond the float range: see `_as_float`
        return
    settled, value, expiry = answer[1]
    assert settled == pruned
    assert (settled is state) == (pruned is state)
    assert ("ok", value) == expected
    moment = aggregates.next_change(pruned, definition, now)
    assert (None if expiry is None else aggregates.from_epoch_micros(expiry)) == moment


# --- a definitions set -------------------------------------------------------------------------


def test_the_compiled_definitions_keep_dependency_order_and_every_counted_event() -> None:
    counted = [
        AggregateDefinition.model_validate(spec)
        for spec in (
            {"id": "views_7d", "event": "Product Viewed", "window": "7d"},
            {"id": "orders", "event": "Order Completed"},
            {"id": "last_order_at", "event": "Order Completed", "function": "last_at"},
            {"id": "big", "event": "Order Completed", "where": {"total": 200}},
        )
    ]
    segments = [
        SegmentDefinition.model_validate({"id": segment_id, "condition": spec})
        for segment_id, spec in (
            (
                "vip",
                {
                    "any": [
                        {"segment": "buyers"},
                        {"field": "aggregates.big", "op": "gte", "value": 1},
                    ]
                },
            ),
            ("lapsed", {"field": "aggregates.last_order_at", "op": "before", "ago": "14d"}),
            ("buyers", {"field": "aggregates.orders", "op": "gte", "value": 1}),
            ("browsers", {"field": "aggregates.views_7d", "op": "gte", "value": 3}),
        )
    ]
    defs = Definitions.of(counted, segments)
    compiled = defs.compiled
    assert [segment_id for segment_id, _ in compiled.segments] == [s.id for s in defs.segments]
    assert [s.id for s in defs.segments].index("buyers") < [s.id for s in defs.segments].index(
        "vip"
    )
    assert len(compiled.flips) == 1  # `lapsed` alone reads a relative time
    assert {name: [d.id for d, _ in matching] for name, matching in compiled.by_event.items()} == {
        "Product Viewed": ["views_7d"],
        "Order Completed": ["big", "last_order_at", "orders"],
    }
    wheres = {
        d.id: where is not None for matching in compiled.by_event.values() for d, where in matching
    }
    assert wheres == {"views_7d": False, "big": True, "last_order_at": False, "orders": False}
    assert defs.compiled is compiled  # once per definitions set
