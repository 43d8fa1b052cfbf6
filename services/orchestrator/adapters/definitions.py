"""The engine's `Catalog`, kept current from the published journeys."""

from __future__ import annotations

from typing import Protocol

from shared.definitions import PublishedJourneys
from shared.journey_engine.catalog import Catalog
from shared.kafka_connection import KafkaConnection


class CatalogSource(Protocol):
    """Where the shell gets the catalog as it stands now."""

    def current(self) -> Catalog: ...


class DefinitionsCatalog:
    """Rebuilds the `Catalog` only when a version was published or changed status."""

    def __init__(self, kafka: KafkaConnection | str) -> None:
        self._journeys = PublishedJourneys(kafka)
        self._catalog = Catalog()

    def start(self, timeout: float = 60.0) -> None:
        self._journeys.start(timeout)

    def stop(self) -> None:
        self._journeys.stop()

    def current(self) -> Catalog:
        if self._journeys.changed():
            self._catalog = Catalog.of(self._journeys.all())
        return self._catalog
