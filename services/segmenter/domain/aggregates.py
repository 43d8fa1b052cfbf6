"""Per-contact aggregates in event time, with bounded memory: the segmenter folds each event into a
small JSON state per contact and aggregate, and reads the aggregate's value at any instant.

Window semantics (the product's contract). For a window W, b = `bucket_size(W)`. An event at time
t lands in the bucket starting at s = floor(epoch_seconds(t) / b) * b. At instant `now` the window
holds the buckets with s + W > now. When b divides W (any window of whole seconds) that is
s + W > floor_b(now): the current bucket and the W/b - 1 before it. A bucket leaves the window
exactly at s + W, so the window slides in steps of b; `next_change` is the earliest s + W after
`now`.

- Event time is `clamp_event_time(timestamp, received_at)`. An event time after `now` (a client
  clock up to MAX_FUTURE_SKEW ahead) is bucketed as `now`: nothing is stored ahead of the window,
  so values change by time alone only when a bucket leaves it. Its own time still counts for
  `first_at`, `last_at` and `last`.
- Each bucket keeps one accumulator: what its function needs and nothing more (below). Only
  non-empty buckets are stored, keyed by s as a decimal string: `{"buckets": {"1717200000": acc}}`.
  All-time aggregates keep a single accumulator: `{"all": acc}`.
- After a fold at `now`, every stored bucket has now - W < s <= now, so a contact keeps at most
  W/b + 1 buckets per aggregate (for a non-decreasing `now`): 168 for 7 days, 30 for 30 days.
- Accumulators combine commutatively and associatively, so results do not depend on the order
  events arrive in: a late event lands in its own bucket, unless that has left the window.
  Sums stay exact for this reason (float addition is not associative), and ties are broken by
  value, never by arrival.

Accumulators: count -> int; sum -> int while every input was int, else the exact sum as a
fraction string "p/q"; min/max -> number; last -> [epoch ms, message_id, value];
first_at/last_at -> epoch ms.
"""

from __future__ import annotations

import json
import math
import operator
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from functools import lru_cache, reduce
from typing import Any

from shared.conditions import Facts, evaluate, facts_of
from shared.contracts import Event
from shared.segments import AggregateDefinition

MAX_FUTURE_SKEW = timedelta(minutes=5)
MAX_PAST = timedelta(days=5 * 365)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_MICROSECOND = timedelta(microseconds=1)
_SECOND_MICROS = 1_000_000
_BUCKET_SIZES = (timedelta(days=1), timedelta(hours=1), timedelta(minutes=1), timedelta(seconds=1))
# Enough buckets that a window slides smoothly (1 hour steps for 7 days, 1 day for 30).
_MIN_BUCKETS = 24


def clamp_event_time(timestamp: datetime, received_at: datetime) -> datetime:
    """Event time clamped into [received_at - MAX_PAST, received_at + MAX_FUTURE_SKEW].

    A timestamp beyond the future skew comes from a clock far ahead and is taken as received_at;
    one older than MAX_PAST (a broken clock, a bad import) as received_at - MAX_PAST.
    """
    if timestamp > received_at + MAX_FUTURE_SKEW:
        return received_at
    return max(timestamp, received_at - MAX_PAST)


@lru_cache(maxsize=256)
def bucket_size(window: timedelta) -> timedelta:
    """The largest of 1 day, 1 hour, 1 minute, 1 second that divides the window exactly and
    leaves at least 24 buckets; 1 second when none does (a 20 s window has 20 buckets)."""
    for size in _BUCKET_SIZES:
        if window % size == timedelta(0) and window // size >= _MIN_BUCKETS:
            return size
    return _BUCKET_SIZES[-1]


def matches(definition: AggregateDefinition, event: Event, now: datetime) -> bool:
    """The event is the definition's event and its `where` holds."""
    if event.label != definition.event:
        return False
    return definition.where is None or evaluate(definition.where, facts_of(None, event=event), now)


def fold(
    state: dict[str, Any] | None, definition: AggregateDefinition, event: Event, now: datetime
) -> dict[str, Any] | None:
    """The state after the event; the same object when the event does not count (another event,
    `where` fails, no usable property value, or its bucket has already left the window)."""
    if not matches(definition, event, now):
        return state
    return fold_matching(state, definition, event, now)


def fold_matching(
    state: dict[str, Any] | None,
    definition: AggregateDefinition,
    event: Event,
    now: datetime,
    *,
    at: datetime | None = None,
    now_micros: int | None = None,
) -> dict[str, Any] | None:
    """`fold` of an event already known to match the definition (its event, its `where`).
    `at`, the event's `clamp_event_time`, and `now_micros`, `epoch_micros(now)`, may be given:
    worked out once for every aggregate the event counts in."""
    if at is None:
        at = clamp_event_time(event.timestamp, event.received_at)
    contribution = _contribution(definition, event, at)
    if contribution is None:
        return state
    window = definition.window_micros
    if window is None:
        total = contribution if state is None else _combine(definition, state["all"], contribution)
        return {"all": total}
    if now_micros is None:
        now_micros = _micros(now)
    # Epoch seconds of the start of the bucket of `min(at, now)` (floor, also before 1970).
    size = _size_micros(window)
    start = min(_micros(at), now_micros) // size * (size // _SECOND_MICROS)
    if start * _SECOND_MICROS + window <= now_micros:
        return state
    buckets = {} if state is None else dict(_window_of(state["buckets"], window, now_micros)[0])
    key = str(start)
    buckets[key] = (
        _combine(definition, buckets[key], contribution) if key in buckets else contribution
    )
    return {"buckets": buckets}


