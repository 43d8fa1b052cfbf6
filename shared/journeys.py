"""Journey definitions: the published, versioned graph the orchestrator runs.

Definitions are YAML/JSON files validated here (pydantic models; `journey_json_schema()` exports
the JSON Schema). `shared.journey_checks` adds the graph and reference rules; every problem names
the journey, the step and the rule, so a marketer can fix the file without reading code.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any, Literal

from croniter import croniter
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.conditions import Compare, Condition
from shared.conditions import where_shorthand as _where_shorthand
from shared.contracts import SCHEMA_VERSION, Channel
from shared.durations import parse_duration, parse_time_of_day, zone
from shared.profiles import ATTRIBUTE_CHANGED, TAG_ADDED, TAG_REMOVED
from shared.system_events import AUDIENCE_SELECTED, SEGMENT_ENTERED, SEGMENT_LEFT

__all__ = [
    "ATTRIBUTE_CHANGED",
    "AUDIENCE_SELECTED",
    "SEGMENT_ENTERED",
    "SEGMENT_LEFT",
    "TAG_ADDED",
    "TAG_REMOVED",
    "parse_duration",
]

_ID = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")


class _Definition(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def _duration(value: str | None) -> str | None:
    if value is not None and parse_duration(value) <= timedelta(0):
        raise ValueError("a duration must be longer than zero")
    return value


# --- triggers ------------------------------------------------------------------------------


class _Trigger(_Definition):
    # Checked at entry against the contact (traits, tags, segments, …) and the trigger event.
    condition: Condition | None = None


class EventTrigger(_Trigger):
    """Enter when the contact does `event` and `where` holds for it."""

    type: Literal["event"] = "event"
    event: str = Field(min_length=1)
    where: Condition | None = None

    _shorthand = field_validator("where", mode="before")(_where_shorthand)


class SegmentTrigger(_Trigger):
    """Enter when the contact enters (or leaves) a segment."""

    type: Literal["segment"]
    segment: str = Field(min_length=1)
    on: Literal["entered", "left"] = "entered"

    @model_validator(mode="before")
    @classmethod
    def _yaml_on_key(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `on:` key as the boolean true; take it for what was written.
        if isinstance(value, dict) and True in value and "on" not in value:
            return {("on" if key is True else key): item for key, item in value.items()}
        return value


class TagAddedTrigger(_Trigger):
    """Enter when a tag is added to the contact."""

    type: Literal["tag_added"]
    tag: str = Field(min_length=1)


class AttributeChangedTrigger(_Trigger):
    """Enter when an attribute changes (to a given value, when `to` is set)."""

    type: Literal["attribute_changed"]
    attribute: str = Field(min_length=1)
    to: Any = None


class Recurrence(_Definition):
    """A recurring audience run: a cron expression or an interval, from `start` until `end`."""

    cron: str | None = None
    every: str | None = None
    start: AwareDatetime
    end: AwareDatetime | None = None
    # The zone cron fields are read in (09:00 every Monday, Warsaw time).
    timezone: str = "UTC"

    _zone_shape = field_validator("timezone")(lambda value: zone(value) and value)

    _every_shape = field_validator("every")(_duration)

    @field_validator("cron")
    @classmethod
    def _cron_shape(cls, value: str | None) -> str | None:
        if value is not None and not croniter.is_valid(value):
            raise ValueError(f"'{value}' is not a cron expression such as '0 9 * * MON'")
        return value

    @model_validator(mode="after")
    def _one_rhythm(self) -> Recurrence:
        if (self.cron is None) == (self.every is None):
            raise ValueError("a recurrence needs exactly one of cron or every")
        if self.end is not None and self.end <= self.start:
            raise ValueError("end must come after start")
        return self


class AudienceTrigger(_Trigger):
    """Enter the members of one or more segments, on a schedule (each contact once per run).

    Modes: `static` (one run at `start_at`); `ongoing` (one run at `start_at`, then everyone who
    joins a segment later, each contact once ever); `recurring` (a run at every `recurrence`
    instant; members who joined between runs enter at the next one).
    """

    type: Literal["audience"]
    segments: tuple[str, ...] = Field(min_length=1)
    mode: Literal["static", "ongoing", "recurring"] = "static"
    start_at: AwareDatetime | None = None
    recurrence: Recurrence | None = None

    @model_validator(mode="after")
    def _schedule(self) -> AudienceTrigger:
        if self.mode == "recurring" and self.recurrence is None:
            raise ValueError("a recurring audience needs `recurrence`")
        if self.mode != "recurring" and self.start_at is None:
            raise ValueError(f"a {self.mode} audience needs `start_at`")
        return self


class Relation(_Definition):
    """Which contacts an object event reaches: who did `event` on the same object lately."""

    event: str = Field(min_length=1)
    property: str = Field(min_length=1)
    within: str = "30d"

    _within_shape = field_validator("within")(_duration)


class ObjectEventTrigger(_Trigger):
    """Fan-out: an event about an object (e.g. `Price Dropped` for a product) enters every
    contact related to that object; the segmenter keeps the relation index."""

    type: Literal["object_event"]
    event: str = Field(min_length=1)
    object_property: str = Field(min_length=1)
    related_by: Relation
    where: Condition | None = None

    _shorthand = field_validator("where", mode="before")(_where_shorthand)


Trigger = Annotated[
    EventTrigger
    | SegmentTrigger
    | TagAddedTrigger
    | AttributeChangedTrigger
    | AudienceTrigger
    | ObjectEventTrigger,
    Field(discriminator="type"),
]


class EntryRules(_Definition):
    """Who may enter, and how often.

    `reentry`: never (once per contact, ever), after_exit, or cooldown (`cooldown` after the
    previous entry: a duration, or `local_day` for once per calendar day in the contact's zone).
    `key`: an event property; instances are then one per value (per cart, per order).
    `holdout`: percent of contacts who enter but receive nothing (a stable hash).
    """

    reentry: Literal["never", "after_exit", "cooldown"] = "never"
    cooldown: str | None = None
    key: str | None = None
    holdout: float = Field(default=0, ge=0, lt=100)
    max_entries: int | None = Field(default=None, ge=1)

    @field_validator("cooldown")
    @classmethod
    def _cooldown_shape(cls, value: str | None) -> str | None:
        return value if value == "local_day" else _duration(value)

    @model_validator(mode="after")
    def _cooldown_given(self) -> EntryRules:
        if (self.reentry == "cooldown") != (self.cooldown is not None):
            raise ValueError("`cooldown` goes with (and only with) reentry: cooldown")
        return self


class QuietHours(_Definition):
    """No sends between `start` and `end` local time; `hold` until the window ends, or `drop`."""

    start: str
    end: str
    action: Literal["hold", "drop"] = "hold"

    @field_validator("start", "end")
    @classmethod
    def _time_shape(cls, value: str) -> str:
        parse_time_of_day(value)
        return value


class JourneySettings(_Definition):
    timezone: str = "UTC"
    quiet_hours: QuietHours | None = None

    @field_validator("timezone")
    @classmethod
    def _zone_shape(cls, value: str) -> str:
        zone(value)
        return value


class ExitRule(_Definition):
    """Ends an instance at once, at any step (also mid-wait), when an event matches."""

    event: str = Field(min_length=1)
    where: Condition | None = None
    reason: str | None = None

    _shorthand = field_validator("where", mode="before")(_where_shorthand)


class Goal(_Definition):
    """Marks an instance converted when the event happens within `within` of entering.

    The event that reached the goal is kept in the context under `goals.<id>`, so a later branch
    can ask "did the contact order since entering?" (`{field: context.goals.<id>, op: exists}`).
    """

    id: str = "goal"
    event: str = Field(min_length=1)
    where: Condition | None = None
    within: str | None = None
    exit: bool = False

    _shorthand = field_validator("where", mode="before")(_where_shorthand)
    _within_shape = field_validator("within")(_duration)


# --- steps ---------------------------------------------------------------------------------


class _Step(_Definition):
    id: str
    next: str | None = None

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError("step ids are lower-case letters, digits, '_' or '-', at most 64")
        return value


class ChannelChoice(_Definition):
    channel: Channel
    template: str = Field(min_length=1)


class SendStep(_Step):
    """Send one message: on `channel`, or on the first reachable of `channels` (a priority list).

    Reachable: `shared.channels.reachable`, the rule the dispatcher sends by (an address it can
    send to, consent not withdrawn).
    """

    type: Literal["send"]
    channel: Channel = "email"
    template: str | None = None
    channels: tuple[ChannelChoice, ...] = ()
    quiet_hours: Literal["journey", "ignore"] = "journey"

    @model_validator(mode="after")
    def _one_form(self) -> SendStep:
        if (self.template is None) == (not self.channels):
            raise ValueError("a send needs `template` (with `channel`) or a `channels` list")
        return self

    @property
    def choices(self) -> tuple[ChannelChoice, ...]:
        if self.channels:
            return self.channels
        return (ChannelChoice(channel=self.channel, template=self.template or ""),)


class WaitStep(_Step):
    """Wait a `duration`; or `until` an instant (at once if passed); or `until_time` of day in the
    contact's zone; or until the date in attribute `until_attribute` (plus `offset`)."""

    type: Literal["wait"]
    duration: str | None = None
    until: AwareDatetime | None = None
    until_time: str | None = None
    until_attribute: str | None = None
    offset: str | None = None

    @field_validator("duration")
    @classmethod
    def _duration_shape(cls, value: str | None) -> str | None:
        if value is not None and parse_duration(value) <= timedelta(0):
            raise ValueError("a wait must be longer than zero")
        return value

    @field_validator("until_time")
    @classmethod
    def _time_shape(cls, value: str | None) -> str | None:
        if value is not None:
            parse_time_of_day(value)
        return value

    @field_validator("offset")
    @classmethod
    def _offset_shape(cls, value: str | None) -> str | None:
        if value is not None:
            sign = value[:1] == "-"
            parse_duration(value[1:] if sign else value)
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> WaitStep:
        kinds = [self.duration, self.until, self.until_time, self.until_attribute]
        if sum(k is not None for k in kinds) != 1:
            raise ValueError(
                "a wait needs exactly one of duration, until, until_time or until_attribute"
            )
        if self.offset is not None and self.until_attribute is None:
            raise ValueError("`offset` goes with until_attribute")
        return self

    @property
    def delta(self) -> timedelta:
        return parse_duration(self.duration or "0s")

    @property
    def offset_delta(self) -> timedelta:
        if self.offset is None:
            return timedelta(0)
        if self.offset.startswith("-"):
            return -parse_duration(self.offset[1:])
        return parse_duration(self.offset)


class WaitForEventStep(_Step):
    """Wait up to `timeout` for `event` matching `where` (which may read `context`).

    The event is kept in the context under `save_as` (default: the step id). Then the instance
    goes to `on_event`, or on timeout to `on_timeout`; either defaults to the next step.
    """

    type: Literal["wait_for_event"]
    event: str = Field(min_length=1)
    where: Condition | None = None
    timeout: str
    save_as: str | None = None
    on_event: str | None = None
    on_timeout: str | None = None

    _shorthand = field_validator("where", mode="before")(_where_shorthand)
    _timeout_shape = field_validator("timeout")(_duration)

    @property
    def context_name(self) -> str:
        return self.save_as or self.id


class BranchArm(_Definition):
    condition: Condition = Field(alias="if")
    next: str


class BranchStep(_Step):
    """The first arm whose condition holds decides the next step, else `else`."""

    type: Literal["branch"]
    arms: tuple[BranchArm, ...] = Field(min_length=1)
    otherwise: str | None = Field(default=None, alias="else")


class Variant(_Definition):
    name: str = Field(min_length=1)
    weight: float = Field(gt=0)
    next: str | None = None


class SplitStep(_Step):
    """A random A/B/n split, stable per contact: the same contact always gets the same variant."""

    type: Literal["split"]
    variants: tuple[Variant, ...] = Field(min_length=2)


class ValueFrom(_Definition):
    """A value read from the context or the profile at run time."""

    from_: str = Field(alias="from")

    @field_validator("from_")
    @classmethod
    def _path(cls, value: str) -> str:
        Compare(field=value, op="exists")
        return value


class UpdateContactStep(_Step):
    """Add or remove tags and set attributes (applied by the segmenter, the profile's writer)."""

    type: Literal["update_contact"]
    add_tags: tuple[str, ...] = ()
    remove_tags: tuple[str, ...] = ()
    set_attributes: dict[str, ValueFrom | Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _something(self) -> UpdateContactStep:
        if not (self.add_tags or self.remove_tags or self.set_attributes):
            raise ValueError("an update needs add_tags, remove_tags or set_attributes")
        return self


class AssignOwnerStep(_Step):
    """Assign an owner at random from `group`, stable per contact and journey."""

    type: Literal["assign_owner"]
    group: tuple[str, ...] = Field(min_length=1)
    attribute: str = "owner"


class CouponStep(_Step):
    """Generate a unique coupon code into the context (`save_as`) and onto the profile."""

    type: Literal["coupon"]
    prefix: str = Field(default="", max_length=16)
    length: int = Field(default=10, ge=6, le=32)
    expires: str | None = None
    save_as: str = "coupon"

    @field_validator("expires")
    @classmethod
    def _expires_shape(cls, value: str | None) -> str | None:
        return value if value == "end_of_local_day" else _duration(value)


class CaptureStep(_Step):
    """Copy values (from the trigger, a waited-for event, the profile) into the context."""

    type: Literal["capture"]
    values: dict[str, str] = Field(min_length=1)

    @field_validator("values")
    @classmethod
    def _paths(cls, values: dict[str, str]) -> dict[str, str]:
        for path in values.values():
            Compare(field=path, op="exists")
        return values


class WebhookStep(_Step):
    """Call an HTTP endpoint; the JSON answer lands in the context under `save_as`.

    The orchestrator makes the call with `timeout` per attempt and up to `retries` retries; on
    failure the instance goes to `on_failure` (default: the next step, with `ok: false`).
    """

    type: Literal["webhook"]
    url: str = Field(pattern=r"^https?://")
    method: Literal["GET", "POST", "PUT", "PATCH"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict)
    body: dict[str, ValueFrom | Any] = Field(default_factory=dict)
    timeout: str = "10s"
    retries: int = Field(default=2, ge=0, le=10)
    save_as: str | None = None
    on_failure: str | None = None

    _timeout_shape = field_validator("timeout")(_duration)

    @property
    def context_name(self) -> str:
        return self.save_as or self.id


class GotoStep(_Step):
    """Jump to step `to`, at most `max_times` per instance; after that, go on to `next`."""

    type: Literal["goto"]
    to: str
    max_times: int = Field(ge=1, le=1000)


class ExitStep(_Step):
    """End the instance."""

    type: Literal["exit"]


AnyStep = (
    SendStep
    | WaitStep
    | WaitForEventStep
    | BranchStep
    | SplitStep
    | UpdateContactStep
    | AssignOwnerStep
    | CouponStep
    | CaptureStep
    | WebhookStep
    | GotoStep
    | ExitStep
)
Step = Annotated[AnyStep, Field(discriminator="type")]
# Steps where an instance stops and resumes later, on a timer or an event.
WAITING_STEPS = (WaitStep, WaitForEventStep, WebhookStep)


TemplateStatus = Literal["draft", "ready"]


class TemplateDefinition(_Definition):
    """A channel template shipped with a journey file (Jinja2, rendered in a sandbox).

    A journey using a template in `draft` cannot be published until the template is `ready`.
    """

    channel: Channel = "email"
    subject: str | None = None
    text: str
    html: str | None = None
    # Push and WeChat: the link to open and an image; WeChat template messages name the
    # Official Account's template and fill its keys from `data` (push: the data payload).
    url: str | None = None
    image_url: str | None = None
    wechat_template_id: str | None = None
    data: dict[str, str] | None = None
    status: TemplateStatus = "ready"


class Journey(_Definition):
    """A journey version: trigger, entry rules, steps (the first is the start), exits and goals."""

    id: str
    name: str
    version: int = Field(default=1, ge=1)
    description: str = ""
    trigger: Trigger
    entry: EntryRules = EntryRules()
    transactional: bool = False
    settings: JourneySettings = JourneySettings()
    exit_rules: tuple[ExitRule, ...] = ()
    goals: tuple[Goal, ...] = ()
    steps: tuple[Step, ...] = Field(min_length=1)

    @field_validator("trigger", mode="before")
    @classmethod
    def _event_by_default(cls, value: Any) -> Any:
        if isinstance(value, dict) and "type" not in value:
            return {**value, "type": "event"}
        return value

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError("journey ids are lower-case letters, digits, '_' or '-', at most 64")
        return value

    def step(self, step_id: str) -> AnyStep:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)

    def next_of(self, step_id: str) -> str | None:
        """The explicit `next`, else the following step in the list, else None (the end)."""
        ids = [s.id for s in self.steps]
        index = ids.index(step_id)
        step = self.steps[index]
        if step.next is not None:
            return step.next
        return ids[index + 1] if index + 1 < len(ids) else None

    def successors(self, step_id: str) -> list[str]:
        """Every step this one can lead to (for reachability and loop checks)."""
        step = self.step(step_id)
        if isinstance(step, ExitStep):
            return []
        following = self.next_of(step_id)
        targets: list[str | None]
        if isinstance(step, WaitForEventStep):
            targets = [step.on_event or following, step.on_timeout or following]
        elif isinstance(step, BranchStep):
            targets = [*(arm.next for arm in step.arms), step.otherwise or following]
        elif isinstance(step, SplitStep):
            targets = [v.next or following for v in step.variants]
        elif isinstance(step, GotoStep):
            targets = [step.to, following]
        elif isinstance(step, WebhookStep):
            targets = [following, step.on_failure or following]
        else:
            targets = [following]
        return list(dict.fromkeys(t for t in targets if t is not None))


class JourneyFile(_Definition):
    """What a definition file holds: one journey and the templates it ships with."""

    journey: Journey
    templates: dict[str, TemplateDefinition] = Field(default_factory=dict)


JourneyStatus = Literal["active", "paused", "archived"]


class PublishedJourney(BaseModel):
    """The value on `waypost.definitions.v1` for key `journey:<id>:<version>`."""

    model_config = ConfigDict(frozen=True)

    schema_version: int = SCHEMA_VERSION
    kind: Literal["journey"] = "journey"
    status: JourneyStatus = "active"
    journey: Journey
    published_at: AwareDatetime

    @property
    def key(self) -> str:
        return definition_key(self.journey.id, self.journey.version)


def definition_key(journey_id: str, version: int) -> str:
    return f"journey:{journey_id}:{version}"


def journey_json_schema() -> dict[str, Any]:
    """The JSON Schema of a definition file, for editors and the admin."""
    return JourneyFile.model_json_schema(by_alias=True)
