"""The published journeys the engine can see: versions for running instances, latest for entry."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import assert_never

from shared.journeys import (
    AttributeChangedTrigger,
    AudienceTrigger,
    EventTrigger,
    Journey,
    ObjectEventTrigger,
    PublishedJourney,
    SegmentTrigger,
    TagAddedTrigger,
    Trigger,
)
from shared.system_events import (
    ATTRIBUTE_CHANGED,
    AUDIENCE_SELECTED,
    SEGMENT_ENTERED,
    SEGMENT_LEFT,
    TAG_ADDED,
)


def trigger_labels(trigger: Trigger) -> frozenset[str]:
    """The event labels (`Event.label`) a trigger can match or explain a miss of: for any
    other label `engine.trigger_verdict` answers "no, and nothing to say", so an event is only
    held against the journeys its label names (`Catalog.open_for_entry`)."""
    match trigger:
        case EventTrigger() | ObjectEventTrigger():
            return frozenset({trigger.event})
        case SegmentTrigger():
            return frozenset({SEGMENT_ENTERED if trigger.on == "entered" else SEGMENT_LEFT})
        case TagAddedTrigger():
            return frozenset({TAG_ADDED})
        case AttributeChangedTrigger():
            return frozenset({ATTRIBUTE_CHANGED})
        case AudienceTrigger():
            ongoing = {SEGMENT_ENTERED} if trigger.mode == "ongoing" else set()
            return frozenset({AUDIENCE_SELECTED, *ongoing})
        case _:
            assert_never(trigger)


@dataclass(frozen=True)
class Catalog:
    """Every published version, by (journey id, version)."""

    published: dict[tuple[str, int], PublishedJourney] = field(default_factory=dict)

    @classmethod
    def of(cls, journeys: Iterable[PublishedJourney]) -> Catalog:
        return cls({(p.journey.id, p.journey.version): p for p in journeys})

    def version(self, journey_id: str, version: int) -> Journey | None:
        published = self.published.get((journey_id, version))
        return published.journey if published is not None else None

    @cached_property
    def _newest(self) -> dict[str, PublishedJourney]:
        """The newest published version of each journey, worked out once per catalog."""
        newest: dict[str, PublishedJourney] = {}
        for (journey_id, version), published in self.published.items():
            current = newest.get(journey_id)
            if current is None or version > current.journey.version:
                newest[journey_id] = published
        return newest

    @cached_property
    def _open(self) -> list[Journey]:
        active = [p.journey for p in self._newest.values() if p.status == "active"]
        return sorted(active, key=lambda j: j.id)

    def status(self, journey_id: str) -> str | None:
        """The journey's lifecycle status: that of its newest published version."""
        newest = self._newest.get(journey_id)
        return newest.status if newest is not None else None

    @cached_property
    def _open_by_label(self) -> dict[str, list[Journey]]:
        index: dict[str, list[Journey]] = {}
        for journey in self._open:
            for label in trigger_labels(journey.trigger):
                index.setdefault(label, []).append(journey)
        return index

    def open_for_entry(self, label: str | None = None) -> list[Journey]:
        """The newest active version of each journey, by id (paused or archived: nobody enters);
        with `label`, only those whose trigger can match an event of that label."""
        if label is None:
            return self._open
        return self._open_by_label.get(label, [])
