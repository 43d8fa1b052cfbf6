"""The segmenter's clock: one durable timer per contact for when time alone may change its
segments, and the `reevaluate` command it sends back when that timer fires (pure).

The row lives in the timers table beside the contact's journey timers, under an instance id no
journey instance can have (instance ids are hex), so these timers never reach `decide()`.
"""

from __future__ import annotations

from datetime import UTC, datetime

from shared.contracts import ContactCommand, SegmentTimerRequest, TimerFired
from shared.ids import stable_id
from shared.journey_engine.state import CancelTimer, ScheduleTimer

SEGMENT_CLOCK = "~segments"


def segment_timer_id(contact_key: str, due_at: datetime) -> str:
    """The stable id of a contact's segment timer for one due instant (in whatever zone)."""
    return stable_id(contact_key, "segment-timer", due_at.astimezone(UTC))


def segment_timer(request: SegmentTimerRequest) -> ScheduleTimer | CancelTimer:
    """The timer command for a request: it replaces the contact's row, or deletes it."""
    if request.due_at is None:
        return CancelTimer(request.contact_key, SEGMENT_CLOCK)
    return ScheduleTimer(
        request.contact_key,
        SEGMENT_CLOCK,
        segment_timer_id(request.contact_key, request.due_at),
        request.due_at,
    )


def reevaluation(fired: TimerFired, stored_timer_id: str | None) -> ContactCommand | None:
    """The `reevaluate` command for a fired segment timer, or None when the firing is stale
    (the contact's row was replaced by a later request, or cancelled)."""
    if stored_timer_id is None or stored_timer_id != fired.timer_id:
        return None
    return ContactCommand(
        # The due time as stored (UTC, whole milliseconds): every firing of a row gives one id.
        command_id=stable_id(fired.contact_key, "segment-clock", fired.due_at),
        contact_key=fired.contact_key,
        kind="reevaluate",
        reason="time",
        at=fired.due_at,
    )
