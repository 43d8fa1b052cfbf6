"""Segment Tracking API calls as clients send them, and their translation into `Event`s (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NamedTuple, Protocol

import msgspec
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from shared.contracts import SCHEMA_VERSION, Event, EventType
from shared.profiles import DEFAULT_LIMITS, ProfileLimits, oversized_traits
from shared.system_events import is_system_event

# Client clocks drift; a `sentAt` lets us correct `timestamp` the way Segment does, within reason.
MAX_CLOCK_SKEW_CORRECTION = timedelta(days=1)
# The window a client's timestamps must fall in: nothing Waypost tracks happened before 2000,
# and a clock a day ahead is broken, not skewed (README, "Timestamps").
EARLIEST_TIMESTAMP = datetime(2000, 1, 1, tzinfo=UTC)
MAX_TIMESTAMP_AHEAD = timedelta(days=1)
MAX_BATCH_CALLS = 10_000


class CallContext:
    """What validating a call needs besides the call: when it was received, and the profile
    limits a single call may not pass (given as pydantic's validation `context`)."""

    def __init__(self, received_at: datetime, limits: ProfileLimits = DEFAULT_LIMITS) -> None:
        self.received_at = received_at
        self.limits = limits
        self.latest = received_at + MAX_TIMESTAMP_AHEAD


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
    def _shape(self, info: ValidationInfo) -> Call:
        context = info.context
        error = broken_rule(self, context if isinstance(context, CallContext) else None)
        if error is not None:
            raise error
        return self


def broken_rule(call: CallFields, context: CallContext | None) -> PydanticCustomError | None:
    """The first whole-call rule `call` breaks, or None: the timestamps in the window and the
    traits within the profile limits (given a `context`), the ids and fields its type needs,
    no event Waypost emits itself. `Call` raises it; the quick path declines on it."""
    if context is not None:
        error = _outside(call, context)
        if error is not None:
            return error
    if not (call.user_id or call.anonymous_id):
        return _missing("userId", "userId or anonymousId is required")
    if call.type == "track" and not call.event:
        return _missing("event", "event is required for track calls")
    if is_system_event(call.event):
        return PydanticCustomError(
            "system_event",
            "'{name}' is an event Waypost emits itself; a write key can only report "
            "behaviour (consent changes go through signed unsubscribe links or the admin API)",
            {"field": "event", "name": call.event},
        )
    if call.type == "alias" and not call.previous_id:
        return _missing("previousId", "previousId is required for alias calls")
    if call.type == "group" and not call.group_id:
        return _missing("groupId", "groupId is required for group calls")
    return None


def _outside(call: CallFields, context: CallContext) -> PydanticCustomError | None:
    """A timestamp outside the window, or traits past the profile limits."""
    latest = context.latest
    for value, wire in (
        (call.timestamp, "timestamp"),
        (call.sent_at, "sentAt"),
        (call.original_timestamp, "originalTimestamp"),
    ):
        if value is not None and not EARLIEST_TIMESTAMP <= value <= latest:
            return PydanticCustomError(
                "timestamp_window",
                "{value} is outside the accepted window: from 2000-01-01T00:00:00Z "
                "to a day after the call is received",
                {"field": wire, "value": value.isoformat()},
            )
    limits = context.limits
    traits = call.traits
    if not traits:
        return None
    if len(traits) > limits.max_traits:
        return PydanticCustomError(
            "too_many_traits",
            "{count} traits in one call; a profile holds at most {limit}",
            {"field": "traits", "count": len(traits), "limit": limits.max_traits},
        )
    oversized = oversized_traits(traits, limits)
    if oversized:
        return PydanticCustomError(
            "trait_too_large",
            "the trait is over {limit} bytes as JSON (name and value)",
            {"field": f"traits.{oversized[0]}", "limit": limits.max_trait_bytes},
        )
    return None


def _missing(field: str, message: str) -> PydanticCustomError:
    """A whole-call rule that still names the field it is about (`ctx.field`)."""
    return PydanticCustomError("missing_field", message, {"field": field})


class Batch(BaseModel):
    """`POST /v1/batch`: many calls, each with its own `type`."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    batch: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_BATCH_CALLS)
    write_key: str | None = None
    context: dict[str, Any] = Field(default_factory=dict)


CallPath = Literal["track", "identify", "page", "screen", "alias", "group"]


def corrected_timestamp(call: CallFields, received_at: datetime) -> datetime:
    """When the call happened: its own time, corrected for the client's clock skew as `sentAt`
    shows it (within a day), else when it was received."""
    client_time = call.timestamp or call.original_timestamp
    if client_time is None:
        return received_at
    if call.sent_at is not None:
        skew = received_at - call.sent_at
        if abs(skew) <= MAX_CLOCK_SKEW_CORRECTION:
            return client_time + skew
    return client_time


def event_fields(
    call: Call, *, message_id: str, received_at: datetime, source: str
) -> dict[str, Any]:
    """The normalised event, by `Event` field name."""
    return {
        "type": call.type,
        "event": call.event,
        "name": call.name,
        "user_id": call.user_id,
        "anonymous_id": call.anonymous_id,
        "previous_id": call.previous_id,
        "group_id": call.group_id,
        "message_id": call.message_id or message_id,
        "timestamp": corrected_timestamp(call, received_at),
        "received_at": received_at,
        "sent_at": call.sent_at,
        "properties": call.properties,
        "traits": call.traits,
        "context": call.context,
        "source": source,
    }


def to_event(call: Call, *, message_id: str, received_at: datetime, source: str) -> Event:
    """Normalise a call into the wire `Event`."""
    return Event(
        **event_fields(call, message_id=message_id, received_at=received_at, source=source)
    )


class EncodedEvent(NamedTuple):
    """An accepted event as the record it becomes, encoded once: the size limit is checked on
    the very bytes written to the topic."""

    key: str
    value: bytes
    source: str
    call_type: str


_encoder = msgspec.json.Encoder()


class CallFields(Protocol):
    """What a record is made of: a validated `Call`, or a `QuickCall` that passed the same rules
    (`services.ingest.domain.quick`)."""

    type: EventType
    user_id: str | None
    anonymous_id: str | None
    message_id: str | None
    timestamp: datetime | None
    sent_at: datetime | None
    original_timestamp: datetime | None
    event: str | None
    name: str | None
    previous_id: str | None
    group_id: str | None
    properties: dict[str, Any]
    traits: dict[str, Any]
    context: dict[str, Any]


def encode_call(
    call: CallFields, *, message_id: str, received_at: datetime, source: str
) -> EncodedEvent:
    """The record of a validated call, serialised straight from its fields.

    The JSON is that of `encode(to_event(...))`, field order included (the tests pin it),
    without building and validating an `Event` a second time and dumping it: that was half of
    ingest's work per event. The dict is written out field by field, in `Event`'s order and
    leaving out what is None as `to_wire` does, and serialised by msgspec, in 60 % of
    pydantic-core's time. The one difference in the bytes: a float's exponent has no `+`
    (`1e16`, where pydantic writes `1e+16`); non-finite floats are `null` in both.
    """
    sent_at = call.sent_at
    wire: dict[str, Any] = {"schemaVersion": SCHEMA_VERSION, "type": call.type}
    if call.event is not None:
        wire["event"] = call.event
    if call.name is not None:
        wire["name"] = call.name
    user_id = call.user_id
    anonymous_id = call.anonymous_id
    if user_id is not None:
        wire["userId"] = user_id
    if anonymous_id is not None:
        wire["anonymousId"] = anonymous_id
    if call.previous_id is not None:
        wire["previousId"] = call.previous_id
    if call.group_id is not None:
        wire["groupId"] = call.group_id
    wire["messageId"] = call.message_id or message_id
    wire["timestamp"] = corrected_timestamp(call, received_at)
    wire["receivedAt"] = received_at
    if sent_at is not None:
        wire["sentAt"] = sent_at
    wire["properties"] = call.properties
    wire["traits"] = call.traits
    wire["context"] = call.context
    wire["source"] = source
    # The contact key, as `Event.contact_key` defines it; the call has one or the other.
    key = user_id or anonymous_id or ""
    return EncodedEvent(key, _encoder.encode(wire), source, call.type)


def encode(event: Event) -> EncodedEvent:
    """An event's topic record: keyed by contact, the wire JSON as its value."""
    return EncodedEvent(event.contact_key, event.to_wire(), event.source or "default", event.type)
