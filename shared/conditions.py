"""The one condition model of Waypost: journey triggers, branches, exit rules and segments.

A condition is a tree of `all` / `any` / `not` over comparisons of one field with a value, with
another field (`value_from`), or with a time relative to now (`ago`). Fields are dotted paths
into `Facts`: traits, tags, segments, consent, aggregates, the current event and the instance
context. Evaluation is pure and typed: `true` never equals `1`, and a missing field or a value
of the wrong type makes a comparison false rather than raising.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.contracts import Event, Profile
from shared.durations import parse_duration

ROOTS = ("traits", "tags", "segments", "consent", "aggregates", "event", "context", "contact")
_PATH = re.compile(r"^[A-Za-z_$][\w$\-]*(\.[^.\s]+)*$")

Operator = Literal[
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
_UNARY = {"exists", "not_exists"}
_TIME = {"before", "after"}
# The smallest step of time a datetime has.
_RESOLUTION = timedelta(microseconds=1)


class _Node(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class Compare(_Node):
    """`field op value`; `value_from` compares with another field, `ago` with now minus it.

    `{field: aggregates.last_order_at, op: before, ago: 90d}` reads "more than 90 days ago";
    `op: after, ago: 7d` reads "within the last 7 days".
    """

    field: str
    op: Operator = "eq"
    value: Any = None
    value_from: str | None = None
    ago: str | None = None

    @field_validator("field", "value_from")
    @classmethod
    def _path_shape(cls, path: str | None) -> str | None:
        if path is None:
            return None
        if not _PATH.match(path) or path.split(".")[0] not in ROOTS:
            raise ValueError(
                f"'{path}' is not a field; fields start with one of {', '.join(ROOTS)}"
            )
        return path

    @field_validator("ago")
    @classmethod
    def _ago_shape(cls, ago: str | None) -> str | None:
        if ago is not None:
            parse_duration(ago)
        return ago

    @model_validator(mode="after")
    def _operands(self) -> Compare:
        given = [
            name
            for name, present in (
                ("value", self.value is not None),
                ("value_from", self.value_from is not None),
                ("ago", self.ago is not None),
            )
            if present
        ]
        if self.op in _UNARY:
            if given:
                raise ValueError(f"'{self.op}' takes no value")
        elif len(given) != 1:
            raise ValueError(f"'{self.op}' needs exactly one of value, value_from or ago")
        if self.ago is not None and self.op not in _TIME:
            raise ValueError("'ago' goes with op before or after")
        if self.op in {"in", "not_in"} and not isinstance(self.value, list | None):
            raise ValueError(f"'{self.op}' needs a list value")
        return self


class HasTag(_Node):
    """Shorthand for `{field: tags, op: contains, value: <tag>}`."""

    tag: str = Field(min_length=1)


class InSegment(_Node):
    """Shorthand for `{field: segments, op: contains, value: <segment id>}`."""

    segment: str = Field(min_length=1)


class All(_Node):
    all: tuple[Condition, ...] = Field(min_length=1)


class AnyOf(_Node):
    any: tuple[Condition, ...] = Field(min_length=1)


class Not(_Node):
    not_: Condition = Field(alias="not")


Condition = Annotated[All | AnyOf | Not | HasTag | InSegment | Compare, Field(union_mode="smart")]

for _model in (All, AnyOf, Not):
    _model.model_rebuild()


_CONDITION_KEYS = {"all", "any", "not", "field", "tag", "segment"}


def where_shorthand(value: Any) -> Any:
    """`where: {plan: pro}` means every named event property equals the given value."""
    if isinstance(value, dict) and value and not (set(value) & _CONDITION_KEYS):
        return {
            "all": [
                {"field": f"event.properties.{name}", "op": "eq", "value": expected}
                for name, expected in value.items()
            ]
        }
    return value


def condition_from(spec: Any) -> Condition:
    """Validate a plain dict (from YAML/JSON) into a condition tree."""
    from pydantic import TypeAdapter

    return TypeAdapter(Condition).validate_python(spec)


class Facts:
    """What a condition can read, by root. Missing roots read as absent."""

    def __init__(self, roots: Mapping[str, Any]) -> None:
        self._roots = roots

    def read(self, path: str) -> tuple[bool, Any]:
        """(found, value) for a dotted path; list elements by index."""
        head, *rest = path.split(".")
        if head not in self._roots:
            return False, None
        value: Any = self._roots[head]
        for part in rest:
            if isinstance(value, Mapping) and part in value:
                value = value[part]
            elif isinstance(value, list | tuple) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                return False, None
        return value is not None, value


def evaluate(condition: Condition, facts: Facts, now: datetime) -> bool:
    """Whether the condition holds for these facts at `now`."""
    if isinstance(condition, All):
        return all(evaluate(c, facts, now) for c in condition.all)
    if isinstance(condition, AnyOf):
        return any(evaluate(c, facts, now) for c in condition.any)
    if isinstance(condition, Not):
        return not evaluate(condition.not_, facts, now)
    if isinstance(condition, HasTag):
        return _contains(facts.read("tags")[1], condition.tag)
    if isinstance(condition, InSegment):
        return _contains(facts.read("segments")[1], condition.segment)
    return _compare(condition, facts, now)


def reads(condition: Condition) -> Iterator[str]:
    """Every field path the condition reads (for checks such as 'nobody writes this context')."""
    if isinstance(condition, All | AnyOf):
        for child in condition.all if isinstance(condition, All) else condition.any:
            yield from reads(child)
    elif isinstance(condition, Not):
        yield from reads(condition.not_)
    elif isinstance(condition, HasTag):
        yield "tags"
    elif isinstance(condition, InSegment):
        yield "segments"
    else:
        yield condition.field
        if condition.value_from is not None:
            yield condition.value_from


def next_change(condition: Condition, facts: Facts, now: datetime) -> datetime | None:
    """The earliest instant after `now` at which a relative-time comparison flips, else None.

    Only time moves these instants; any other change arrives as an event. The segmenter arms one
    timer per contact at this instant instead of scanning everyone periodically. Evaluated at the
    returned instant, the comparison already reads its new value.
    """
    instants: list[datetime] = []
    for compare in _relative_comparisons(condition):
        found, raw = facts.read(compare.field)
        moment = as_datetime(raw) if found else None
        if moment is None or compare.ago is None:
            continue
        flips_at = moment + parse_duration(compare.ago)
        if compare.op == "before":
            # `moment < now - ago` holds only strictly after moment + ago.
            flips_at += _RESOLUTION
        if flips_at > now:
            instants.append(flips_at)
    return min(instants, default=None)


def _relative_comparisons(condition: Condition) -> Iterator[Compare]:
    if isinstance(condition, All | AnyOf):
        for child in condition.all if isinstance(condition, All) else condition.any:
            yield from _relative_comparisons(child)
    elif isinstance(condition, Not):
        yield from _relative_comparisons(condition.not_)
    elif isinstance(condition, Compare) and condition.ago is not None:
        yield condition


# -- compiled conditions ----------------------------------------------------------------------
# A condition checked for every contact on every event (a live segment, an aggregate's `where`)
# is worked out once into closures: field paths split, durations parsed, operands classified.
# They answer exactly as `evaluate` and `next_change`, which stay the reference (a test holds it).

Check = Callable[[Facts, datetime], bool]
Flip = Callable[[Facts, datetime], datetime | None]
_Roots = Mapping[str, Any]
_Read = Callable[[_Roots], Any]
_Test = Callable[[_Roots, datetime], bool]
_ABSENT_WINS = frozenset({"ne", "not_in", "not_contains"})
_ORDER = {"gt", "gte", "lt", "lte"}


def compile_condition(condition: Condition) -> Check:
    """`evaluate` of this condition, with its structure worked out once."""
    node = _compiled(condition)

    def check(facts: Facts, now: datetime) -> bool:
        return node(facts._roots, now)

    return check


def compile_next_change(condition: Condition) -> Flip | None:
    """`next_change` of this condition worked out once; None when it has no relative time."""
    flips = [
        (_reader(c.field), parse_duration(c.ago), c.op == "before")
        for c in _relative_comparisons(condition)
        if c.ago is not None
    ]
    if not flips:
        return None

    def flip(facts: Facts, now: datetime) -> datetime | None:
        earliest: datetime | None = None
        for read, ago, before in flips:
            moment = as_datetime(read(facts._roots))
            if moment is None:
                continue
            flips_at = moment + ago
            if before:
                flips_at += _RESOLUTION
            # Strictly earlier: of equal instants the first stays, as `min` keeps it.
            if flips_at > now and (earliest is None or flips_at < earliest):
                earliest = flips_at
        return earliest

    return flip


def _reader(path: str) -> _Read:
    """`Facts.read` of one path, as the value (None when absent: `read` finds no None)."""
    head, *rest = path.split(".")
    if not rest:
        return lambda roots: roots.get(head)
    if len(rest) == 1:
        (part,) = rest
        if not part.isdigit():

            def read_one(roots: _Roots) -> Any:
                if head not in roots:
                    return None
                value = roots[head]
                if type(value) is dict or isinstance(value, Mapping):
                    return value.get(part)
                return None

            return read_one
    parts = tuple(rest)

    def read(roots: _Roots) -> Any:
        if head not in roots:
            return None
        value = roots[head]
        for part in parts:
            if isinstance(value, Mapping) and part in value:
                value = value[part]
            elif isinstance(value, list | tuple) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                return None
        return value

    return read


def _compiled(condition: Condition) -> _Test:
    if isinstance(condition, All | AnyOf):
        children = tuple(
            _compiled(c) for c in (condition.all if isinstance(condition, All) else condition.any)
        )
        return _all(children) if isinstance(condition, All) else _any(children)
    if isinstance(condition, Not):
        inner = _compiled(condition.not_)
        return lambda roots, now: not inner(roots, now)
    if isinstance(condition, HasTag | InSegment):
        root, item = (
            ("tags", condition.tag)
            if isinstance(condition, HasTag)
            else ("segments", condition.segment)
        )
        return _contains_item(root, item)
    return _compiled_compare(condition)


def _all(children: tuple[_Test, ...]) -> _Test:
    if len(children) == 1:
        return children[0]
    if len(children) == 2:
        first, second = children
        return lambda roots, now: first(roots, now) and second(roots, now)
    return lambda roots, now: all(c(roots, now) for c in children)


def _any(children: tuple[_Test, ...]) -> _Test:
    if len(children) == 1:
        return children[0]
    if len(children) == 2:
        first, second = children
        return lambda roots, now: first(roots, now) or second(roots, now)
    return lambda roots, now: any(c(roots, now) for c in children)


def _contains_item(root: str, item: str) -> _Test:
    """`tags` / `segments` contains a string: a tuple or list of strings, in the common case."""
    plain = as_datetime(item) is None

    def check(roots: _Roots, now: datetime) -> bool:
        container: Any = roots.get(root)
        if plain and type(container) in (tuple, list):
            # Only an equal string can match a string that reads as no time (see `_same`).
            return item in container and _contains(container, item)
        return _contains(container, item)

    return check


def _compiled_compare(compare: Compare) -> _Test:
    read, op = _reader(compare.field), compare.op
    if op == "exists":
        return lambda roots, now: read(roots) is not None
    if op == "not_exists":
        return lambda roots, now: read(roots) is None
    absent = op in _ABSENT_WINS
    if compare.ago is not None:
        ago = parse_duration(compare.ago)

        def relative(roots: _Roots, now: datetime) -> bool:
            left, right = read(roots), now - ago
            if left is None:
                return absent
            return _apply(op, left, right)

        return relative
    if compare.value_from is not None:
        read_right = _reader(compare.value_from)

        def between(roots: _Roots, now: datetime) -> bool:
            left = read(roots)
            right = read_right(roots)
            if right is None:
                return absent and left is not None
            if left is None:
                return absent
            return _apply(op, left, right)

        return between
    right = compare.value
    if _is_number(right) and op in _ORDER:
        return _number_order(read, op, right)
    if op == "eq" and _is_number(right):
        return _equals_number(read, right)
    if op in ("in", "not_in") and isinstance(right, list | tuple) and all(map(_plain, right)):
        return _among_texts(read, frozenset(right), op == "in")
    if op == "eq" and isinstance(right, str) and as_datetime(right) is None:
        return _equals_text(read, right)

    def generic(roots: _Roots, now: datetime) -> bool:
        left = read(roots)
        if left is None:
            return absent
        return _apply(op, left, right)

    return generic


def _equals_number(read: _Read, right: int | float) -> _Test:
    """`eq` a number (typed, see `_same`): a number equals it by value, bool never."""

    def check(roots: _Roots, now: datetime) -> bool:
        left = read(roots)
        t = type(left)
        if t is int or t is float:
            return bool(left == right)
        return left is not None and _same(left, right)

    return check


def _equals_text(read: _Read, right: str) -> _Test:
    """`eq` a string that reads as no time: only an equal string matches (see `_same`)."""

    def check(roots: _Roots, now: datetime) -> bool:
        left = read(roots)
        t = type(left)
        if t is str:
            return bool(left == right)
        if t is int or t is float or left is None:
            return False
        return _same(left, right)

    return check


def _plain(value: Any) -> bool:
    """A string that reads as no time: `_same` finds it equal to an equal string only."""
    return type(value) is str and as_datetime(value) is None


def _among_texts(read: _Read, texts: frozenset[str], among: bool) -> _Test:
    """`in` / `not_in` a list of plain strings: a string is among them when one equals it; no
    other value equals any of them (see `_same`)."""

    def check(roots: _Roots, now: datetime) -> bool:
        left = read(roots)
        if left is None:
            return not among
        return (type(left) is str and left in texts) is among

    return check


def _number_order(read: _Read, op: str, right: int | float) -> _Test:
    """gt / gte / lt / lte with a number: a number compares, anything else goes to `_order`."""
    compare: Callable[[Any, Any], bool] = {
        "gt": lambda a, b: a > b,
        "gte": lambda a, b: a >= b,
        "lt": lambda a, b: a < b,
        "lte": lambda a, b: a <= b,
    }[op]

    def check(roots: _Roots, now: datetime) -> bool:
        left = read(roots)
        t = type(left)
        if t is int or t is float:
            return bool(compare(left, right))
        if left is None:
            return False
        return _order(op, left, right)

    return check


def _compare(compare: Compare, facts: Facts, now: datetime) -> bool:
    found, left = facts.read(compare.field)
    if compare.op == "exists":
        return found
    if compare.op == "not_exists":
        return not found
    if compare.ago is not None:
        right: Any = now - parse_duration(compare.ago)
    elif compare.value_from is not None:
        right_found, right = facts.read(compare.value_from)
        if not right_found:
            return compare.op in {"ne", "not_in", "not_contains"} and found
    else:
        right = compare.value
    if not found:
        # An absent field differs from every value and contains nothing.
        return compare.op in {"ne", "not_in", "not_contains"}
    return _apply(compare.op, left, right)


def _apply(op: str, left: Any, right: Any) -> bool:
    if op == "eq":
        return _same(left, right)
    if op == "ne":
        return not _same(left, right)
    if op == "in":
        return isinstance(right, list | tuple) and any(_same(left, r) for r in right)
    if op == "not_in":
        return isinstance(right, list | tuple) and not any(_same(left, r) for r in right)
    if op == "contains":
        return _contains(left, right)
    if op == "not_contains":
        return not _contains(left, right)
    if op == "starts_with":
        return isinstance(left, str) and isinstance(right, str) and left.startswith(right)
    if op in _TIME:
        left_time, right_time = as_datetime(left), as_datetime(right)
        if left_time is None or right_time is None:
            return False
        return left_time < right_time if op == "before" else left_time > right_time
    return _order(op, left, right)


def _order(op: str, left: Any, right: Any) -> bool:
    pair = _comparable(left, right)
    if pair is None:
        return False
    a, b = pair
    if op == "gt":
        return bool(a > b)
    if op == "gte":
        return bool(a >= b)
    if op == "lt":
        return bool(a < b)
    return bool(a <= b)


def _comparable(left: Any, right: Any) -> tuple[Any, Any] | None:
    if _is_number(left) and _is_number(right):
        return left, right
    if isinstance(left, str) and isinstance(right, str):
        left_time, right_time = as_datetime(left), as_datetime(right)
        if left_time is not None and right_time is not None:
            return left_time, right_time
        return left, right
    left_time, right_time = as_datetime(left), as_datetime(right)
    if left_time is not None and right_time is not None:
        return left_time, right_time
    return None


def _same(left: Any, right: Any) -> bool:
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left is right
    if _is_number(left) and _is_number(right):
        return bool(left == right)
    if type(left) is not type(right):
        left_time, right_time = as_datetime(left), as_datetime(right)
        return left_time is not None and left_time == right_time
    return bool(left == right)


def _contains(container: Any, item: Any) -> bool:
    if isinstance(container, str):
        return isinstance(item, str) and item in container
    if isinstance(container, Mapping):
        return isinstance(item, str) and bool(container.get(item))
    if isinstance(container, list | tuple | set | frozenset):
        return any(_same(element, item) for element in container)
    return False


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def as_datetime(value: Any) -> datetime | None:
    """A datetime or ISO-8601 string as an aware datetime (UTC when no zone given), else None."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str) and len(value) >= 10 and value[4] == "-":
        return _parsed_time(value)
    else:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@lru_cache(maxsize=4096)
