"""The segmenter's live `Definitions`, kept current from the definitions topic."""

from __future__ import annotations

from services.segmenter.domain.definitions import Definitions
from shared.definitions import PublishedJourneys
from shared.journeys import PublishedJourney
from shared.kafka_connection import KafkaConnection


class LiveDefinitions:
    """Rebuilds `Definitions` only when something was published, deleted or changed status."""

    def __init__(self, kafka: KafkaConnection | str) -> None:
        self._published = PublishedJourneys(kafka)
        self._current = Definitions()

    def start(self, timeout: float = 60.0) -> None:
        self._published.start(timeout)

    def stop(self) -> None:
        self._published.stop()

    def current(self) -> Definitions:
        if self._published.changed():
            newest = newest_versions(self._published.all())
            self._current = Definitions.of(
                (p.aggregate for p in self._published.aggregates()),
                (p.segment for p in self._published.segments()),
                # A paused journey keeps its aggregates (it resumes); only active ones fan out.
                journeys=[p.journey for p in newest if p.status != "archived"],
                entering=[p.journey for p in newest if p.status == "active"],
            )
        return self._current


def newest_versions(published: list[PublishedJourney]) -> list[PublishedJourney]:
    """The newest published version of each journey (it carries the journey's status)."""
    newest: dict[str, PublishedJourney] = {}
    for record in published:
        current = newest.get(record.journey.id)
        if current is None or record.journey.version > current.journey.version:
            newest[record.journey.id] = record
    return list(newest.values())
