"""Published definitions (journey versions, segments, aggregates), followed from the compacted
definitions topic by every reader."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import structlog
from pydantic import ValidationError

from shared.journeys import PublishedJourney
from shared.kafka import CompactedTopicView
from shared.kafka_connection import KafkaConnection
from shared.segments import (
    AGGREGATE_PREFIX,
    SEGMENT_PREFIX,
    PublishedAggregate,
    PublishedSegment,
)
from shared.topics import DEFINITIONS

log = structlog.get_logger(__name__)
_Record = TypeVar("_Record", PublishedJourney, PublishedSegment, PublishedAggregate)


class PublishedJourneys:
    """Every published version, decoded; `changed()` says when to rebuild what is derived."""

    def __init__(self, kafka: KafkaConnection | str) -> None:
        self._changed = threading.Event()
        self._changed.set()
        self._seen = threading.Condition()
        self._view = CompactedTopicView(kafka, DEFINITIONS.name, on_change=self._on_change)

    def _on_change(self, _key: str, _value: bytes | None) -> None:
        self._changed.set()
        with self._seen:
            self._seen.notify_all()

    def start(self, timeout: float | None = None) -> None:
        """Start following; with a timeout, block until the topic was read to its end."""
        self._view.start()
        if timeout is not None and not self._view.wait_caught_up(timeout):
            raise TimeoutError("definitions topic not read to its end in time")

    def stop(self) -> None:
        self._view.stop()

    def changed(self) -> bool:
        """True once after each change (and initially)."""
        if self._changed.is_set():
            self._changed.clear()
            return True
        return False

    def wait_for(self, record: PublishedJourney, timeout: float) -> bool:
        """Block until this follower holds `record` (read-your-writes after producing it)."""
        expected = record.model_dump_json().encode()
        with self._seen:
            return self._seen.wait_for(
                lambda: self._view.snapshot().get(record.key) == expected, timeout
            )

    def all(self) -> list[PublishedJourney]:
        """Every published journey version, by id and version."""
        journeys = self._decoded(PublishedJourney, lambda key: key.startswith("journey:"))
        return sorted(journeys, key=lambda p: (p.journey.id, p.journey.version))

    def segments(self) -> list[PublishedSegment]:
        """Every published segment, by id (a deleted one is a tombstone, so absent)."""
        found = self._decoded(PublishedSegment, lambda key: key.startswith(SEGMENT_PREFIX))
        return sorted(found, key=lambda p: p.segment.id)

    def aggregates(self) -> list[PublishedAggregate]:
        """Every published aggregate, by id."""
        found = self._decoded(PublishedAggregate, lambda key: key.startswith(AGGREGATE_PREFIX))
        return sorted(found, key=lambda p: p.aggregate.id)

    def _decoded(self, model: type[_Record], wanted: Callable[[str], bool]) -> list[_Record]:
        """The records under the wanted keys; an undecodable one is logged and left out."""
        found = []
        for key, raw in self._view.snapshot().items():
            if wanted(key):
                try:
                    found.append(model.model_validate_json(raw))
                except ValidationError as exc:
                    log.error("definitions.invalid", key=key, error=str(exc))
        return found
