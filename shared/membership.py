"""A consumer-group member stuck outside its group joins again with a new consumer.

After the broker restarts, librdkafka's classic group consumer was sometimes left outside its
group for good: its partitions were revoked when the coordinator answered `UNKNOWN_MEMBER_ID`,
it never completed a new join, and the coordinator listed the group with no member at all, so
nothing was consumed again while the process looked healthy (seen on a single-broker stack after
an outage of 15-45 s, about one outage in four).

The consumer's own statistics (librdkafka's `stats_cb`, every few seconds) say where its group
membership stands: `cgrp.state` is `up` once it has a coordinator, and `cgrp.join_state` is
`steady` once it has joined and holds its assignment (possibly empty, when there are more
members than partitions). A member that stays unsettled for `STUCK_SECONDS` while a broker is
up is rebuilt: its consumer is closed and a new one joins. Time while no broker is up does not
count: an outage is waited out, not acted on. No admin request is sent: librdkafka 2.16 aborted
processes (`rd_kafka_enq_once` assertion) when group requests were outstanding as the broker
went down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]

log = structlog.get_logger(__name__)

# How often librdkafka reports a consumer's statistics.
STATS_INTERVAL_MS = 5_000
# How long a member may stay unsettled, with a broker up, before it joins with a new consumer.
# Longer than a join takes while another member finishes a large restore before it rejoins.
STUCK_SECONDS = 90.0
# When an unsettled member is first logged.
WARN_SECONDS = 30.0


@dataclass(frozen=True)
class GroupState:
    """A consumer's view of its group membership, from one statistics report."""

    state: str
    join_state: str
    broker_up: bool
    # Partitions the member holds (`cgrp.assignment_size`).
    assigned: int = 0

    @property
    def settled(self) -> bool:
        return self.state == "up" and self.join_state == "steady"


def group_state(stats_json: str) -> GroupState | None:
    """The group membership a librdkafka statistics report describes (None: no group)."""
    stats = json.loads(stats_json)
    cgrp = stats.get("cgrp")
    if not isinstance(cgrp, dict):
        return None
    brokers = stats.get("brokers") or {}
    up = any(
        b.get("state") == "UP" and int(b.get("nodeid", -1)) >= 0
        for b in brokers.values()
        if isinstance(b, dict)
    )
    assigned = int(cgrp.get("assignment_size") or 0)
    return GroupState(str(cgrp.get("state")), str(cgrp.get("join_state")), up, assigned)


@dataclass
class MembershipWatch:
    """The decision alone: fed each statistics report with the time it arrived."""

    stuck_seconds: float = STUCK_SECONDS
    unsettled_for: float = field(default=0.0, init=False)
    # When the last report came, if it too found the member unsettled with a broker up.
    last: float | None = field(default=None, init=False)

    def observe(self, now: float, group: GroupState | None) -> bool:
        """Whether the member has been unsettled, with a broker up, for `stuck_seconds` (then
        the count starts again). Only the time between two such reports counts: not an outage,
        and not a gap between reports (the worker busy restoring tables between two polls)
        that began while it was settled."""
        previous = self.last
        if group is None or group.settled:
            self.unsettled_for, self.last = 0.0, None
            return False
        if not group.broker_up:
            self.last = None  # an outage: waited out, and not counted
            return False
        self.last = now
        if previous is None:
            return False
        self.unsettled_for += now - previous
        if self.unsettled_for < self.stuck_seconds:
            return False
        self.unsettled_for = 0.0
        return True


