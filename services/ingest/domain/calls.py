"""Segment Tracking API calls as clients send them, and their translation into `Event`s (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from shared.contracts import Event, EventType
from shared.system_events import is_system_event

# Client clocks drift; a `sentAt` lets us correct `timestamp` the way Segment does, within reason.
MAX_CLOCK_SKEW_CORRECTION = timedelta(days=1)


class Call(BaseModel):
    """Fields every call may carry; `type` is set by the route or, in a batch, by the client."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    type: EventType
    user_id: str | None = Field(default=None, min_length=1, max_length=256)
    anonymous_id: str | None = Field(default=None, min_length=1, max_length=256)
    message_id: str | None = Field(default=None, min_length=1, max_length=256)
    timestamp: datetime | None = None
    sent_at: datetime | None = None
    original_timestamp: datetime | None = None
    event: str | None = Field(default=None, max_length=256)
    name: str | None = Field(default=None, max_length=256)
    previous_id: str | None = Field(default=None, max_length=256)
    group_id: str | None = Field(default=None, max_length=256)
    properties: dict[str, Any] = Field(default_factory=dict)
    traits: dict[str, Any] = Field(default_factory=dict)
    context: dict[str, Any] = Field(default_factory=dict)
    write_key: str | None = None

    @field_validator("user_id", "anonymous_id", mode="before")
    @classmethod
    def _ids_as_strings(cls, value: Any) -> Any:
        # SDKs sometimes send numeric ids; Segment accepts them as strings.
        return (
            str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
        )

    @field_validator("timestamp", "sent_at", "original_timestamp")
    @classmethod
    def _assume_utc(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    @model_validator(mode="after")
    def _shape(self) -> Call:
        if not (self.user_id or self.anonymous_id):
            raise _missing("userId", "userId or anonymousId is required")
        if self.type == "track" and not self.event:
            raise _missing("event", "event is required for track calls")
        if is_system_event(self.event):
            raise PydanticCustomError(
                "system_event",
                "'{name}' is an event Waypost emits itself; a write key can only report "
                "behaviour (consent changes go through signed unsubscribe links or the admin API)",
                {"field": "event", "name": self.event},
            )
        if self.type == "alias" and not self.previous_id:
            raise _missing("previousId", "previousId is required for alias calls")
        if self.type == "group" and not self.group_id:
            raise _missing("groupId", "groupId is required for group calls")
        return self


def _missing(field: str, message: str) -> PydanticCustomError:
    """A whole-call rule that still names the field it is about (`ctx.field`)."""
    return PydanticCustomError("missing_field", message, {"field": field})


class Batch(BaseModel):
    """`POST /v1/batch`: many calls, each with its own `type`."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    batch: list[dict[str, Any]] = Field(min_length=1, max_length=10_000)
    write_key: str | None = None
    context: dict[str, Any] = Field(default_factory=dict)


CallPath = Literal["track", "identify", "page", "screen", "alias", "group"]


def to_event(call: Call, *, message_id: str, received_at: datetime, source: str) -> Event:
    """Normalise a call into the wire `Event`, correcting client clock skew from `sentAt`."""
    client_time = call.timestamp or call.original_timestamp
    timestamp = client_time or received_at
    if client_time is not None and call.sent_at is not None:
        skew = received_at - call.sent_at
        if abs(skew) <= MAX_CLOCK_SKEW_CORRECTION:
            timestamp = timestamp + skew
    return Event(
        type=call.type,
        event=call.event,
        name=call.name,
        user_id=call.user_id,
        anonymous_id=call.anonymous_id,
        previous_id=call.previous_id,
        group_id=call.group_id,
        message_id=call.message_id or message_id,
        timestamp=timestamp,
        received_at=received_at,
        sent_at=call.sent_at,
        properties=call.properties,
        traits=call.traits,
        context=call.context,
        source=source,
    )