def value(state: dict[str, Any] | None, definition: AggregateDefinition, now: datetime) -> Any:
    """The aggregate at `now`: count and sum 0 when nothing counted, the others None."""
    if state is None:
        accumulators = []
    elif definition.window_span is None:
        accumulators = [state["all"]]
    else:
        accumulators = list(_in_window(state, definition, now).values())
    return _total(definition, accumulators)


def next_change(
    state: dict[str, Any] | None, definition: AggregateDefinition, now: datetime
) -> datetime | None:
    """The earliest instant after `now` at which time alone can change `value`: when the oldest
    stored bucket leaves the window. (The value may stay, say a max held by a newer bucket; a
    re-evaluation that finds nothing changed is cheaper than working that out here.)"""
    if state is None or definition.window_span is None:
        return None
    now_micros = _micros(now)
    expiries = (_expiry_micros(int(key), definition) for key in state["buckets"])
    earliest = min((instant for instant in expiries if instant > now_micros), default=None)
    return None if earliest is None else _EPOCH + earliest * _MICROSECOND


def settle(
    state: dict[str, Any] | None, definition: AggregateDefinition, now_micros: int
) -> tuple[dict[str, Any] | None, Any, int | None]:
    """`prune`, `value` and `next_change` at once (one pass over the buckets), `now` given in
    epoch microseconds (`epoch_micros`) and the next change returned in them too."""
    if state is None:
        return None, _result(definition, None), None
    window = definition.window_micros
    if window is None:
        return state, _result(definition, state["all"]), None
    buckets: dict[str, Any] = state["buckets"]
    kept, oldest = _window_of(buckets, window, now_micros)
    if kept is buckets:
        pruned: dict[str, Any] | None = state
    else:
        pruned = {"buckets": kept} if kept else None
    expiry = None if oldest is None else oldest * _SECOND_MICROS + window
    return pruned, _total(definition, list(kept.values())), expiry


def _total(definition: AggregateDefinition, accumulators: list[Any]) -> Any:
    """`_result` of the accumulators combined in order, as `_combine` pairs them: the first
    of equal ones wins, as with the built-in `min` and `max`; a sum of fractions adds them as
    `Fraction`s rather than through their text (the same exact value, each parsed once)."""
    if not accumulators:
        return _result(definition, None)
    function = definition.function
    if function == "count":
        total = reduce(operator.add, accumulators)
    elif function == "sum":
        return _sum(accumulators)
    elif function in ("min", "max"):
        total = (min if function == "min" else max)(accumulators, key=_number_order)
    elif function == "last":
        total = max(accumulators, key=_last_order)
    else:
        total = min(accumulators) if function == "first_at" else max(accumulators)
    return _result(definition, total)


def _sum(accumulators: list[Any]) -> Any:
    total, exact = accumulators[0], None
    for accumulator in accumulators[1:]:
        if exact is not None:
            exact += _fraction(accumulator)
        elif isinstance(total, int) and isinstance(accumulator, int):
            total = total + accumulator
        else:
            exact = _fraction(total) + _fraction(accumulator)
    if exact is not None:
        return _as_float(exact)
    return total if isinstance(total, int) else _as_float(_fraction(total))


def _fraction(accumulator: Any) -> Fraction:
    """A sum's accumulator as a `Fraction` (its text parsed once: every re-evaluation reads it)."""
    return _parsed(accumulator) if isinstance(accumulator, str) else Fraction(accumulator)


@lru_cache(maxsize=4096)
def _parsed(text: str) -> Fraction:
    return Fraction(text)


def _window_of(
    buckets: dict[str, Any], window: int, now_micros: int
) -> tuple[dict[str, Any], int | None]:
    """The buckets in the window at `now` (the same dict when none left it) and the start of the
    oldest of them."""
    if not buckets:
        return buckets, None
    # A bucket starting at s is in while s * 1e6 + window > now, that is s > limit (integers).
    limit = (now_micros - window) // _SECOND_MICROS
    oldest = min(map(int, buckets))
    if oldest > limit:
        return buckets, oldest
    kept = {key: acc for key, acc in buckets.items() if int(key) > limit}
    return kept, (min(map(int, kept)) if kept else None)


def epoch_micros(moment: datetime) -> int:
    """Microseconds since the epoch, as `settle` takes and returns instants."""
    return _micros(moment)