class Membership:
    """Fed a consumer's statistics (`stats_cb`, on the polling thread); `lost` says whether the
    consumer should be replaced by a new one (logged when so)."""

    def __init__(
        self,
        group_id: str,
        *,
        stuck_seconds: float = STUCK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.group_id = group_id
        self._watch = MembershipWatch(stuck_seconds)
        self._clock = clock
        self._lock = threading.Lock()
        self._lost = False
        self._state: GroupState | None = None

    def config(self) -> dict[str, object]:
        """The consumer settings that feed this watch."""
        return {"statistics.interval.ms": STATS_INTERVAL_MS, "stats_cb": self.report}

    def report(self, stats_json: str) -> None:
        try:
            state = group_state(stats_json)
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("kafka.stats_unreadable", group=self.group_id, error=str(exc))
            return
        with self._lock:
            previous, self._state = self._state, state
            before = self._watch.unsettled_for
            if self._watch.observe(self._clock(), state):
                self._lost = True
            warn = before < WARN_SECONDS <= self._watch.unsettled_for
        if state is not None and (
            previous is None
            or (previous.state, previous.join_state, previous.assigned)
            != (state.state, state.join_state, state.assigned)
        ):
            # Each change of the membership, for the operator reading how a group settled.
            log.info(
                "kafka.group_state",
                group=self.group_id,
                state=state.state,
                join_state=state.join_state,
                assigned=state.assigned,
                broker_up=state.broker_up,
            )
        if warn and state is not None:
            log.warning(
                "kafka.group_unsettled",
                group=self.group_id,
                state=state.state,
                join_state=state.join_state,
                seconds=WARN_SECONDS,
            )

    def lost(self) -> bool:
        """Whether the member has been stuck outside its group (asked once: it then starts
        afresh, as the new consumer does)."""
        with self._lock:
            lost, self._lost, state = self._lost, False, self._state
            if lost:
                self._watch = MembershipWatch(self._watch.stuck_seconds)
        if lost:
            log.warning(
                "kafka.group_membership_lost",
                group=self.group_id,
                state=state.state if state else None,
                join_state=state.join_state if state else None,
            )
        return lost


# How long a partition may hold records past the consumer's position, none of them reaching it
# while it polls, before the consumer is replaced (a fetcher left stuck by a broker restart).
STALL_SECONDS = 60.0
# How often a consumer's positions are compared with the broker's end offsets.
PROGRESS_CHECK_SECONDS = 15.0
# A longer gap between two checks (the owner busy, or the broker away) is not counted.
PROGRESS_MAX_GAP_SECONDS = 2 * PROGRESS_CHECK_SECONDS + 5
# The deadline of one end-offset query.
END_OFFSETS_TIMEOUT_SECONDS = 5.0

TopicPartitionKey = tuple[str, int]


@dataclass
class StallWatch:
    """The decision alone: fed, at each check, every watched partition's position and the
    broker's end offset; names the partitions that held records past an unmoving position for
    `stall_seconds` of consecutive checks."""

    stall_seconds: float = STALL_SECONDS
    max_gap: float = PROGRESS_MAX_GAP_SECONDS
    # Per partition behind its end: the position last seen, and for how long it has not moved.
    behind: dict[TopicPartitionKey, tuple[int, float]] = field(default_factory=dict, init=False)
    last: float | None = field(default=None, init=False)

    def observe(
        self, now: float, offsets: dict[TopicPartitionKey, tuple[int, int]]
    ) -> list[TopicPartitionKey]:
        """`offsets`: (position, end offset) per partition. Partitions at their end are not
        tracked; a position that moved starts its count again."""
        gap = None if self.last is None else now - self.last
        self.last = now
        counted = gap if gap is not None and gap <= self.max_gap else 0.0
        behind: dict[TopicPartitionKey, tuple[int, float]] = {}
        stalled = []
        for where, (position, end) in offsets.items():
            if end <= position:
                continue
            before = self.behind.get(where)
            still = before[1] + counted if before is not None and before[0] == position else 0.0
            behind[where] = (position, still)
            if still >= self.stall_seconds:
                stalled.append(where)
        self.behind = behind
        return sorted(stalled)

    def reset(self) -> None:
        self.behind, self.last = {}, None


class _OffsetCheck:
    """A periodic check of a consumer against the broker's end offsets: `due` every
    `check_seconds`; `_verdict` feeds the offsets seen to a `StallWatch` and logs `event` with
    the partitions that kept records past an unmoving offset for `seconds`."""

    def __init__(
        self,
        name: str,
        *,
        seconds: float,
        check_seconds: float,
        query_timeout: float,
        clock: Callable[[], float],
    ) -> None:
        self.name = name
        self._query_timeout = query_timeout
        self._watch = StallWatch(seconds, max_gap=2 * check_seconds + 5)
        self._check_seconds = check_seconds
        self._clock = clock
        self._next_check = clock() + check_seconds

    def due(self) -> bool:
        return self._clock() >= self._next_check

    def _checked(self) -> None:
        self._next_check = self._clock() + self._check_seconds

    def _verdict(
        self, offsets: dict[TopicPartitionKey, tuple[int, int]], event: str, offset_name: str
    ) -> bool:
        behind = self._watch.observe(self._clock(), offsets)
        if not behind:
            return False
        log.warning(
            event,
            consumer=self.name,
            partitions=[
                {
                    "topic": t,
                    "partition": p,
                    offset_name: offsets[(t, p)][0],
                    "end": offsets[(t, p)][1],
                }
                for t, p in behind
            ],
            seconds=self._watch.stall_seconds,
        )
        self._watch.reset()
        return True


class Watermarks:
    """The low and high watermarks of many partitions, asked of the broker in two requests
    over a connection of this object's own. Asked through the consumer instead, one query per
    partition, each waited behind the consumer's own fetches and held them up in turn: a
    worker got no record for about 2.5 s in every 15."""

    def __init__(
        self, config: Mapping[str, Any], timeout: float = END_OFFSETS_TIMEOUT_SECONDS
    ) -> None:
        self._config = dict(config)
        self._timeout = timeout
        self._admin: AdminClient | None = None

    def __call__(
        self, partitions: list[TopicPartitionKey]
    ) -> dict[TopicPartitionKey, tuple[int, int]]:
        """Raises `KafkaException` when the broker does not answer in time."""
        if not partitions:
            return {}
        if self._admin is None:
            self._admin = AdminClient(self._config)
        asked = [TopicPartition(t, p) for t, p in partitions]
        lows = self._admin.list_offsets(
            {tp: OffsetSpec.earliest() for tp in asked},  # type: ignore[no-untyped-call]
            request_timeout=self._timeout,
        )
        highs = self._admin.list_offsets(
            {tp: OffsetSpec.latest() for tp in asked},  # type: ignore[no-untyped-call]
            request_timeout=self._timeout,
        )
        found: dict[TopicPartitionKey, tuple[int, int]] = {}
        try:
            for tp, low in lows.items():
                high = highs[tp]
                found[(str(tp.topic), int(tp.partition))] = (
                    int(low.result(self._timeout).offset),
                    int(high.result(self._timeout).offset),
                )
        except TimeoutError as exc:
            # The futures' own deadline can pass before the request's: the same outage.
            raise KafkaException(
                KafkaError(KafkaError._TIMED_OUT, "watermarks not answered in time")
            ) from exc
        return found


class CheckBeside:
    """A blocking check (`Progress.stalled`, which waits for the broker's answers) run in a
    thread beside the loop instead of in its way: `start` it when due, take its `verdict` on a
    later turn, and `finish` it before the consumer it reads is closed. Awaited inline, the
    loop got no record while the broker answered (see `Watermarks` for why that was seconds)."""

    def __init__(self) -> None:
        self._task: asyncio.Future[bool] | None = None
        self._ended = threading.Event()
        self._ended.set()

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self, check: Callable[[], bool]) -> None:
        if self._task is not None:
            return
        ended = self._ended = threading.Event()

        def run() -> bool:
            try:
                return check()
            finally:
                ended.set()

        self._task = asyncio.ensure_future(asyncio.to_thread(run))

    def verdict(self) -> bool | None:
        """The finished check's answer (once), else None. A check that failed gives no
        answer (logged): it is a safety net, and its failure must never stop the records."""
        task = self._task
        if task is None or not task.done():
            return None
        self._task = None
        failure = task.exception()
        if failure is not None:
            log.warning("kafka.progress_check_failed", error=f"{type(failure).__name__}: {failure}")
            return None
        return task.result()

    async def finish(self) -> None:
        """Wait for a running check to end (its answer is dropped: the consumer is going)."""
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(Exception):
                await task

    def wait_ended(self, seconds: float) -> None:
        """`finish` for a synchronous close: wait up to `seconds` for the check's thread to
        stop using the consumer."""
        self._ended.wait(seconds)


