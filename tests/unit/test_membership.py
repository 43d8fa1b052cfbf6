"""A group member stuck outside its group joins again; an outage is waited out, not acted on."""

from __future__ import annotations

import json

from confluent_kafka import Consumer, TopicPartition
from structlog.testing import capture_logs

from shared.membership import (
    GroupState,
    Membership,
    MembershipWatch,
    Progress,
    StallWatch,
    group_state,
)

STEADY = GroupState("up", "steady", broker_up=True)
JOINING = GroupState("up", "wait-join", broker_up=True)
NO_COORDINATOR = GroupState("query-coord", "init", broker_up=True)
OUTAGE = GroupState("query-coord", "init", broker_up=False)


def feed(watch: MembershipWatch, reports: list[tuple[float, GroupState | None]]) -> list[bool]:
    return [watch.observe(at, state) for at, state in reports]


def test_a_member_unsettled_with_a_broker_up_for_long_enough_is_lost() -> None:
    watch = MembershipWatch(stuck_seconds=90)
    reports = [(t, JOINING) for t in range(0, 100, 10)]
    assert feed(watch, reports) == [False] * 9 + [True]


def test_an_unsettled_coordinator_counts_like_an_unsettled_join() -> None:
    watch = MembershipWatch(stuck_seconds=20)
    assert feed(watch, [(0, NO_COORDINATOR), (10, NO_COORDINATOR), (20, JOINING)]) == [
        False,
        False,
        True,
    ]


def test_settling_starts_the_count_again() -> None:
    watch = MembershipWatch(stuck_seconds=20)
    reports = [(0, JOINING), (15, JOINING), (16, STEADY), (30, JOINING), (45, JOINING)]
    assert feed(watch, reports) == [False] * 5  # 15 s, then settled, then 15 s
    assert watch.observe(50, JOINING) is True  # 20 s unsettled since it last settled


def test_a_gap_between_reports_that_began_settled_does_not_count() -> None:
    """A worker restoring tables does not poll, so no report comes: a rebalance found after
    the restore counts from then, not from the last report before it."""
    watch = MembershipWatch(stuck_seconds=20)
    assert feed(watch, [(0, STEADY), (300, JOINING), (315, JOINING)]) == [False] * 3
    assert watch.observe(320, JOINING) is True


def test_time_without_a_broker_does_not_count() -> None:
    watch = MembershipWatch(stuck_seconds=20)
    reports = [(0, JOINING), (10, JOINING), (20, OUTAGE), (500, OUTAGE), (505, JOINING)]
    # 10 s before the outage, none during it, and the count goes on after it.
    assert feed(watch, reports) == [False] * 5
    assert watch.observe(515, JOINING) is True  # 20 s unsettled with a broker up


def test_a_member_holding_nothing_but_steady_is_well() -> None:
    """More members than partitions: steady with an empty assignment is a healthy member."""
    watch = MembershipWatch(stuck_seconds=10)
    assert feed(watch, [(t, STEADY) for t in range(0, 100, 5)]) == [False] * 20


def stats(
    state: str, join_state: str, brokers: dict[str, dict[str, object]], assigned: int = 0
) -> str:
    group = {"state": state, "join_state": join_state, "assignment_size": assigned}
    return json.dumps({"cgrp": group, "brokers": brokers})


def test_the_state_is_read_from_librdkafka_statistics() -> None:
    up = {"127.0.0.1:9092/1": {"state": "UP", "nodeid": 1}}
    bootstrap_only = {
        "127.0.0.1:9092/bootstrap": {"state": "UP", "nodeid": -1},
        "127.0.0.1:9092/1": {"state": "DOWN", "nodeid": 1},
    }
    assert group_state(stats("up", "steady", up)) == STEADY
    assert group_state(stats("up", "wait-join", bootstrap_only)) == GroupState(
        "up", "wait-join", broker_up=False
    )
    assert group_state(json.dumps({"brokers": up})) is None  # a consumer without a group


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_membership_says_lost_once_then_starts_afresh() -> None:
    clock = Clock()
    membership = Membership("waypost-segmenter", stuck_seconds=20, clock=clock)
    joining = stats("up", "wait-join", {"b/1": {"state": "UP", "nodeid": 1}})
    for at in (0, 10):
        clock.now = at
        membership.report(joining)
    assert membership.lost() is False
    clock.now = 20
    membership.report(joining)
    assert membership.lost() is True
    assert membership.lost() is False  # asked once
    clock.now = 30
    membership.report(joining)  # a new count begins with the new consumer
    assert membership.lost() is False


