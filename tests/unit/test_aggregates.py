"""Aggregates: bucketed sliding windows in event time, order-independent folds and merges."""

from __future__ import annotations

import copy
import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.segmenter.domain.aggregates import (
    MAX_FUTURE_SKEW,
    MAX_PAST,
    bucket_size,
    clamp_event_time,
    fold,
    matches,
    merge,
    next_change,
    prune,
    value,
)
from shared.contracts import Event
from shared.segments import AggregateDefinition

NOW = datetime(2024, 6, 10, 12, 0, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ORDER = "Order Completed"


def track(
    at: datetime,
    *,
    name: str = ORDER,
    properties: dict[str, Any] | None = None,
    message_id: str = "m-1",
    received_at: datetime | None = None,
) -> Event:
    return Event(
        type="track",
        event=name,
        user_id="user-1",
        message_id=message_id,
        timestamp=at,
        received_at=received_at or at,
        properties=properties or {},
    )


def aggregate(**spec: Any) -> AggregateDefinition:
    return AggregateDefinition.model_validate({"id": "orders", "event": ORDER, **spec})


def of(function: str, window: str | None = None) -> AggregateDefinition:
    """An aggregate of `function`, reading `total` when the function needs a property."""
    reads = {"property": "total"} if function in {"sum", "min", "max", "last"} else {}
    return aggregate(function=function, window=window, **reads)


def fold_all(
    definition: AggregateDefinition, events: list[Event], now: datetime = NOW
) -> dict[str, Any] | None:
    state: dict[str, Any] | None = None
    for event in events:
        state = fold(state, definition, event, now)
    return state


def bucket_key(moment: datetime, size: timedelta) -> str:
    return str((moment - EPOCH) // size * int(size.total_seconds()))


# --- bucket sizes and event time ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "size"),
    [
        ("7d", timedelta(hours=1)),
        ("30d", timedelta(days=1)),
        ("2h", timedelta(minutes=1)),
        ("1d", timedelta(hours=1)),
        ("20s", timedelta(seconds=1)),
        ("366d", timedelta(days=1)),
        ("23h", timedelta(minutes=1)),
        ("90s", timedelta(seconds=1)),
        ("1.5s", timedelta(seconds=1)),
    ],
)
def test_bucket_size_is_the_largest_unit_dividing_the_window_into_24_or_more(
    window: str, size: timedelta
) -> None:
    assert bucket_size(aggregate(window=window).window_span or timedelta(0)) == size


def test_a_timestamp_within_the_bounds_is_the_event_time() -> None:
    assert clamp_event_time(NOW - timedelta(days=3), NOW) == NOW - timedelta(days=3)
    assert clamp_event_time(NOW + MAX_FUTURE_SKEW, NOW) == NOW + MAX_FUTURE_SKEW
    assert clamp_event_time(NOW - MAX_PAST, NOW) == NOW - MAX_PAST


def test_a_timestamp_far_ahead_is_taken_as_the_time_received() -> None:
    assert clamp_event_time(NOW + MAX_FUTURE_SKEW + timedelta(seconds=1), NOW) == NOW


def test_a_timestamp_older_than_the_past_bound_is_clamped_to_it() -> None:
    assert clamp_event_time(NOW - MAX_PAST - timedelta(days=1), NOW) == NOW - MAX_PAST


# --- which events count ------------------------------------------------------------------------


def test_matches_the_named_event_only() -> None:
    definition = aggregate()
    assert matches(definition, track(NOW), NOW)
    assert not matches(definition, track(NOW, name="Product Viewed"), NOW)
    page = Event(type="page", message_id="p-1", user_id="user-1", timestamp=NOW, received_at=NOW)
    assert not matches(definition, page, NOW)


def test_where_condition_filters_on_event_properties() -> None:
    definition = aggregate(where={"field": "event.properties.total", "op": "gte", "value": 50})
    assert matches(definition, track(NOW, properties={"total": 50}), NOW)
    assert not matches(definition, track(NOW, properties={"total": 49.5}), NOW)
    assert not matches(definition, track(NOW), NOW)


def test_where_shorthand_requires_each_property_to_equal_its_value() -> None:
    definition = aggregate(function="sum", property="total", where={"currency": "EUR"})
    eur = track(NOW, properties={"currency": "EUR", "total": 10}, message_id="m-1")
    usd = track(NOW, properties={"currency": "USD", "total": 99}, message_id="m-2")
    assert matches(definition, eur, NOW)
    assert not matches(definition, usd, NOW)
    assert value(fold_all(definition, [eur, usd]), definition, NOW) == 10


def test_an_event_that_does_not_match_leaves_the_state_as_it_was() -> None:
    definition = aggregate(window="7d")
    state = fold_all(definition, [track(NOW)])
    assert fold(state, definition, track(NOW, name="Product Viewed"), NOW) is state
    assert fold(None, definition, track(NOW, name="Product Viewed"), NOW) is None


@pytest.mark.parametrize("raw", ["12", True, None, [1], {"amount": 1}, float("nan"), float("inf")])
def test_sum_min_max_ignore_values_that_are_not_finite_numbers(raw: Any) -> None:
    for function in ("sum", "min", "max"):
        definition = aggregate(function=function, property="total", window="1d")
        state = fold_all(definition, [track(NOW, properties={"total": 5}, message_id="m-0")])
        unusable = track(NOW, properties={"total": raw}, message_id="m-1")
        assert fold(state, definition, unusable, NOW) is state
        assert fold(None, definition, track(NOW, message_id="m-2"), NOW) is None


@pytest.mark.parametrize("raw", ["gold", 0, False, {"sku": "A-1"}, [1, 2]])
def test_last_keeps_any_non_null_value(raw: Any) -> None:
    definition = aggregate(function="last", property="tier")
    state = fold_all(definition, [track(NOW, properties={"tier": raw})])
    assert value(state, definition, NOW) == raw
    assert fold(state, definition, track(NOW, properties={"tier": None}), NOW) is state


def test_property_is_a_dotted_path_into_the_event_properties() -> None:
    definition = aggregate(function="max", property="order.total")
    events = [
        track(NOW, properties={"order": {"total": 30}}, message_id="m-1"),
        track(NOW, properties={"order": {"total": 70}}, message_id="m-2"),
        track(NOW, properties={"total": 900}, message_id="m-3"),
    ]
    assert value(fold_all(definition, events), definition, NOW) == 70


# --- values ------------------------------------------------------------------------------------

T1, T2, T3 = (NOW - timedelta(hours=hours) for hours in (30, 20, 10))


def orders(*totals: Any) -> list[Event]:
    return [
        track(at, properties={"total": total}, message_id=f"m-{index}")
        for index, (at, total) in enumerate(zip((T1, T2, T3), totals, strict=False))
    ]


@pytest.mark.parametrize("window", [None, "7d"])
def test_each_function_reads_its_value(window: str | None) -> None:
    def read(function: str, *totals: Any) -> Any:
        definition = of(function, window)
        return value(fold_all(definition, orders(*totals)), definition, NOW)

    assert read("count", 1, 2, 3) == 3
    assert read("sum", 10, 20, 12) == 42
    assert isinstance(read("sum", 10, 20, 12), int)
    assert read("sum", 10, 2.5) == 12.5
    # Past the float range a float sum is infinite, as float addition is; it does not raise.
    assert read("sum", 1e308, 1e308) == math.inf
    assert read("sum", -1e308, -1e308, 0.5) == -math.inf
    assert isinstance(read("sum", 1.5, 2.5), float)
    assert read("min", 10, -2.5, 3) == -2.5
    assert read("max", 10, -2.5, 3) == 10
    assert read("last", "a", "b", "c") == "c"
    assert read("first_at", 1, 2, 3) == T1.isoformat()
    assert read("last_at", 1, 2, 3) == T3.isoformat()


def test_values_of_an_empty_state() -> None:
    for window in (None, "1d"):
        assert value(None, of("count", window), NOW) == 0
        assert value(None, of("sum", window), NOW) == 0
        for function in ("min", "max", "last", "first_at", "last_at"):
            assert value(None, of(function, window), NOW) is None


def test_a_float_sum_is_the_exact_sum_rounded_once() -> None:
    definition = aggregate(function="sum", property="total")
    assert value(fold_all(definition, orders(0.1, 0.2, 0.3)), definition, NOW) == 0.6
    assert 0.1 + 0.2 + 0.3 != 0.6


@pytest.mark.parametrize("function", ["min", "max"])
@pytest.mark.parametrize("tie", [(0.0, -0.0), (1, 1.0)])
def test_equal_numbers_of_another_sign_or_type_tie_the_same_way_in_any_order(
    function: str, tie: tuple[float, float]
) -> None:
    definition = of(function, "7d")
    one, other = (track(T1, properties={"total": total}, message_id="m-1") for total in tie)
    # Compared as JSON: -0.0 == 0.0 and 1 == 1.0, yet a stored state or a value shows which.
    forth, back = fold_all(definition, [one, other]), fold_all(definition, [other, one])
    assert forth is not None
    assert json.dumps(forth) == json.dumps(back)
    assert repr(value(forth, definition, NOW)) == repr(value(back, definition, NOW))


def test_last_is_the_latest_by_event_time_then_the_greater_message_id() -> None:
    definition = aggregate(function="last", property="tier", window="7d")
    events = [
        track(T3, properties={"tier": "late-b"}, message_id="m-b"),
        track(T3, properties={"tier": "late-a"}, message_id="m-a"),
        track(T1, properties={"tier": "early-z"}, message_id="m-z"),
    ]
    assert value(fold_all(definition, events), definition, NOW) == "late-b"
    assert value(fold_all(definition, events[::-1]), definition, NOW) == "late-b"


# --- the sliding window ------------------------------------------------------------------------


def test_a_bucket_leaves_the_window_exactly_at_its_start_plus_the_window() -> None:
    definition = aggregate(window="7d")
    at = datetime(2024, 6, 3, 10, 17, tzinfo=UTC)
    state = fold_all(definition, [track(at)], now=at + timedelta(minutes=1))
    slide = datetime(2024, 6, 10, 10, 0, tzinfo=UTC)

    assert value(state, definition, slide - timedelta(microseconds=1)) == 1
    assert value(state, definition, slide) == 0
    assert next_change(state, definition, at) == slide
    assert next_change(state, definition, slide - timedelta(microseconds=1)) == slide
    assert next_change(state, definition, slide) is None


def test_next_change_is_the_oldest_bucket_leaving_then_the_next() -> None:
    definition = aggregate(window="2h")
    old, new = NOW - timedelta(minutes=90, seconds=30), NOW - timedelta(minutes=5)
    state = fold_all(definition, [track(new, message_id="m-2"), track(old, message_id="m-1")])
    first = NOW + timedelta(minutes=29)
    assert next_change(state, definition, NOW) == first
    assert value(state, definition, first) == 1
    assert next_change(state, definition, first) == NOW + timedelta(minutes=115)


def test_next_change_is_none_for_all_time_and_empty_states() -> None:
    assert next_change(fold_all(aggregate(), [track(NOW)]), aggregate(), NOW) is None
    assert next_change(None, aggregate(window="7d"), NOW) is None


def test_an_event_whose_bucket_has_left_the_window_changes_nothing() -> None:
    definition = aggregate(window="20s")
    late = track(NOW - timedelta(seconds=20), received_at=NOW)
    assert fold(None, definition, late, NOW) is None
    state = fold_all(definition, [track(NOW)])
    assert fold(state, definition, late, NOW) is state
    assert value(state, definition, NOW) == 1


def test_a_late_event_still_in_the_window_lands_in_its_own_bucket() -> None:
    definition = aggregate(window="20s")
    recent, late = (
        track(NOW, message_id="m-2"),
        track(NOW - timedelta(seconds=19), message_id="m-1"),
    )
    state = fold_all(definition, [recent, late])
    assert state == fold_all(definition, [late, recent])
    assert value(state, definition, NOW + timedelta(seconds=1)) == 1


def test_an_event_ahead_of_now_counts_now_and_keeps_its_own_time() -> None:
    definition = aggregate(function="last_at", window="20s")
    ahead = NOW + timedelta(minutes=4)
    state = fold_all(definition, [track(ahead, received_at=NOW)])
    assert state is not None
    assert list(state["buckets"]) == [bucket_key(NOW, timedelta(seconds=1))]
    assert value(state, definition, NOW) == ahead.isoformat()


def test_prune_drops_expired_buckets_only() -> None:
    definition = aggregate(window="20s")
    state = fold_all(definition, [track(NOW - timedelta(seconds=10)), track(NOW)])
    assert prune(state, definition, NOW) is state
    pruned = prune(state, definition, NOW + timedelta(seconds=11))
    assert pruned == {"buckets": {bucket_key(NOW, timedelta(seconds=1)): 1}}
    assert prune(state, definition, NOW + timedelta(seconds=20)) is None
    everything = fold_all(aggregate(), [track(NOW - timedelta(days=900), received_at=NOW)])
    assert prune(everything, aggregate(), NOW) is everything


def test_folding_prunes_expired_buckets_and_keeps_the_input_unchanged() -> None:
    definition = aggregate(window="20s")
    state = fold_all(definition, [track(NOW)])
    before = copy.deepcopy(state)
    later = NOW + timedelta(seconds=30)
    folded = fold(state, definition, track(later, message_id="m-2"), later)
    assert folded == {"buckets": {bucket_key(later, timedelta(seconds=1)): 1}}
    assert state == before


def test_a_week_of_hourly_buckets_stays_at_168() -> None:
    definition = aggregate(window="7d")
    state: dict[str, Any] | None = None
    for step in range(30 * 48):
        at = NOW + timedelta(minutes=30 * step)
        state = fold(state, definition, track(at, message_id=f"m-{step}"), at)
        assert state is not None
        assert len(state["buckets"]) <= 168
    assert value(state, definition, at) == 7 * 48


def test_merge_combines_both_histories() -> None:
    definition = aggregate(function="sum", property="total", window="7d")
    a = fold_all(definition, orders(10, 20))
    b = fold_all(definition, [track(T2, properties={"total": 5}, message_id="m-9")])
    assert value(merge(a, b, definition), definition, NOW) == 35
    assert merge(a, None, definition) is a
    assert merge(None, b, definition) is b
    assert merge(None, None, definition) is None


@pytest.mark.parametrize("window", [None, "7d"])
@pytest.mark.parametrize(
    ("function", "totals"),
    [
        ("count", (1, 2, 3)),
        ("sum", (1, 2, 3)),
        ("sum", (0.1, 2, 1e300)),
        ("min", (0.5, -2, 3)),
        ("max", (0.5, -2, 3)),
        ("last", ({"sku": "A", "qty": [1, 2]}, "b", 3.25)),
        ("first_at", (1, 2, 3)),
        ("last_at", (1, 2, 3)),
    ],
)
def test_state_round_trips_through_json_unchanged(
    window: str | None, function: str, totals: tuple[Any, ...]
) -> None:
    definition = of(function, window)
    state = fold_all(definition, orders(*totals))
    restored = json.loads(json.dumps(state, allow_nan=False))
    assert restored == state
    assert value(restored, definition, NOW) == value(state, definition, NOW)


# --- properties --------------------------------------------------------------------------------

DEFINITIONS = [
    aggregate(window="20s"),
    aggregate(window="90s"),
    aggregate(window="1.5h"),
    aggregate(function="sum", property="amount", window="2h"),
    aggregate(function="sum", property="amount"),
    aggregate(function="min", property="amount", window="1d"),
    aggregate(function="max", property="amount", window="7d"),
    aggregate(function="last", property="amount", window="30d"),
    aggregate(function="last", property="amount"),
    aggregate(function="first_at", window="1.5s"),
    aggregate(function="last_at"),
]
WINDOWED_COUNTS = [d for d in DEFINITIONS if d.function == "count"]
DAY_MS = 86_400_000

amounts = st.one_of(
    st.integers(-1000, 1000),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["12", True, None, {"nested": 1}]),
)
events = st.builds(
    lambda name, received, skew, amount, message_id: track(
        NOW + timedelta(milliseconds=received + skew),
        name=name,
        received_at=NOW + timedelta(milliseconds=received),
        properties={"amount": amount},
        message_id=message_id,
    ),
    name=st.sampled_from([ORDER, ORDER, ORDER, "Product Viewed"]),
    # Mostly recent, so that short windows see events too.
    received=st.one_of(st.integers(-30_000, 0), st.integers(-8 * DAY_MS, 0)),
    skew=st.one_of(
        st.integers(-180_000, 180_000),
        st.integers(-3 * DAY_MS, 600_000),
        st.just(-6 * 365 * DAY_MS),
    ),
    amount=amounts,
    message_id=st.sampled_from(["a", "b", "c"]),
)
histories = st.lists(events, max_size=12)