class Progress(_OffsetCheck):
    """Whether a consumer still fetches: every `PROGRESS_CHECK_SECONDS` its positions are
    compared with the partitions' end offsets, asked of the broker. A partition that keeps
    records past a position that does not move for `STALL_SECONDS` of polling means the
    consumer's fetching is stuck (after a broker restart a librdkafka consumer was seen to
    stop fetching, in or out of a group, with its membership settled): its owner replaces it
    with a new consumer. The owner asks only while it polls, and never while it paused its
    partitions on purpose."""

    def __init__(
        self,
        name: str,
        *,
        stall_seconds: float = STALL_SECONDS,
        check_seconds: float = PROGRESS_CHECK_SECONDS,
        query_timeout: float = END_OFFSETS_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            name,
            seconds=stall_seconds,
            check_seconds=check_seconds,
            query_timeout=query_timeout,
            clock=clock,
        )

    def pause(self) -> None:
        """The owner stopped fetching on purpose: nothing counts until it fetches again."""
        self._watch.reset()

    def stalled(
        self,
        consumer: Any,
        partitions: list[TopicPartitionKey],
        known: Mapping[TopicPartitionKey, int],
        watermarks: Watermarks | None = None,
    ) -> bool:
        """Check now (blocking: the partitions' watermarks are asked of the broker, through
        `watermarks` when given, else one query per partition through the consumer). A
        partition's position is the consumer's, else `known` (where it was assigned or last
        committed); a partition with neither is not watched."""
        self._checked()
        if not partitions:
            self._watch.reset()
            return False
        try:
            positions: dict[TopicPartitionKey, int] = {}
            for tp in consumer.position([TopicPartition(t, p) for t, p in partitions]):
                where = (str(tp.topic), int(tp.partition))
                position = int(tp.offset) if tp.offset >= 0 else known.get(where, -1)
                if position >= 0:
                    positions[where] = position
            if watermarks is not None:
                marks = watermarks(sorted(positions))
            else:
                marks = {
                    where: consumer.get_watermark_offsets(
                        TopicPartition(*where), timeout=self._query_timeout, cached=False
                    )
                    for where in positions
                }
            offsets: dict[TopicPartitionKey, tuple[int, int]] = {
                where: (max(position, marks[where][0]), marks[where][1])
                for where, position in positions.items()
                if where in marks
            }
        except KafkaException:  # the broker is away: an outage is waited out, not counted
            self._watch.reset()
            return False
        return self._verdict(offsets, "kafka.fetch_stalled", "position")


