"""Offsets commit only behind finished work, whatever order records finish in."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shared.offsets import OffsetTracker


def test_a_slow_record_holds_the_commit_behind_it() -> None:
    tracker = OffsetTracker()
    for offset in (10, 11, 12):
        tracker.started("t", 0, offset)
    tracker.finished("t", 0, 11)
    tracker.finished("t", 0, 12)
    assert tracker.committable() == {("t", 0): 10}
    tracker.mark_committed({("t", 0): 10})
    assert tracker.committable() == {}
    tracker.finished("t", 0, 10)
    assert tracker.committable() == {("t", 0): 13}


def test_partitions_are_independent() -> None:
    tracker = OffsetTracker()
    tracker.started("t", 0, 5)
    tracker.started("t", 1, 7)
    tracker.finished("t", 1, 7)
    assert tracker.committable() == {("t", 0): 5, ("t", 1): 8}
    assert tracker.in_flight() == 1


@given(st.permutations(list(range(30))), st.integers(min_value=0, max_value=30))
def test_the_committed_offset_never_passes_an_unfinished_record(
    order: list[int], done: int
) -> None:
    tracker = OffsetTracker()
    for offset in range(30):
        tracker.started("t", 0, offset)
    finished = order[:done]
    for offset in finished:
        tracker.finished("t", 0, offset)
    position = tracker.committable().get(("t", 0), 0)
    unfinished = set(range(30)) - set(finished)
    assert position == (min(unfinished) if unfinished else 30)
