"""The wire contract: every message on every Waypost topic, as frozen pydantic models.

Fields are added, never repurposed; `schema_version` changes only with a new topic version.
`tests/contract/` pins the JSON schemas.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

SCHEMA_VERSION = 1

EventType = Literal["track", "identify", "page", "screen", "alias", "group"]
Channel = Literal["email", "sms", "push", "wechat"]


class WireModel(BaseModel):
    """Base of internal messages: frozen, snake_case on the wire, unknown fields ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    def to_wire(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()


class Event(WireModel):
    """A behavioural or delivery event in the Segment Tracking API shape (camelCase on the wire)."""

    model_config = ConfigDict(
        frozen=True, extra="ignore", alias_generator=to_camel, populate_by_name=True
    )

    schema_version: int = SCHEMA_VERSION
    type: EventType
    event: str | None = None
    name: str | None = None
    user_id: str | None = None
    anonymous_id: str | None = None
    previous_id: str | None = None
    group_id: str | None = None
    message_id: str
    timestamp: AwareDatetime
    received_at: AwareDatetime
    sent_at: AwareDatetime | None = None
    properties: dict[str, Any] = Field(default_factory=dict)
    traits: dict[str, Any] = Field(default_factory=dict)
    context: dict[str, Any] = Field(default_factory=dict)
    source: str | None = None

    @property
    def contact_key(self) -> str:
        """userId, else anonymousId: the key of every contact topic."""
        key = self.user_id or self.anonymous_id
        if not key:
            raise ValueError("event has neither userId nor anonymousId")
        return key

    @property
    def label(self) -> str:
        """What a journey trigger matches: the track event name, else the call type."""
        return self.event if self.type == "track" and self.event else self.type


class Profile(WireModel):
    """A contact's profile as the segmenter keeps it; the segmenter is its only writer."""

    schema_version: int = SCHEMA_VERSION
    contact_key: str
    user_id: str | None = None
    anonymous_ids: tuple[str, ...] = ()
    traits: dict[str, Any] = Field(default_factory=dict)
    first_seen: AwareDatetime
    last_seen: AwareDatetime
    event_counts: dict[str, int] = Field(default_factory=dict)
    recent_message_ids: tuple[str, ...] = ()
    updated_at: AwareDatetime


class ContactEvent(WireModel):
    """An accepted (de-duplicated) event with the profile as it stands after applying it."""

    schema_version: int = SCHEMA_VERSION
    contact_key: str
    event: Event
    profile: Profile


class SendRequest(WireModel):
    """One message the dispatcher must deliver; `message_id` is deterministic per step run."""

    schema_version: int = SCHEMA_VERSION
    message_id: str
    contact_key: str
    channel: Channel
    template_id: str
    journey_id: str
    journey_version: int
    instance_id: str
    step_id: str
    transactional: bool = False
    requested_at: AwareDatetime
    profile: Profile
    context: dict[str, Any] = Field(default_factory=dict)


class TimerFired(WireModel):
    """A durable orchestrator timer that came due, routed back to its contact's partition."""

    schema_version: int = SCHEMA_VERSION
    contact_key: str
    timer_id: str
    instance_id: str
    due_at: AwareDatetime
    fired_at: AwareDatetime


JourneyLogKind = Literal["entered", "step_completed", "waiting", "exited", "converted", "holdout"]


class JourneyLogRecord(WireModel):
    """One line of a journey instance's history; `record_id` is deterministic."""

    schema_version: int = SCHEMA_VERSION
    record_id: str
    kind: JourneyLogKind
    journey_id: str
    journey_version: int
    instance_id: str
    contact_key: str
    step_id: str | None = None
    reason: str | None = None
    at: AwareDatetime


class DeadLetter(WireModel):
    """A record no consumer could process, kept with the reason instead of stalling the stream."""

    schema_version: int = SCHEMA_VERSION
    service: str
    topic: str
    partition: int
    offset: int
    key: str | None
    value: str
    reason: str
    at: datetime
