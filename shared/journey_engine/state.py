"""Journey instance state per contact, and the stimuli and commands of the engine."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from shared.bodies import STRINGS_CACHED
from shared.contracts import (
    ContactCommand,
    ContactEvent,
    JourneyLogRecord,
    Profile,
    SendRequest,
    TimerFired,
    WebhookCall,
    WebhookResult,
)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, cache_strings=STRINGS_CACHED)


# Why an instance waits on its timer: a wait step, the timeout of a wait-for-event, a send held
# by quiet hours, a webhook's backstop, or a paused journey.
TimerPurpose = Literal["wait", "timeout", "quiet_hours", "webhook", "paused"]


class PendingTimer(_Frozen):
    """The durable timer an instance is waiting on."""

    timer_id: str
    step_id: str
    due_at: AwareDatetime
    purpose: TimerPurpose = "wait"
    # For a wait for an event: how many events of its name failed its `where` so far (the
    # engine records only the first few, so the log does not grow with traffic).
    misses: int = 0


class Instance(_Frozen):
    """One contact's run through one journey version."""

    instance_id: str
    journey_id: str
    journey_version: int
    contact_key: str
    step_id: str
    entered_at: AwareDatetime
    key: str | None = None
    holdout: bool = False
    converted: tuple[str, ...] = ()
    visits: dict[str, int] = Field(default_factory=dict)
    context: dict[str, Any] = Field(default_factory=dict)
    timer: PendingTimer | None = None


class ContactState(_Frozen):
    """Everything the orchestrator keeps for one contact (one table row)."""

    contact_key: str
    profile: Profile | None = None
    instances: dict[str, Instance] = Field(default_factory=dict)
    entries: dict[str, int] = Field(default_factory=dict)
    last_entered: dict[str, AwareDatetime] = Field(default_factory=dict)
    # Ids of recently ended instances, newest last: a replayed trigger must not start them again.
    ended: tuple[str, ...] = ()
    # Digests of recently handled event ids, newest last: a redelivered event changes nothing.
    handled: tuple[str, ...] = ()
    # Per journey, a digest of the last `not_entered` record written for this contact: the same
    # refusal again (the next product view of a contact still in the journey) is not written
    # again. Cleared when the contact enters the journey.
    refused: dict[str, str] = Field(default_factory=dict)

    def timers(self) -> list[tuple[Instance, PendingTimer]]:
        return [(i, i.timer) for i in self.instances.values() if i.timer is not None]


@dataclass(frozen=True)
class EventArrived:
    """A contact event from the segmenter."""

    contact_event: ContactEvent


@dataclass(frozen=True)
class TimerDue:
    """A durable timer came due."""

    timer: TimerFired


@dataclass(frozen=True)
class WebhookAnswered:
    """A webhook step's call finished (or gave up)."""

    result: WebhookResult


Stimulus = EventArrived | TimerDue | WebhookAnswered


@dataclass(frozen=True)
class RequestSend:
    request: SendRequest


@dataclass(frozen=True)
class ScheduleTimer:
    contact_key: str
    instance_id: str
    timer_id: str
    due_at: datetime


@dataclass(frozen=True)
class CancelTimer:
    """The instance no longer waits (it moved on or ended): drop its durable timer."""

    contact_key: str
    instance_id: str


@dataclass(frozen=True)
class ChangeContact:
    """A tag, attribute or coupon change for the segmenter to apply."""

    command: ContactCommand


@dataclass(frozen=True)
class CallWebhook:
    call: WebhookCall


@dataclass(frozen=True)
class AppendLog:
    record: JourneyLogRecord


Command = RequestSend | ScheduleTimer | CancelTimer | ChangeContact | CallWebhook | AppendLog


@dataclass(frozen=True)
class Decision:
    state: ContactState
    commands: tuple[Command, ...]
