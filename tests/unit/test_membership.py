"""A group member stuck outside its group joins again; an outage is waited out, not acted on."""

from __future__ import annotations

import json

from shared.membership import GroupState, Membership, MembershipWatch, group_state

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


def stats(state: str, join_state: str, brokers: dict[str, dict[str, object]]) -> str:
    return json.dumps({"cgrp": {"state": state, "join_state": join_state}, "brokers": brokers})


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


def test_an_unreadable_report_is_logged_and_ignored() -> None:
    membership = Membership("g", stuck_seconds=0)
    membership.report("not json")
    assert membership.lost() is False
    assert membership.config()["statistics.interval.ms"] == 5_000
