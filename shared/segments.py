"""Segment and aggregate definitions: what the segmenter keeps per contact, and who is in what.

An **aggregate** is a value computed per contact from its events, in event time: a count, sum,
min, max, last value, or the first/last time of an event, with property filters (`where`), over
all time or a sliding `window`. A **segment** is a condition (the one condition model of
`shared.conditions`) over traits, tags, consent, aggregates, other segments and relative times.

Both are published on the definitions topic (`segment:<id>`, `aggregate:<id>`); the segmenter
computes only the aggregates that live segments and journeys read.
"""

from __future__ import annotations

import re
from datetime import timedelta
from functools import cached_property
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.conditions import Condition, where_shorthand
from shared.contracts import SCHEMA_VERSION
from shared.durations import parse_duration
from shared.ids import stable_id

_ID = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")
_PROPERTY = re.compile(r"^[^.\s]+(\.[^.\s]+)*$")
_MICROSECOND = timedelta(microseconds=1)

# Windows span an hour to a year (plus a day, for "the last 365 days" read generously).
MIN_WINDOW = timedelta(seconds=1)
MAX_WINDOW = timedelta(days=366)

AggregateFunction = Literal["count", "sum", "min", "max", "last", "first_at", "last_at"]
# Functions that read a numeric or any property value of the event.
NEEDS_PROPERTY = {"sum", "min", "max", "last"}


class _Definition(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def _slug(value: str) -> str:
    if not _ID.match(value):
        raise ValueError(
            "an id is 1-64 lower-case letters, digits, '-' or '_', starting with a letter or digit"
        )
    return value


class AggregateDefinition(_Definition):
    """`function` of `event` (its `property`, for sum/min/max/last) where `where` holds, over
    `window` (a duration such as `7d`; absent = all time)."""

    id: str
    name: str | None = None
    event: str = Field(min_length=1)
    function: AggregateFunction = "count"
    # The event property read by sum/min/max/last (dotted path; `property` in files).
    prop: str | None = Field(default=None, alias="property")
    # A condition on the event, read as `event.properties.<name>` (like journey triggers).
    where: Condition | None = None
    window: str | None = None

    _id_shape = field_validator("id")(_slug)

    _shorthand = field_validator("where", mode="before")(where_shorthand)

    @field_validator("prop")
    @classmethod
    def _property_shape(cls, value: str | None) -> str | None:
        if value is not None and not _PROPERTY.match(value):
            raise ValueError(f"'{value}' is not a property path (dotted, no spaces)")
        return value

    @field_validator("window")
    @classmethod
    def _window_shape(cls, value: str | None) -> str | None:
        if value is not None:
            span = parse_duration(value)
            if not MIN_WINDOW <= span <= MAX_WINDOW:
                raise ValueError("a window spans at least 1s and at most 366d")
        return value

    @model_validator(mode="after")
    def _operand(self) -> AggregateDefinition:
        if self.function in NEEDS_PROPERTY and self.prop is None:
            raise ValueError(f"'{self.function}' needs `property` (the event property it reads)")
        if self.function not in NEEDS_PROPERTY and self.prop is not None:
            raise ValueError(f"'{self.function}' reads no property; remove `property`")
        return self

    @cached_property
    def window_span(self) -> timedelta | None:
        return parse_duration(self.window) if self.window is not None else None

    @cached_property
    def window_micros(self) -> int | None:
        """The window in whole microseconds: bucket arithmetic runs on integers."""
        span = self.window_span
        return span // _MICROSECOND if span is not None else None

    @cached_property
    def state_key(self) -> str:
        """Where the aggregate's state is kept: a changed computation starts afresh."""
        return f"{self.id}@{self.digest}"

    @cached_property
    def digest(self) -> str:
        """Changes whenever the computation changes (not the name): kept state is keyed by it."""
        return stable_id(
            self.event,
            self.function,
            self.prop,
            self.where.model_dump_json(by_alias=True) if self.where is not None else None,
            self.window,
            length=12,
        )


class SegmentDefinition(_Definition):
    """Contacts for whom `condition` holds; membership changes are announced as they happen."""

    id: str
    name: str | None = None
    description: str | None = None
    condition: Condition

    _id_shape = field_validator("id")(_slug)

    @property
    def digest(self) -> str:
        return stable_id(self.condition.model_dump_json(by_alias=True), length=12)


class SegmentFile(_Definition):
    """A YAML/JSON file of aggregates and segments (either list may be empty)."""

    aggregates: tuple[AggregateDefinition, ...] = ()
    segments: tuple[SegmentDefinition, ...] = ()


class PublishedSegment(BaseModel):
    """The value on `waypost.definitions.v1` for key `segment:<id>`."""

    model_config = ConfigDict(frozen=True)

    schema_version: int = SCHEMA_VERSION
    kind: Literal["segment"] = "segment"
    segment: SegmentDefinition
    published_at: AwareDatetime

    @property
    def key(self) -> str:
        return f"segment:{self.segment.id}"


class PublishedAggregate(BaseModel):
    """The value on `waypost.definitions.v1` for key `aggregate:<id>`."""

    model_config = ConfigDict(frozen=True)

    schema_version: int = SCHEMA_VERSION
    kind: Literal["aggregate"] = "aggregate"
    aggregate: AggregateDefinition
    published_at: AwareDatetime

    @property
    def key(self) -> str:
        return f"aggregate:{self.aggregate.id}"


SEGMENT_PREFIX = "segment:"
AGGREGATE_PREFIX = "aggregate:"
