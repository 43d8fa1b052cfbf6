"""The orchestrator's durable timers: table rows plus an in-memory due index (a dict stands in
for the worker's table, which is a mutable mapping of bytes to bytes too)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from services.orchestrator.adapters.timers import (
    TimerStore,
    epoch_ms,
    from_epoch_ms,
    timer_fired,
    timer_key,
    timer_value,
)
from shared.journey_engine.state import CancelTimer, ScheduleTimer

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
LATER = timedelta(days=3650)  # a refire delay that never comes due within a test


class CountingTable(dict[bytes, bytes]):
    """A dict that counts writes and deletes, to see what a command costs the table."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.deletes = 0

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.writes += 1
        super().__setitem__(key, value)

    def __delitem__(self, key: bytes) -> None:
        self.deletes += 1
        super().__delitem__(key)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def schedule(instance: str, minutes: float, timer_id: str | None = None) -> ScheduleTimer:
    return ScheduleTimer(f"contact-{instance}", instance, timer_id or f"t-{instance}", at(minutes))


def cancel(instance: str) -> CancelTimer:
    return CancelTimer(f"contact-{instance}", instance)


def store_of(
    *commands: ScheduleTimer | CancelTimer,
    refire_after: timedelta = LATER,
    refire_max: timedelta = LATER,
    compact_floor: int = 1024,
) -> TimerStore:
    """A store over a fresh table; fired timers are not re-sent unless `refire_*` say so."""
    store = TimerStore(
        {}, refire_after=refire_after, refire_max=refire_max, compact_floor=compact_floor
    )
    for command in commands:
        store.apply(command)
    return store


def fired_ids(store: TimerStore, minutes: float, limit: int = 1000) -> list[str]:
    return [t.timer_id for t in store.pop_due(at(minutes), limit)]


# -- the row format --------------------------------------------------------------------------


def test_a_row_is_contact_nul_instance_and_due_millis_then_timer_id() -> None:
    assert timer_key("ann@example.com", "i1") == b"ann@example.com\x00i1"
    assert timer_value(1_700_000_000_000, "t1") == (1_700_000_000_000).to_bytes(8, "big") + b"t1"


def test_a_fired_record_reads_contact_instance_timer_and_due_back_from_the_row() -> None:
    contact = "odd\x00key ü"  # a NUL in a contact key still splits right: instance ids are hex
    value = timer_value(epoch_ms(at(5)), "t9")

    fired = timer_fired(timer_key(contact, "abc123"), value, at(6))

    assert (fired.contact_key, fired.instance_id, fired.timer_id) == (contact, "abc123", "t9")
    assert (fired.due_at, fired.fired_at) == (at(5), at(6))


def test_due_times_round_up_to_the_millisecond_so_nothing_fires_early() -> None:
    when = T0 + timedelta(microseconds=1500)

    assert from_epoch_ms(epoch_ms(when)) == T0 + timedelta(milliseconds=2)
    assert from_epoch_ms(epoch_ms(T0)) == T0


# -- ordering and firing ---------------------------------------------------------------------


def test_due_timers_fire_earliest_first() -> None:
    store = store_of(schedule("c", 30), schedule("a", 10), schedule("b", 20))

    assert fired_ids(store, 60) == ["t-a", "t-b", "t-c"]


def test_timers_not_due_yet_stay() -> None:
    store = store_of(schedule("soon", 5), schedule("later", 60))

    assert fired_ids(store, 30) == ["t-soon"]
    assert fired_ids(store, 59) == []
    assert fired_ids(store, 60) == ["t-later"]


def test_a_timer_due_exactly_now_fires() -> None:
    assert fired_ids(store_of(schedule("a", 10)), 10) == ["t-a"]


def test_nothing_fires_from_an_empty_store() -> None:
    assert TimerStore({}).pop_due(T0) == []


def test_the_fired_record_carries_the_instance_and_due_time() -> None:
    store = store_of(schedule("a", 10))

    (fired,) = store.pop_due(at(11))

    assert (fired.contact_key, fired.instance_id, fired.timer_id) == ("contact-a", "a", "t-a")
    assert (fired.due_at, fired.fired_at) == (at(10), at(11))


def test_pop_due_returns_at_most_limit_timers_per_round() -> None:
    store = store_of(*(schedule(f"i{n}", n) for n in range(5)))

    assert fired_ids(store, 60, limit=2) == ["t-i0", "t-i1"]
    assert fired_ids(store, 60, limit=2) == ["t-i2", "t-i3"]
    assert fired_ids(store, 60, limit=2) == ["t-i4"]
    assert fired_ids(store, 60, limit=2) == []


# -- one row per instance: schedule, restart, cancel -------------------------------------------


