"""A segment's estimate (the conditions evaluated as the segmenter evaluates them on a sample,
scaled to every stored profile) and the geometry of its count-over-time chart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.admin.domain.segment_insight import (
    PAD_LEFT,
    PAD_TOP,
    count_chart,
    estimate,
    matches,
    nice_ceiling,
)
from shared.conditions import condition_from
from shared.contracts import Profile
from shared.segments import SegmentDefinition

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def profile(key: str, plan: str, segments: tuple[str, ...] = ()) -> Profile:
    return Profile(
        contact_key=key,
        traits={"plan": plan},
        segments=segments,
        first_seen=NOW,
        last_seen=NOW,
        updated_at=NOW,
    )


def test_every_profile_read_gives_the_exact_count() -> None:
    found = estimate(7, 40, 40)

    assert (found.members, found.low, found.high, found.exact) == (7, 7, 7, True)


def test_a_sample_is_scaled_to_the_total_with_a_range_around_it() -> None:
    found = estimate(100, 1000, 50_000)

    assert found.members == 5000
    assert not found.exact
    assert found.low < 5000 < found.high
    # 95%: 1.96 * sqrt(.1 * .9 / 1000) * 50,000 is about 930, a little less for the finite store.
    assert 4050 < found.low < 4100
    assert 5900 < found.high < 5950


def test_the_range_never_leaves_what_the_sample_proves() -> None:
    none = estimate(0, 10, 1000)
    every = estimate(10, 10, 12)

    assert (none.members, none.low) == (0, 0)
    assert none.high <= 1000 - 10
    assert every.low >= 10
    assert every.high <= 12


def test_no_stored_profile_estimates_nobody() -> None:
    found = estimate(0, 0, 0)

    assert (found.members, found.low, found.high) == (0, 0, 0)


def test_matched_cannot_exceed_the_sample() -> None:
    with pytest.raises(ValueError, match="matched"):
        estimate(11, 10, 100)


def test_conditions_are_evaluated_as_the_segmenter_does_in_order() -> None:
    pro = SegmentDefinition(
        id="pro", condition=condition_from({"field": "traits.plan", "op": "eq", "value": "pro"})
    )
    pro_and_old = SegmentDefinition(
        id="pro-old",
        condition=condition_from({"all": [{"segment": "pro"}, {"segment": "old"}]}),
    )
    people = [
        profile("a", "pro", ("old",)),
        profile("b", "pro"),
        profile("c", "free", ("old", "pro")),  # a stale published membership of "pro"
    ]

    assert matches([pro, pro_and_old], people, NOW) == {"pro": 2, "pro-old": 1}


def test_the_chart_spans_the_readings_and_counts_from_zero_to_a_round_top() -> None:
    readings = [(NOW + timedelta(hours=h), n) for h, n in ((0, 0), (1, 30), (2, 42))]

    chart = count_chart(readings, width=640, height=200)

    xs = [x for x, _, _ in chart.dots]
    ys = [y for _, y, _ in chart.dots]
    assert xs == [PAD_LEFT, PAD_LEFT + (640 - 48 - 12) / 2, 640 - 12]
    assert ys[0] == 200 - 28  # zero sits on the bottom of the plot
    assert [value for _, value in chart.y_ticks] == [0, 25, 50]
    assert ys[2] == pytest.approx(PAD_TOP + (1 - 42 / 50) * (200 - 12 - 28), abs=0.1)
    assert chart.points.split() == [f"{x},{y}" for x, y in zip(xs, ys, strict=True)]
    assert chart.dots[1][2] == "30 at 2026-12-01 10:00 UTC"
    assert [label for _, label in chart.x_labels] == ["12-01 09:00", "12-01 11:00"]


def test_one_reading_sits_in_the_middle_and_none_draws_nothing() -> None:
    one = count_chart([(NOW, 3)])
    minutes = count_chart([(NOW, 1), (NOW + timedelta(seconds=90), 2)])
    empty = count_chart([])

    assert one.dots[0][0] == PAD_LEFT + (640 - 48 - 12) / 2
    assert [label for _, label in minutes.x_labels] == ["09:00:00", "09:01:30"]
    assert empty.empty
    assert empty.points == ""


@pytest.mark.parametrize(
    ("value", "top"), [(0, 2), (2, 2), (3, 5), (7, 10), (10, 10), (11, 20), (420, 500)]
)
def test_the_axis_ends_on_a_round_count(value: int, top: int) -> None:
    assert nice_ceiling(value) == top
