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

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

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
    return GroupState(str(cgrp.get("state")), str(cgrp.get("join_state")), up)


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
            self._state = state
            before = self._watch.unsettled_for
            if self._watch.observe(self._clock(), state):
                self._lost = True
            warn = before < WARN_SECONDS <= self._watch.unsettled_for
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
