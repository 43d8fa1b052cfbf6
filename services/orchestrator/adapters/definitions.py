"""Published journeys, followed from the compacted definitions topic into a `Catalog`."""

from __future__ import annotations

import threading

import structlog
from pydantic import ValidationError

from services.orchestrator.domain.catalog import Catalog
from shared.journeys import PublishedJourney
from shared.kafka import CompactedTopicView
from shared.topics import DEFINITIONS

log = structlog.get_logger(__name__)


class DefinitionsCatalog:
    """Keeps a `Catalog` current as versions are published; rebuilt only when something changed."""

    def __init__(self, bootstrap: str) -> None:
        self._changed = threading.Event()
        self._changed.set()
        self._view = CompactedTopicView(bootstrap, DEFINITIONS.name, on_change=self._on_change)
        self._catalog = Catalog()

    def _on_change(self, _key: str, _value: bytes | None) -> None:
        self._changed.set()

    def start(self, timeout: float = 60.0) -> None:
        self._view.start()
        if not self._view.wait_caught_up(timeout):
            raise TimeoutError("definitions topic not read to its end in time")

    def stop(self) -> None:
        self._view.stop()

    def current(self) -> Catalog:
        if self._changed.is_set():
            self._changed.clear()
            published = []
            for key, raw in self._view.snapshot().items():
                try:
                    published.append(PublishedJourney.model_validate_json(raw))
                except ValidationError as exc:
                    log.error("definitions.invalid", key=key, error=str(exc))
            self._catalog = Catalog.of(published)
        return self._catalog
