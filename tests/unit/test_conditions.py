"""The shared condition model: typed comparisons, absent fields, time, context, reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from shared.conditions import (
    Facts,
    condition_from,
    evaluate,
    event_facts,
    facts_of,
    next_change,
    reads,
)
from shared.contracts import Event, Profile

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def holds(spec: Any, **roots: Any) -> bool:
    return evaluate(condition_from(spec), Facts(roots), NOW)


def profile(**fields: Any) -> Profile:
    return Profile(contact_key="ada", first_seen=NOW, last_seen=NOW, updated_at=NOW, **fields)


# --- typed equality -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "right", "expected"),
    [
        (True, True, True),
        (True, 1, False),
        (1, True, False),
        (False, 0, False),
        (1, 1.0, True),
        ("1", 1, False),
        ("pro", "pro", True),
        ("Pro", "pro", False),
        ("2026-03-02T09:00:00+00:00", NOW, True),
        ("2026-03-02T10:00:00+01:00", "2026-03-02T09:00:00Z", False),
    ],
)
def test_equality_is_typed(left: Any, right: Any, expected: bool) -> None:
    assert holds({"field": "traits.x", "op": "eq", "value": right}, traits={"x": left}) is expected


def test_ne_is_the_negation_of_eq_for_present_fields() -> None:
    assert holds({"field": "traits.x", "op": "ne", "value": 1}, traits={"x": True})
    assert not holds({"field": "traits.x", "op": "ne", "value": 1}, traits={"x": 1})


@pytest.mark.parametrize(("op", "value"), [("gt", 5), ("gte", 10), ("lt", 11), ("lte", 10)])
def test_ordering_compares_numbers(op: str, value: Any) -> None:
    assert holds({"field": "traits.n", "op": op, "value": value}, traits={"n": 10})


@pytest.mark.parametrize("left", ["10", True, None, [10]])
def test_ordering_a_number_with_anything_else_is_false(left: Any) -> None:
    spec = {"field": "traits.n", "op": "gt", "value": 5}

    assert not holds(spec, traits={"n": left})
    assert not holds({"field": "traits.n", "op": "lte", "value": 5}, traits={"n": left})


def test_ordering_strings_that_are_datetimes_compares_instants() -> None:
    spec = {"field": "traits.at", "op": "gt", "value": "2026-03-02T09:30:00+01:00"}

    # 09:00 UTC is later than 09:30 in UTC+1 (08:30 UTC), though it sorts earlier as text.
    assert holds(spec, traits={"at": "2026-03-02T09:00:00+00:00"})


# --- absent fields --------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["eq", "gt", "gte", "lt", "lte", "in", "contains", "starts_with"])
def test_an_absent_field_makes_a_positive_comparison_false(op: str) -> None:
    value: Any = ["a"] if op == "in" else "a"

    assert not holds({"field": "traits.missing", "op": op, "value": value}, traits={})


@pytest.mark.parametrize(("op", "value"), [("ne", "a"), ("not_in", ["a"]), ("not_contains", "a")])
def test_an_absent_field_differs_from_everything(op: str, value: Any) -> None:
    assert holds({"field": "traits.missing", "op": op, "value": value}, traits={})


def test_a_null_value_reads_as_absent() -> None:
    assert holds({"field": "traits.x", "op": "not_exists"}, traits={"x": None})
    assert not holds({"field": "traits.x", "op": "exists"}, traits={"x": None})


def test_a_missing_root_reads_as_absent() -> None:
    assert not holds({"field": "context.coupon.code", "op": "exists"}, traits={})


def test_list_elements_are_read_by_index() -> None:
    facts = Facts({"event": {"properties": {"products": [{"sku": "a"}, {"sku": "b"}]}}})

    assert facts.read("event.properties.products.1.sku") == (True, "b")
    assert facts.read("event.properties.products.2.sku") == (False, None)


# --- in, contains, exists -------------------------------------------------------------------


def test_in_checks_membership_with_typed_equality() -> None:
    assert holds({"field": "traits.x", "op": "in", "value": [1, 2]}, traits={"x": 2})
    assert not holds({"field": "traits.x", "op": "in", "value": [1, 2]}, traits={"x": True})
    assert holds({"field": "traits.x", "op": "not_in", "value": ["a"]}, traits={"x": "b"})


def test_contains_reads_lists_strings_and_mappings() -> None:
    assert holds({"field": "tags", "op": "contains", "value": "vip"}, tags=("vip", "new"))
    assert not holds({"field": "tags", "op": "contains", "value": "vi"}, tags=("vip",))
    assert holds(
        {"field": "traits.url", "op": "contains", "value": "/orbit"}, traits={"url": "a/orbit"}
    )
    assert holds({"field": "consent", "op": "contains", "value": "email"}, consent={"email": True})
    assert not holds({"field": "consent", "op": "contains", "value": "sms"}, consent={"sms": False})


def test_tag_and_segment_shorthands() -> None:
    assert holds({"tag": "newsletter"}, tags=("newsletter",))
    assert not holds({"tag": "newsletter"}, tags=())
    assert holds({"segment": "churn-risk"}, segments=("churn-risk",))


def test_all_any_not_combine() -> None:
    spec = {
        "all": [
            {
                "any": [
                    {"tag": "newsletter"},
                    {"field": "traits.language", "op": "eq", "value": "pl"},
                ]
            },
            {"not": {"tag": "unsubscribed"}},
        ]
    }

    assert holds(spec, tags=(), traits={"language": "pl"})
    assert holds(spec, tags=("newsletter",), traits={})
    assert not holds(spec, tags=("newsletter", "unsubscribed"), traits={})
    assert not holds(spec, tags=(), traits={"language": "de"})


def test_starts_with_reads_strings_only() -> None:
    spec = {"field": "event.properties.path", "op": "starts_with", "value": "/pricing"}

    assert holds(spec, event={"properties": {"path": "/pricing/teams"}})
    assert not holds(spec, event={"properties": {"path": 42}})


# --- time -----------------------------------------------------------------------------------


def test_before_with_ago_reads_more_than_that_long_ago() -> None:
    spec = {"field": "aggregates.last_order_at", "op": "before", "ago": "90d"}

    assert holds(spec, aggregates={"last_order_at": (NOW - timedelta(days=91)).isoformat()})
    assert not holds(spec, aggregates={"last_order_at": (NOW - timedelta(days=89)).isoformat()})
    assert not holds(spec, aggregates={"last_order_at": (NOW - timedelta(days=90)).isoformat()})
    assert not holds(spec, aggregates={})


def test_after_with_ago_reads_within_the_last_period() -> None:
    spec = {"field": "contact.last_seen", "op": "after", "ago": "7d"}

    assert holds(spec, contact={"last_seen": NOW - timedelta(days=6)})
    assert not holds(spec, contact={"last_seen": NOW - timedelta(days=8)})


def test_before_and_after_compare_with_a_fixed_instant() -> None:
    spec = {"field": "traits.signed_up", "op": "before", "value": "2026-01-01"}

    assert holds(spec, traits={"signed_up": "2025-12-31T23:00:00Z"})
    assert not holds(spec, traits={"signed_up": "2026-01-02"})
    assert not holds(spec, traits={"signed_up": "not a date"})


# --- value_from -----------------------------------------------------------------------------


def test_value_from_compares_with_the_instance_context() -> None:
    spec = {
        "field": "context.order.properties.coupon",
        "op": "eq",
        "value_from": "context.coupon.code",
    }
    coupon = {"coupon": {"code": "HELLO-ABC"}}

    assert holds(spec, context={**coupon, "order": {"properties": {"coupon": "HELLO-ABC"}}})
    assert not holds(spec, context={**coupon, "order": {"properties": {"coupon": "OTHER"}}})
    assert not holds(spec, context={**coupon, "order": {"properties": {}}})
    assert not holds(spec, context={"order": {"properties": {"coupon": "HELLO-ABC"}}})


def test_value_from_with_an_absent_right_side_only_differs() -> None:
    spec = {"field": "traits.a", "op": "ne", "value_from": "context.b"}

    assert holds(spec, traits={"a": 1}, context={})
    assert not holds(spec, traits={}, context={})


def test_value_from_orders_numbers_and_instants() -> None:
    bigger = {"field": "event.properties.revenue", "op": "gt", "value_from": "context.first"}
    later = {"field": "aggregates.last_order_at", "op": "after", "value_from": "context.entered_at"}

    assert holds(bigger, event={"properties": {"revenue": 120}}, context={"first": 110.5})
    assert holds(
        later,
        aggregates={"last_order_at": NOW.isoformat()},
        context={"entered_at": (NOW - timedelta(days=1)).isoformat()},
    )


# --- definitions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        {"field": "traits.x", "op": "eq"},
        {"field": "traits.x", "op": "eq", "value": 1, "value_from": "traits.y"},
        {"field": "traits.x", "op": "exists", "value": 1},
        {"field": "traits.x", "op": "gt", "ago": "7d"},
        {"field": "traits.x", "op": "before", "ago": "a week"},
        {"field": "traits.x", "op": "in", "value": "a"},
        {"field": "nowhere.x", "op": "exists"},
        {"field": "traits.x", "op": "like", "value": "a"},
    ],
)
def test_malformed_comparisons_are_refused(spec: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        condition_from(spec)


def test_a_false_or_zero_value_counts_as_given() -> None:
    assert holds({"field": "traits.x", "op": "eq", "value": False}, traits={"x": False})
    assert holds({"field": "traits.x", "op": "eq", "value": 0}, traits={"x": 0})


# --- next_change ----------------------------------------------------------------------------


def test_next_change_of_more_than_90_days_ago_is_when_it_becomes_true() -> None:
    condition = condition_from({"field": "aggregates.last_order_at", "op": "before", "ago": "90d"})
    last_order = NOW - timedelta(days=30)
    facts = Facts({"aggregates": {"last_order_at": last_order.isoformat()}})

    flips_at = next_change(condition, facts, NOW)

    assert flips_at is not None
    assert not evaluate(condition, facts, flips_at - timedelta(microseconds=1))
    assert evaluate(condition, facts, flips_at)
    assert flips_at - (last_order + timedelta(days=90)) < timedelta(milliseconds=1)


def test_next_change_of_within_7_days_is_when_it_becomes_false() -> None:
    condition = condition_from({"field": "contact.last_seen", "op": "after", "ago": "7d"})
    seen = NOW - timedelta(days=2)
    facts = Facts({"contact": {"last_seen": seen}})

    flips_at = next_change(condition, facts, NOW)

    assert flips_at == seen + timedelta(days=7)
    assert evaluate(condition, facts, flips_at - timedelta(microseconds=1))
    assert not evaluate(condition, facts, flips_at)


def test_next_change_is_the_earliest_of_several_and_ignores_past_flips() -> None:
    condition = condition_from(
        {
            "all": [
                {"field": "aggregates.a", "op": "after", "ago": "7d"},
                {"not": {"field": "aggregates.b", "op": "before", "ago": "1d"}},
                {"field": "aggregates.c", "op": "after", "ago": "1d"},
            ]
        }
    )
    facts = Facts(
        {
            "aggregates": {
                "a": NOW - timedelta(days=1),  # flips in 6 days
                "b": NOW - timedelta(hours=12),  # flips in 12 hours
                "c": NOW - timedelta(days=3),  # flipped 2 days ago
            }
        }
    )

    flips_at = next_change(condition, facts, NOW)

    assert flips_at is not None
    assert timedelta(hours=12) <= flips_at - NOW < timedelta(hours=12, seconds=1)


def test_next_change_without_relative_time_or_dates_is_none() -> None:
    fixed = condition_from({"field": "traits.plan", "op": "eq", "value": "pro"})
    relative = condition_from({"field": "aggregates.last_order_at", "op": "before", "ago": "90d"})

    assert next_change(fixed, Facts({"traits": {"plan": "pro"}}), NOW) is None
    assert next_change(relative, Facts({"aggregates": {}}), NOW) is None
    assert next_change(relative, Facts({"aggregates": {"last_order_at": "soon"}}), NOW) is None


# --- reads and facts ------------------------------------------------------------------------


def test_reads_lists_every_field_including_value_from_and_shorthands() -> None:
    condition = condition_from(
        {
            "all": [
                {"tag": "vip"},
                {"any": [{"segment": "s"}, {"field": "traits.a", "op": "exists"}]},
                {
                    "not": {
                        "field": "event.properties.coupon",
                        "op": "eq",
                        "value_from": "context.coupon.code",
                    }
                },
            ]
        }
    )

    assert list(reads(condition)) == [
        "tags",
        "segments",
        "traits.a",
        "event.properties.coupon",
        "context.coupon.code",
    ]


def test_facts_of_a_profile_event_and_context() -> None:
    event = Event(
        type="track",
        event="Order Completed",
        user_id="ada",
        message_id="m-1",
        timestamp=NOW,
        received_at=NOW,
        properties={"revenue": 120},
    )
    facts = facts_of(
        profile(traits={"plan": "pro"}, tags=("vip",), event_counts={"Order Completed": 2}),
        event=event,
        context={"coupon": {"code": "C"}},
    )

    assert facts.read("traits.plan") == (True, "pro")
    assert facts.read("event.name") == (True, "Order Completed")
    assert facts.read("event.properties.revenue") == (True, 120)
    assert facts.read("context.coupon.code") == (True, "C")
    assert facts.read("contact.key") == (True, "ada")
    assert event_facts(event)["timestamp"] == NOW.isoformat()
    assert evaluate(condition_from({"tag": "vip"}), facts, NOW)