@given(definition=st.sampled_from(DEFINITIONS), history=histories, data=st.data())
def test_folding_any_permutation_gives_the_same_state(
    definition: AggregateDefinition, history: list[Event], data: st.DataObject
) -> None:
    state = fold_all(definition, history)
    assert fold_all(definition, data.draw(st.permutations(history))) == state
    assert json.loads(json.dumps(state, allow_nan=False)) == state


@given(definition=st.sampled_from(DEFINITIONS), a=histories, b=histories, c=histories)
def test_merge_is_commutative_associative_and_equals_folding_both(
    definition: AggregateDefinition, a: list[Event], b: list[Event], c: list[Event]
) -> None:
    fa, fb, fc = (fold_all(definition, history) for history in (a, b, c))
    assert merge(fa, fb, definition) == merge(fb, fa, definition)
    assert merge(merge(fa, fb, definition), fc, definition) == merge(
        fa, merge(fb, fc, definition), definition
    )
    assert merge(fa, fb, definition) == fold_all(definition, a + b)


@given(
    definition=st.sampled_from(WINDOWED_COUNTS),
    history=histories,
    later=st.integers(0, 8 * DAY_MS),
)
def test_value_never_counts_an_expired_bucket(
    definition: AggregateDefinition, history: list[Event], later: int
) -> None:
    window = definition.window_span
    assert window is not None
    size = bucket_size(window)
    then = NOW + timedelta(milliseconds=later)

    def expires(event: Event) -> datetime:
        at = min(clamp_event_time(event.timestamp, event.received_at), NOW)
        return EPOCH + (at - EPOCH) // size * size + window

    counted = [e for e in history if e.label == ORDER and expires(e) > then]
    state = fold_all(definition, history)
    assert value(state, definition, then) == len(counted)
    assert value(prune(state, definition, then), definition, then) == len(counted)


@given(
    definition=st.sampled_from([d for d in DEFINITIONS if d.window is not None]),
    history=histories,
    nows=st.lists(st.integers(0, 3 * DAY_MS), min_size=12, max_size=12),
)
def test_stored_buckets_never_exceed_the_window_over_the_bucket_size_plus_one(
    definition: AggregateDefinition, history: list[Event], nows: list[int]
) -> None:
    window = definition.window_span
    assert window is not None
    bound = window / bucket_size(window) + 1
    state: dict[str, Any] | None = None
    for event, now in zip(history, sorted(nows), strict=False):
        state = fold(state, definition, event, NOW + timedelta(milliseconds=now))
        assert state is None or len(state.get("buckets", {})) <= bound
