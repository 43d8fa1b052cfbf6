"""Published journeys as the admin lists them, followed from the definitions topic."""

from __future__ import annotations

import structlog
from pydantic import ValidationError

from shared.journeys import PublishedJourney
from shared.kafka import CompactedTopicView
from shared.topics import DEFINITIONS

log = structlog.get_logger(__name__)


class PublishedJourneys:
    def __init__(self, bootstrap: str) -> None:
        self._view = CompactedTopicView(bootstrap, DEFINITIONS.name)

    def start(self) -> None:
        self._view.start()

    def stop(self) -> None:
        self._view.stop()

    def all(self) -> list[PublishedJourney]:
        journeys = []
        for key, raw in self._view.snapshot().items():
            try:
                journeys.append(PublishedJourney.model_validate_json(raw))
            except ValidationError as exc:
                log.error("admin.bad_definition", key=key, error=str(exc))
        return sorted(journeys, key=lambda p: (p.journey.id, p.journey.version))
