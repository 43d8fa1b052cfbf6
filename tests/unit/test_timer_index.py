"""The orchestrator's in-memory timer index: a min-heap of due times, de-duplicated by timer id."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from services.orchestrator.adapters.timers import DueTimer, TimerIndex

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)


def timer(timer_id: str, minutes: int) -> DueTimer:
    return DueTimer(
        due_at=T0 + timedelta(minutes=minutes),
        timer_id=timer_id,
        contact_key=f"contact-{timer_id}",
        instance_id=f"instance-{timer_id}",
    )


def index_of(*timers: DueTimer) -> TimerIndex:
    index = TimerIndex()
    for each in timers:
        index.add(each)
    return index


def test_pop_due_returns_due_timers_earliest_first() -> None:
    index = index_of(timer("c", 30), timer("a", 10), timer("b", 20))

    due = index.pop_due(T0 + timedelta(hours=1))

    assert [t.timer_id for t in due] == ["a", "b", "c"]
    assert len(index) == 0


def test_pop_due_leaves_timers_that_are_not_due_yet() -> None:
    index = index_of(timer("soon", 5), timer("later", 60))

    due = index.pop_due(T0 + timedelta(minutes=30))

    assert [t.timer_id for t in due] == ["soon"]
    assert len(index) == 1
    assert [t.timer_id for t in index.pop_due(T0 + timedelta(minutes=60))] == ["later"]


def test_a_timer_due_exactly_now_is_due() -> None:
    index = index_of(timer("a", 10))

    assert [t.timer_id for t in index.pop_due(T0 + timedelta(minutes=10))] == ["a"]


def test_nothing_is_due_in_an_empty_index() -> None:
    assert TimerIndex().pop_due(T0) == []


def test_adding_the_same_timer_id_twice_keeps_one() -> None:
    index = index_of(timer("a", 10), timer("a", 10))

    assert len(index) == 1
    assert len(index.pop_due(T0 + timedelta(hours=1))) == 1


def test_the_first_due_time_wins_for_a_repeated_timer_id() -> None:
    index = index_of(timer("a", 10), timer("a", 99))

    (due,) = index.pop_due(T0 + timedelta(hours=2))

    assert due.due_at == T0 + timedelta(minutes=10)


def test_a_popped_timer_id_can_be_added_again() -> None:
    index = index_of(timer("a", 10))
    index.pop_due(T0 + timedelta(hours=1))

    index.add(timer("a", 10))

    assert len(index) == 1


def test_pop_due_returns_at_most_limit_timers() -> None:
    index = index_of(*(timer(f"t{n}", n) for n in range(5)))

    first = index.pop_due(T0 + timedelta(hours=1), limit=2)
    rest = index.pop_due(T0 + timedelta(hours=1), limit=2)

    assert [t.timer_id for t in first] == ["t0", "t1"]
    assert [t.timer_id for t in rest] == ["t2", "t3"]
    assert len(index) == 1


def test_clear_empties_the_index() -> None:
    index = index_of(timer("a", 1), timer("b", 2))

    index.clear()

    assert len(index) == 0
    assert index.pop_due(T0 + timedelta(days=1)) == []


@given(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(0, 1000)), max_size=50))
def test_popping_everything_gives_each_timer_id_once_in_due_order(
    additions: list[tuple[str, int]],
) -> None:
    index = index_of(*(timer(timer_id, minutes) for timer_id, minutes in additions))

    due = index.pop_due(T0 + timedelta(days=1))

    assert sorted({timer_id for timer_id, _ in additions}) == sorted(t.timer_id for t in due)
    assert [t.due_at for t in due] == sorted(t.due_at for t in due)
    assert len(index) == 0
