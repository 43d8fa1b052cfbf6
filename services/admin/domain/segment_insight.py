"""A segment before and after publishing (pure): its estimated count from a sample of stored
profiles, scaled to them all, and the chart of its count over time."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from shared.conditions import compile_condition, facts_of
from shared.contracts import Profile
from shared.segments import SegmentDefinition

# A 95% interval around an estimate.
Z95 = 1.96


@dataclass(frozen=True)
class Estimate:
    """How many of `total` profiles the condition would hold for, judged on `sampled` of them:
    `members` with a 95% interval `low`..`high` (exact when every profile was read)."""

    matched: int
    sampled: int
    total: int
    members: int
    low: int
    high: int

    @property
    def exact(self) -> bool:
        return self.sampled >= self.total

    def as_dict(self) -> dict[str, int | bool]:
        return {
            "members": self.members,
            "low": self.low,
            "high": self.high,
            "matched": self.matched,
            "sampled": self.sampled,
            "total": self.total,
            "exact": self.exact,
        }


def estimate(matched: int, sampled: int, total: int) -> Estimate:
    """Scale `matched` of `sampled` profiles to `total`, with a normal-approximation interval
    corrected for sampling without replacement from a finite store."""
    if not 0 <= matched <= sampled:
        raise ValueError("matched must be between 0 and sampled")
    total = max(total, sampled)
    if sampled == 0:
        return Estimate(0, 0, total, 0, 0, total)
    share = matched / sampled
    members = round(share * total)
    if sampled >= total:
        return Estimate(matched, sampled, total, matched, matched, matched)
    correction = math.sqrt((total - sampled) / (total - 1)) if total > 1 else 0.0
    margin = Z95 * math.sqrt(share * (1 - share) / sampled) * correction * total
    # Never fewer than the members seen, never more than could be there.
    low = max(matched, math.floor(members - margin))
    high = min(total - (sampled - matched), math.ceil(members + margin))
    return Estimate(matched, sampled, total, members, low, max(low, high))


def matches(
    segments: Sequence[SegmentDefinition], profiles: Sequence[Profile], now: datetime
) -> dict[str, int]:
    """How many of `profiles` each segment's condition holds for, evaluated as the segmenter
    does (`compile_condition`): in order, a segment reading another of the same set sees the
    membership just worked out, and published ones as the profile holds them."""
    checks = [(s.id, compile_condition(s.condition)) for s in segments]
    ours = {s.id for s in segments}
    counts = dict.fromkeys(ours, 0)
    for profile in profiles:
        member = [s for s in profile.segments if s not in ours]
        facts = facts_of(profile, segments=member)  # reads `member` as it grows
        for segment_id, holds in checks:
            if holds(facts, now):
                member.append(segment_id)
                counts[segment_id] += 1
    return counts


@dataclass(frozen=True)
class Chart:
    """A line chart in SVG user units: the polyline's points, the axes' labels and where."""

    width: int
    height: int
    points: str  # "x,y x,y …" for <polyline points=…>
    dots: tuple[tuple[float, float, str], ...]  # x, y and a title per reading
    y_ticks: tuple[tuple[float, int], ...]  # y and the count it marks
    x_labels: tuple[tuple[float, str], ...]  # x and the time it marks
    empty: bool


PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 48, 12, 12, 28


def count_chart(
    readings: Sequence[tuple[datetime, int]], width: int = 640, height: int = 200
) -> Chart:
    """The chart of a segment's count over time: time runs left to right over the readings'
    span, counts bottom to top from 0 to a round figure at or above the highest."""
    ordered = sorted(readings)
    if not ordered:
        return Chart(width, height, "", (), (), (), True)
    first, last = ordered[0][0], ordered[-1][0]
    span = (last - first).total_seconds() or 1.0
    top = nice_ceiling(max(count for _, count in ordered))
    plot_w = width - PAD_LEFT - PAD_RIGHT
    plot_h = height - PAD_TOP - PAD_BOTTOM

    def x_of(at: datetime) -> float:
        offset = (at - first).total_seconds() / span if len(ordered) > 1 else 0.5
        return round(PAD_LEFT + offset * plot_w, 1)

    def y_of(count: int) -> float:
        return round(PAD_TOP + plot_h - count / top * plot_h, 1)

    dots = tuple((x_of(at), y_of(n), f"{n} at {at:%Y-%m-%d %H:%M} UTC") for at, n in ordered)
    ticks = tuple((y_of(value), value) for value in (0, top // 2, top))
    shape = "%m-%d %H:%M" if span >= 3600 else "%H:%M:%S"  # a short span shows seconds
    labels: tuple[tuple[float, str], ...] = ((x_of(first), first.strftime(shape)),)
    if len(ordered) > 1:
        labels += ((x_of(last), last.strftime(shape)),)
    return Chart(
        width,
        height,
        " ".join(f"{x},{y}" for x, y, _ in dots),
        dots,
        ticks,
        labels,
        False,
    )


def nice_ceiling(value: int) -> int:
    """The smallest of 2, 5, 10, 20, 50, 100, … at or above `value`: an axis that ends on a
    round count."""
    if value <= 2:
        return 2
    power: int = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power  # pragma: no cover - the loop always returns