def from_epoch_micros(micros: int) -> datetime:
    """The instant (UTC) of `epoch_micros`, as `next_change` returns it."""
    return _EPOCH + micros * _MICROSECOND


def prune(
    state: dict[str, Any] | None, definition: AggregateDefinition, now: datetime
) -> dict[str, Any] | None:
    """Drop buckets outside the window at `now`; None when nothing is left, the same object when
    nothing was dropped."""
    if state is None or definition.window_span is None:
        return state
    window = definition.window_micros
    assert window is not None
    kept, _ = _window_of(state["buckets"], window, _micros(now))
    if kept is state["buckets"]:
        return state
    return {"buckets": kept} if kept else None


def merge(
    a: dict[str, Any] | None, b: dict[str, Any] | None, definition: AggregateDefinition
) -> dict[str, Any] | None:
    """The state of both histories together (an anonymous contact merging into a known one).

    Commutative and associative; merging the states of two histories equals folding both.
    """
    if a is None or b is None:
        return b if a is None else a
    if definition.window_span is None:
        return {"all": _combine(definition, a["all"], b["all"])}
    buckets = dict(a["buckets"])
    for key, accumulator in b["buckets"].items():
        buckets[key] = (
            _combine(definition, buckets[key], accumulator) if key in buckets else accumulator
        )
    return {"buckets": buckets}


@lru_cache(maxsize=256)
def _size_micros(window_micros: int) -> int:
    """`bucket_size` of a window given in microseconds, in microseconds."""
    return bucket_size(window_micros * _MICROSECOND) // _MICROSECOND


def _micros(moment: datetime) -> int:
    """Microseconds since the epoch: window arithmetic is exact on integers, and cheap."""
    return (moment - _EPOCH) // _MICROSECOND


def _expiry_micros(start: int, definition: AggregateDefinition) -> int:
    """When the bucket starting at `start` (epoch seconds) leaves the window, in microseconds."""
    window = definition.window_micros
    assert window is not None
    return start * _SECOND_MICROS + window


def _in_window(
    state: dict[str, Any], definition: AggregateDefinition, now: datetime
) -> dict[str, Any]:
    window = definition.window_micros
    assert window is not None
    return _window_of(state["buckets"], window, _micros(now))[0]


def _contribution(definition: AggregateDefinition, event: Event, at: datetime) -> Any:
    """One event's accumulator, or None when it reads no usable value."""
    function = definition.function
    if function == "count":
        return 1
    millis = (at - _EPOCH) // _MS
    if function in ("first_at", "last_at"):
        return millis
    found, raw = Facts({"properties": event.properties}).read(f"properties.{definition.prop}")
    if not found:
        return None
    if function == "last":
        return [millis, event.message_id, raw]
    if not isinstance(raw, int | float) or isinstance(raw, bool) or not math.isfinite(raw):
        return None
    if isinstance(raw, float):
        # -0.0 and 0.0 compare equal but differ; keep one so ties cannot depend on order.
        raw += 0.0
        return str(Fraction(raw)) if function == "sum" else raw
    return raw


def _combine(definition: AggregateDefinition, a: Any, b: Any) -> Any:
    """Two accumulators as one: commutative and associative, ties broken by value."""
    function = definition.function
    if function == "count":
        return a + b
    if function == "sum":
        if isinstance(a, int) and isinstance(b, int):
            return a + b
        return str(Fraction(a) + Fraction(b))
    if function == "min":
        return min(a, b, key=_number_order)
    if function == "max":
        return max(a, b, key=_number_order)
    if function == "last":
        return max(a, b, key=_last_order)
    return min(a, b) if function == "first_at" else max(a, b)


def _number_order(number: int | float) -> tuple[int | float, bool]:
    """Equal numbers of different types (1 and 1.0) still order, so ties are deterministic."""
    return number, isinstance(number, float)


def _last_order(last: list[Any]) -> tuple[int, str, str]:
    """By event time, then message id, then (duplicates of one event) the value itself."""
    millis, message_id, raw = last
    return millis, message_id, json.dumps(raw, sort_keys=True, default=str)


def _result(definition: AggregateDefinition, total: Any) -> Any:
    function = definition.function
    if function in ("count", "sum") and total is None:
        return 0
    if total is None or function in ("count", "min", "max"):
        return total
    if function == "sum":
        return total if isinstance(total, int) else _as_float(Fraction(total))
    if function == "last":
        return total[2]
    return _instant_text(total)


@lru_cache(maxsize=4096)
def _instant_text(millis: int) -> str:
    """A first_at / last_at value (kept: every re-evaluation reads the same few instants)."""
    return (_EPOCH + millis * _MS).isoformat()


def _as_float(exact: Fraction) -> float:
    """The float nearest the exact sum (infinite beyond the float range, as float addition)."""
    try:
        return float(exact)
    except OverflowError:
        # Not `copysign(inf, exact)`: that converts the fraction to a float again, and raises.
        return math.inf if exact > 0 else -math.inf