def test_scheduling_writes_one_row_per_instance() -> None:
    table = CountingTable()
    store = TimerStore(table)

    store.apply(schedule("a", 10))
    store.apply(schedule("b", 20))

    assert table == {
        timer_key("contact-a", "a"): timer_value(epoch_ms(at(10)), "t-a"),
        timer_key("contact-b", "b"): timer_value(epoch_ms(at(20)), "t-b"),
    }
    assert len(store) == 2


def test_a_replayed_schedule_writes_nothing_and_indexes_nothing() -> None:
    table = CountingTable()
    store = TimerStore(table)

    store.apply(schedule("a", 10))
    store.apply(schedule("a", 10))

    assert (table.writes, store.indexed, len(store)) == (1, 1, 1)


def test_a_restart_to_a_later_time_overwrites_the_row_and_adds_no_index_entry() -> None:
    table = CountingTable()
    store = TimerStore(table, refire_after=LATER, refire_max=LATER)
    for n in range(100):  # S12: every page view pushes the wait out again
        store.apply(schedule("a", 10 + n, timer_id=f"t{n}"))

    assert (len(table), table.writes, store.indexed) == (1, 100, 1)
    assert fired_ids(store, 50) == []  # the old entry popped and moved to the new due time
    assert store.indexed == 1
    assert fired_ids(store, 109) == ["t99"]


def test_a_restart_to_an_earlier_time_fires_once_at_the_earlier_time() -> None:
    store = store_of(schedule("a", 60, "late"), schedule("a", 10, "early"))

    assert fired_ids(store, 10) == ["early"]
    store.apply(cancel("a"))  # the engine answers
    assert fired_ids(store, 60) == []


def test_a_new_timer_id_at_the_same_due_time_fires_with_the_new_id() -> None:
    store = store_of(schedule("a", 10, "first"), schedule("a", 10, "second"))

    assert store.indexed == 1
    assert fired_ids(store, 10) == ["second"]


def test_a_cancelled_timer_does_not_fire_and_its_row_is_deleted() -> None:
    table = CountingTable()
    store = TimerStore(table)
    store.apply(schedule("a", 10))

    store.apply(cancel("a"))

    assert (table, len(store)) == ({}, 0)
    assert fired_ids(store, 60) == []
    assert store.indexed == 0  # the superseded entry was dropped when it reached the top


def test_cancelling_an_instance_without_a_timer_is_a_no_op() -> None:
    table = CountingTable()
    store = TimerStore(table)

    store.apply(cancel("never-scheduled"))

    assert (table.deletes, len(store)) == (0, 0)


def test_a_cancel_then_a_new_schedule_fires_only_the_new_timer() -> None:
    store = store_of(schedule("a", 10, "old"), cancel("a"), schedule("a", 20, "new"))

    assert fired_ids(store, 15) == []
    assert fired_ids(store, 20) == ["new"]


# -- at-least-once firing: re-arm until the engine answers -------------------------------------


def test_a_fired_timer_keeps_its_row_and_is_not_sent_again_every_tick() -> None:
    table = CountingTable()
    store = TimerStore(table, refire_after=timedelta(seconds=30))
    store.apply(schedule("a", 10))

    assert fired_ids(store, 10) == ["t-a"]
    assert fired_ids(store, 10.1) == []
    assert fired_ids(store, 10.49) == []
    assert (len(table), len(store)) == (1, 1)


def test_an_unanswered_timer_fires_again_with_doubling_delays_up_to_the_cap() -> None:
    store = store_of(
        schedule("a", 0),
        refire_after=timedelta(seconds=30),
        refire_max=timedelta(minutes=2),
    )
    assert fired_ids(store, 0) == ["t-a"]
    fired_at = [0.0]
    clock = 0.0
    while len(fired_at) < 6:
        clock += 0.25
        if fired_ids(store, clock):
            fired_at.append(clock)

    assert [b - a for a, b in pairwise(fired_at)] == [0.5, 1, 2, 2, 2]


def test_an_answered_timer_does_not_fire_again() -> None:
    store = store_of(schedule("a", 10))
    fired_ids(store, 10)

    store.apply(cancel("a"))

    assert fired_ids(store, 100) == []
    assert len(store) == 0  # its far re-arm entry is superseded and waits for compaction


def test_after_firing_the_next_wait_fires_at_its_own_time_even_before_the_refire() -> None:
    store = store_of(
        schedule("a", 10, "first"), refire_after=timedelta(minutes=5), refire_max=LATER
    )
    assert fired_ids(store, 10) == ["first"]

    store.apply(schedule("a", 11, "second"))  # the engine moved on to a 1-minute wait

    assert fired_ids(store, 11) == ["second"]
    assert fired_ids(store, 15.5) == []  # the first timer's re-arm entry (at 15) is superseded
    assert fired_ids(store, 16) == ["second"]  # the second one's own re-arm