# How long a worker that holds no partition may see records of its inputs that nobody takes (the
# group's committed offsets not moving below the partitions' ends) before it joins again with a
# new consumer. Longer than the slowest join of a peer that restores large tables first.
ORPHAN_SECONDS = 120.0
ORPHAN_CHECK_SECONDS = 20.0


class Orphan(_OffsetCheck):
    """Whether a member that holds nothing is outside a group that needs it.

    After a broker restart a librdkafka consumer was seen to stay out of its group for good
    while its own statistics said nothing was wrong: the coordinator listed the group empty and
    the inputs' records waited, consumed by no one. Only a member holding no partition checks:
    every `ORPHAN_CHECK_SECONDS` it compares the group's committed offsets with the partitions'
    ends. Records below an end that no committed offset moves toward for `ORPHAN_SECONDS` mean
    no member consumes them: this one joins again. A peer that holds them and works moves its
    committed offsets; an idle spare member sees no lag and stays as it is. Delayed queues
    (records held until they are due) are not checked: waiting is what they are for."""

    def __init__(
        self,
        name: str,
        *,
        orphan_seconds: float = ORPHAN_SECONDS,
        check_seconds: float = ORPHAN_CHECK_SECONDS,
        query_timeout: float = END_OFFSETS_TIMEOUT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            name,
            seconds=orphan_seconds,
            check_seconds=check_seconds,
            query_timeout=query_timeout,
            clock=clock,
        )

    def holding(self) -> None:
        """The member holds partitions: nothing counts until it holds none again."""
        self._watch.reset()
        self._checked()

    def orphaned(self, consumer: Any, topics: list[str]) -> bool:
        """Check now (blocking: the topics' metadata, the group's committed offsets and one
        end-offset query per partition)."""
        self._checked()
        try:
            offsets: dict[TopicPartitionKey, tuple[int, int]] = {}
            metadata = consumer.list_topics(timeout=self._query_timeout)
            partitions = [
                TopicPartition(topic, partition)
                for topic in topics
                if topic in metadata.topics
                for partition in sorted(metadata.topics[topic].partitions)
            ]
            if not partitions:
                self._watch.reset()
                return False
            for tp in consumer.committed(partitions, timeout=self._query_timeout):
                where = (str(tp.topic), int(tp.partition))
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(*where), timeout=self._query_timeout, cached=False
                )
                committed = int(tp.offset) if tp.offset >= 0 else low
                offsets[where] = (max(committed, low), high)
        except KafkaException:  # the broker is away: an outage is waited out, not counted
            self._watch.reset()
            return False
        return self._verdict(offsets, "kafka.group_orphaned", "committed")
