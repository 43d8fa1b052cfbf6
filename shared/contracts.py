"""The wire contract: every message on every Waypost topic, as frozen pydantic models.

Fields are added, never repurposed; `schema_version` changes only with a new topic version.
`tests/contract/` pins the JSON schemas.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from shared.bodies import STRINGS_CACHED

SCHEMA_VERSION = 1

_Model = TypeVar("_Model", bound=BaseModel)


def replaced(model: _Model, update: dict[str, Any]) -> _Model:
    """`model.model_copy(update=update)`: the same shallow copy, not validated either, made
    directly for a model that keeps no extra fields and no private attributes (pydantic's
    generic copy takes half again as long, and the segmenter copies each contact's profile
    and row on every event). Any other model goes through `model_copy`."""
    if model.__pydantic_extra__ is not None or model.__pydantic_private__ is not None:
        return model.model_copy(update=update)
    copied = _new(type(model))
    _set(copied, "__dict__", {**model.__dict__, **update})
    _set_extra(copied, None)
    _set_fields_set(copied, model.__pydantic_fields_set__ | update.keys())
    _set_private(copied, None)
    return copied


# What `replaced` calls, looked up once: a model's slots are set through their descriptors (a
# frozen model refuses `setattr`), a quarter faster than `object.__setattr__` by name.
_new = object.__new__
_set = object.__setattr__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__


def wire_json(model: BaseModel, **options: Any) -> bytes:
    """`model.model_dump_json(**options).encode()`, the same bytes: pydantic-core writes them,
    and `model_dump_json` only decodes them into a string, which the caller encoded again (a
    profile's encoding takes about half the time without the round trip)."""
    encoded: bytes = model.__pydantic_serializer__.to_json(model, **options)
    return encoded


EventType = Literal["track", "identify", "page", "screen", "alias", "group"]
Channel = Literal["email", "sms", "push", "wechat"]


class WireModel(BaseModel):
    """Base of internal messages: frozen, snake_case on the wire, unknown fields ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore", cache_strings=STRINGS_CACHED)

    def to_wire(self) -> bytes:
        return wire_json(self, by_alias=True, exclude_none=True)


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


# Profile fields the segmenter keeps in its row but does not publish.
_SEGMENTER_ONLY = {"recent_message_ids"}
_PROFILE = {"profile"}


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
    # Held only by segmenter rows written by earlier versions, which kept a profile's last
    # message ids here; the segmenter's row keeps their digests now. Never published.
    recent_message_ids: tuple[str, ...] = ()
    updated_at: AwareDatetime
    tags: tuple[str, ...] = ()
    # Segment ids the contact is a member of, kept by the segmenter.
    segments: tuple[str, ...] = ()
    # Per channel: False once the contact withdrew consent (absent means not withdrawn).
    consent: dict[str, bool] = Field(default_factory=dict)
    # Values of the aggregates live definitions need, by aggregate id.
    aggregates: dict[str, Any] = Field(default_factory=dict)
    coupons: tuple[Coupon, ...] = ()

    def to_wire(self) -> bytes:
        """Without `recent_message_ids` (an older row's de-duplication state, see the field)."""
        return wire_json(self, by_alias=True, exclude_none=True, exclude=_SEGMENTER_ONLY)


class Coupon(WireModel):
    """A coupon code generated by a journey for this contact."""

    code: str
    journey_id: str
    instance_id: str
    issued_at: AwareDatetime
    expires_at: AwareDatetime | None = None


ContactCommandKind = Literal[
    "add_tag",
    "remove_tag",
    "set_attribute",
    "store_coupon",
    "forget",
    "reevaluate",
    "merge_into",
    "absorb",
]


class ContactCommand(WireModel):
    """A change asked of a contact; the segmenter, the profile's only writer, applies it.

    Journeys (the orchestrator) add and remove tags, set attributes and store coupons; the
    segmenter announces each change as `Tag Added`, `Tag Removed` or `Attribute Changed`.
    The admin asks to `forget` a contact. `reevaluate` re-checks segment memberships: when time
    alone may have changed them (a segment timer fired, `at` is its due time) or after a segment
    definition changed (a backfill). `merge_into` (to an anonymous contact, `other_key` the known
    one) and `absorb` (to the known contact, `other_key` the anonymous one, `state` its segmenter
    state) re-key an anonymous history through Kafka.
    """

    schema_version: int = SCHEMA_VERSION
    command_id: str
    contact_key: str
    kind: ContactCommandKind
    tag: str | None = None
    attribute: str | None = None
    value: Any = None
    coupon: Coupon | None = None
    journey_id: str | None = None
    instance_id: str | None = None
    step_id: str | None = None
    other_key: str | None = None
    # `absorb` only: the merged contact's state, opaque outside the segmenter.
    state: dict[str, Any] | None = None
    # Who or what asked, for the record ("time", "backfill", "admin", …).
    reason: str | None = None
    at: AwareDatetime


class ContactEvent(WireModel):
    """One change of a contact, with one snapshot of the profile as it stands after it.

    `event` is what caused the change (an accepted, de-duplicated event; for a contact command,
    the first event it announces); `announcements` are the events the same change announces, in
    order (`Segment Entered`, `Segment Left`, `Tag Added`, `Attribute Changed`, …). All of
    them share `profile`, so a change that announces several events carries the profile once.
    Records written before `announcements` existed hold one event each and decode unchanged.
    """

    schema_version: int = SCHEMA_VERSION
    contact_key: str
    event: Event
    announcements: tuple[Event, ...] = ()
    profile: Profile

    @property
    def events(self) -> tuple[Event, ...]:
        """The cause, then what it announced, in the order they happened."""
        return (self.event, *self.announcements)

    def each(self) -> Iterator[ContactEvent]:
        """One `ContactEvent` per event, each with the shared profile: for consumers that take
        events one at a time (a journey trigger matches one event)."""
        if not self.announcements:
            yield self
            return
        for event in self.events:
            yield ContactEvent(contact_key=self.contact_key, event=event, profile=self.profile)

    def to_wire(self) -> bytes:
        return self.to_wire_with(self.profile.to_wire())

    def to_wire_with(self, profile_wire: bytes) -> bytes:
        """The record with `profile_wire` (this profile's `to_wire()`, encoded once by a writer
        that also publishes the profile on its own) as its profile."""
        head = wire_json(self, by_alias=True, exclude_none=True, exclude=_PROFILE)
        return b"".join((head[:-1], b',"profile":', profile_wire, b"}"))


class TestSend(WireModel):
    """A test of a template, sent to a marketer's own address: this content (the editor's,
    ready or not) goes to `address` instead of the contact's, rendered for the contact. The
    contact's consent is not asked (they are not the recipient); suppressions of the address
    hold."""

    __test__ = False  # not a pytest test class

    address: str
    content: dict[str, Any]


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
    # The rest of the step's channel priority list, to try on a permanent recipient failure.
    fallbacks: tuple[ChannelTemplate, ...] = ()
    # A test send from the admin's template editor: the content and the address are given.
    test: TestSend | None = None


class ChannelTemplate(WireModel):
    channel: Channel
    template_id: str


class SendRetry(WireModel):
    """A send request waiting for its next attempt on a retry topic (one topic per delay class).

    `attempt` is the attempt this record will make; the ledger holds the same number, so a
    replayed retry record is recognised and dropped. `reconcile_tries` above 0: no new attempt,
    but the provider asked again what came of a try that got no answer (its ledger entry still
    `sending`), the how-many-th time; the ledger's state, not this field, decides what happens.
    """

    schema_version: int = SCHEMA_VERSION
    request: SendRequest
    attempt: int = Field(ge=1)
    due_at: AwareDatetime
    reason: str
    reconcile_tries: int = Field(default=0, ge=0)


class TimerFired(WireModel):
    """A durable orchestrator timer that came due, routed back to its contact's partition."""

    schema_version: int = SCHEMA_VERSION
    contact_key: str
    timer_id: str
    instance_id: str
    due_at: AwareDatetime
    fired_at: AwareDatetime


JourneyLogKind = Literal[
    "entered",
    "step_completed",
    "waiting",
    "exited",
    "converted",
    "holdout",
    "skipped",
    "forgotten",
    "not_entered",
]


class JourneyLogRecord(WireModel):
    """One line of a journey instance's history; `record_id` is deterministic.

    `forgotten` is no instance's: the contact was erased, after every record of theirs on the
    partition, and readers delete what they keep of `contact_key` (journey and instance empty).
    `not_entered` is no instance's either: an event matched the journey's trigger (its name, its
    segment, its tag) but the contact was refused entry; `why` says by which rule.
    """

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
    holdout: bool = False
    # Step-specific facts: the chosen channel or variant, the goal reached, the coupon code.
    detail: str | None = None
    # The decision in words, with the values that decided it ("branch else: traits.plan = free").
    why: str | None = None


class WebhookCall(WireModel):
    """An HTTP call a webhook step asked for; `call_id` doubles as the Idempotency-Key."""

    schema_version: int = SCHEMA_VERSION
    call_id: str
    contact_key: str
    instance_id: str
    step_id: str
    method: str
    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    body: dict[str, Any] = Field(default_factory=dict)
    timeout_seconds: float
    retries: int


class WebhookResult(WireModel):
    """The outcome of a webhook call, routed back to the contact's partition."""

    schema_version: int = SCHEMA_VERSION
    call_id: str
    contact_key: str
    instance_id: str
    ok: bool
    status: int | None = None
    body: Any = None
    error: str | None = None
    attempts: int = 1
    at: AwareDatetime


class SegmentTimerRequest(WireModel):
    """The segmenter asks for one orchestrator timer per contact: the next instant at which time
    alone may change the contact's segment memberships (a window slides, "90 days ago" passes).
    A new request replaces the previous one; `due_at=None` cancels it. When it fires, the
    orchestrator sends a `reevaluate` contact command back."""

    schema_version: int = SCHEMA_VERSION
    contact_key: str
    # None cancels (left out on the wire, like every empty optional field).
    due_at: AwareDatetime | None = None
    requested_at: AwareDatetime


class AudienceRequest(WireModel):
    """One run of an audience journey: every segmenter partition emits `Audience Selected` for
    each current member of any of `segments` (once per contact and run)."""

    schema_version: int = SCHEMA_VERSION
    journey_id: str
    journey_version: int
    run_id: str
    segments: tuple[str, ...]
    run_at: AwareDatetime
    requested_at: AwareDatetime


class SegmentCount(WireModel):
    """The exact member count of one segment on one partition (compacted; the admin sums)."""

    schema_version: int = SCHEMA_VERSION
    segment_id: str
    partition: int
    members: int
    at: AwareDatetime


ObjectRelationKind = Literal["related", "fan_out", "unrelated", "prune"]


class ObjectRelation(WireModel):
    """A record of the object index, keyed by `object_key` (`<event>|<property>|<value>`).

    `related`: `contact_key` did the relation's event on the object at `at`. `fan_out`: the
    object event `event` must reach every contact related within `within`. `unrelated`:
    `contact_key` leaves the object's entry (forgotten, merged into another contact, or its
    relation aged out of the contact's own list). `prune`: the entry drops the relations older
    than the index keeps (the index's own sweep asks, for objects nobody writes any more).
    """

    schema_version: int = SCHEMA_VERSION
    kind: ObjectRelationKind
    object_key: str
    at: AwareDatetime
    contact_key: str | None = None
    event: Event | None = None
    within: str | None = None


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