def test_a_fired_timer_whose_row_disappeared_is_forgotten() -> None:
    table: dict[bytes, bytes] = {}
    store = TimerStore(table)
    store.apply(schedule("a", 10))
    fired_ids(store, 10)

    table.clear()  # its partition moved to another worker

    assert fired_ids(store, 100) == []
    assert store.indexed == 0


# -- recovery and compaction ------------------------------------------------------------------


def test_rebuild_indexes_every_row_of_the_table() -> None:
    table = {
        timer_key(f"c{n}", f"i{n}"): timer_value(epoch_ms(at(30 - n)), f"t{n}") for n in range(5)
    }
    store = TimerStore(table)

    assert store.rebuild() == 5
    assert len(store) == 5
    assert fired_ids(store, 60) == ["t4", "t3", "t2", "t1", "t0"]


def test_rebuild_keeps_the_refire_time_of_unanswered_timers() -> None:
    store = store_of(
        schedule("a", 10), schedule("b", 50), refire_after=timedelta(minutes=5), refire_max=LATER
    )
    fired_ids(store, 10)

    store.rebuild()

    assert fired_ids(store, 14) == []
    assert fired_ids(store, 15) == ["t-a"]


def test_superseded_entries_are_compacted_once_they_outnumber_the_live_timers() -> None:
    store = store_of(compact_floor=10)
    for n in range(20):
        store.apply(schedule(f"keep{n}", 1000))
    for n in range(40):
        store.apply(schedule(f"gone{n}", 900))
        store.apply(cancel(f"gone{n}"))
    assert (len(store), store.indexed) == (20, 60)
    assert store.needs_compaction

    store.compact_if_needed()

    assert (len(store), store.indexed) == (20, 20)
    assert sorted(fired_ids(store, 1000)) == sorted(f"t-keep{n}" for n in range(20))


def test_restarts_to_earlier_times_cannot_grow_the_index_past_twice_the_live_timers() -> None:
    store = store_of(compact_floor=10)
    for n in range(10):
        store.apply(schedule(f"i{n}", 10_000))
    for minutes in range(9_999, 9_000, -1):
        for n in range(10):
            store.apply(schedule(f"i{n}", minutes, timer_id=f"t{minutes}"))
        store.compact_if_needed()
        assert store.indexed <= 2 * len(store) + 10

    assert fired_ids(store, 9_001) == ["t9001"] * 10


def test_index_bytes_grow_with_the_number_of_timers() -> None:
    small = store_of(*(schedule(f"i{n}", n) for n in range(10)))
    large = store_of(*(schedule(f"i{n}", n) for n in range(1000)))

    per_timer = (large.index_bytes() - small.index_bytes()) / 990

    assert 40 < per_timer < 120  # one bytes object (due + key) and a list slot per timer


# -- the store against a model ----------------------------------------------------------------

INSTANCES = [f"i{n}" for n in range(4)]
operations = st.lists(
    st.one_of(
        st.tuples(st.just("schedule"), st.sampled_from(INSTANCES), st.integers(0, 120)),
        st.tuples(st.just("cancel"), st.sampled_from(INSTANCES), st.just(0)),
        st.tuples(st.just("advance"), st.just(""), st.integers(0, 40)),
        st.tuples(st.just("rebuild"), st.just(""), st.just(0)),
        st.tuples(st.just("compact"), st.just(""), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(operations)
def test_each_scheduled_timer_fires_once_at_its_latest_due_time(
    ops: list[tuple[str, str, int]],
) -> None:
    """Unanswered timers fire exactly once (no refire within the test), in due order."""
    table: dict[bytes, bytes] = {}
    store = TimerStore(table, refire_after=LATER, refire_max=LATER, compact_floor=2)
    model: dict[str, tuple[int, str]] = {}  # instance -> (due minute, timer id), not yet fired
    now = 0
    for step, (op, instance, number) in enumerate(ops):
        if op == "schedule":
            timer_id = f"t{step}"
            store.apply(schedule(instance, number, timer_id))
            model[instance] = (number, timer_id)
        elif op == "cancel":
            store.apply(cancel(instance))
            model.pop(instance, None)
        elif op == "rebuild":
            store.rebuild()
        elif op == "compact":
            store.compact_if_needed()
        else:
            now += number
            fired = store.pop_due(at(now))
            expected = {i: v for i, v in model.items() if v[0] <= now}
            assert {t.instance_id: (t.due_at, t.timer_id) for t in fired} == {
                i: (at(due), timer_id) for i, (due, timer_id) in expected.items()
            }
            assert len(fired) == len(expected)
            assert [t.due_at for t in fired] == sorted(t.due_at for t in fired)
            for instance_id in expected:
                del model[instance_id]  # fired and unanswered: stays in the table, not re-sent
        assert store.indexed <= 2 * max(len(store), 2) + 2 * len(ops)
    assert len(table) == len(store)