def test_each_change_of_the_membership_is_logged_once() -> None:
    up = {"b/1": {"state": "UP", "nodeid": 1}}
    membership = Membership("waypost-orchestrator", stuck_seconds=90, clock=Clock())
    with capture_logs() as logs:
        membership.report(stats("up", "steady", up, assigned=3))
        membership.report(stats("up", "steady", up, assigned=3))
        membership.report(stats("up", "wait-join", up))
        membership.report(stats("up", "steady", up, assigned=0))
    changes = [
        (entry["join_state"], entry["assigned"])
        for entry in logs
        if entry["event"] == "kafka.group_state"
    ]
    assert changes == [("steady", 3), ("wait-join", 0), ("steady", 0)]


def test_an_unreadable_report_is_logged_and_ignored() -> None:
    membership = Membership("g", stuck_seconds=0)
    membership.report("not json")
    assert membership.lost() is False
    assert membership.config()["statistics.interval.ms"] == 5_000


# --- fetching that stopped -------------------------------------------------------------------

A, B = ("waypost.events.v1", 0), ("waypost.events.v1", 1)


def test_a_partition_behind_an_unmoving_position_for_long_enough_has_stalled() -> None:
    watch = StallWatch(stall_seconds=60, max_gap=35)
    assert watch.observe(0, {A: (10, 20)}) == []
    assert watch.observe(15, {A: (10, 20)}) == []
    assert watch.observe(30, {A: (10, 25)}) == []
    assert watch.observe(45, {A: (10, 25)}) == []
    assert watch.observe(60, {A: (10, 25)}) == [A]


def test_a_position_that_moves_or_reaches_the_end_starts_the_count_again() -> None:
    watch = StallWatch(stall_seconds=30, max_gap=35)
    watch.observe(0, {A: (10, 20), B: (5, 9)})
    watch.observe(20, {A: (11, 20), B: (9, 9)})  # A moved; B caught up
    assert watch.observe(40, {A: (11, 20), B: (9, 12)}) == []
    assert watch.observe(70, {A: (11, 20), B: (9, 12)}) == [A, B]


def test_a_long_gap_between_checks_is_not_counted() -> None:
    """The owner was busy (or the broker away) between two checks: the time does not count."""
    watch = StallWatch(stall_seconds=60, max_gap=35)
    watch.observe(0, {A: (10, 20)})
    assert watch.observe(120, {A: (10, 20)}) == []
    assert watch.observe(150, {A: (10, 20)}) == []
    assert watch.observe(180, {A: (10, 20)}) == [A]


def test_a_reset_forgets_what_was_counted() -> None:
    watch = StallWatch(stall_seconds=30, max_gap=35)
    watch.observe(0, {A: (10, 20)})
    watch.observe(20, {A: (10, 20)})
    watch.reset()
    assert watch.observe(40, {A: (10, 20)}) == []
    assert watch.observe(60, {A: (10, 20)}) == []
    assert watch.observe(75, {A: (10, 20)}) == [A]


def test_progress_without_a_broker_never_calls_a_consumer_stalled() -> None:
    """End offsets cannot be asked: an outage is waited out, never acted on."""
    now = [0.0]
    progress = Progress(
        "test", stall_seconds=1, check_seconds=1, query_timeout=0.2, clock=lambda: now[0]
    )
    consumer = Consumer(
        {"bootstrap.servers": "127.0.0.1:1", "group.id": "test-progress", "log_level": 0}
    )
    try:
        consumer.assign([TopicPartition(*A, 10)])
        for _ in range(4):
            now[0] += 1.0
            assert progress.due()
            assert not progress.stalled(consumer, [A], {A: 10})
    finally:
        consumer.close()