def _parsed_time(value: str) -> datetime | None:
    """An ISO-8601 string as `as_datetime` reads it (kept: segments re-read the same instants)."""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def facts_of(
    profile: Profile | None,
    *,
    event: Event | None = None,
    context: Mapping[str, Any] | None = None,
    aggregates: Mapping[str, Any] | None = None,
    segments: Sequence[str] | None = None,
) -> Facts:
    """The facts of a contact (its profile), the event at hand and an instance's context.

    `aggregates` and `segments` stand in for the profile's own while the segmenter works them
    out (a segment that reads another sees the membership just computed).
    """
    roots: dict[str, Any] = {}
    if profile is not None:
        roots.update(profile_facts(profile, aggregates=aggregates, segments=segments))
    if event is not None:
        roots["event"] = event_facts(event)
    if context is not None:
        roots["context"] = context
    return Facts(roots)


def profile_facts(
    profile: Profile,
    *,
    aggregates: Mapping[str, Any] | None = None,
    segments: Sequence[str] | None = None,
) -> dict[str, Any]:
    """A contact's roots as conditions and templates read them: `traits`, `tags`, `segments`,
    `consent`, `aggregates` and `contact` (its key, user id, first and last seen, event counts).
    """
    return {
        "traits": profile.traits,
        "tags": profile.tags,
        "segments": profile.segments if segments is None else segments,
        "consent": profile.consent,
        "aggregates": profile.aggregates if aggregates is None else aggregates,
        "contact": {
            "key": profile.contact_key,
            "user_id": profile.user_id,
            "first_seen": profile.first_seen,
            "last_seen": profile.last_seen,
            "event_counts": profile.event_counts,
        },
    }


def event_facts(event: Event) -> dict[str, Any]:
    """An event as conditions and templates read it (also what an instance context keeps)."""
    return {
        "name": event.label,
        "type": event.type,
        "message_id": event.message_id,
        "timestamp": event.timestamp.isoformat(),
        "properties": dict(event.properties),
        "traits": dict(event.traits),
    }
