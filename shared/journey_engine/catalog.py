"""The published journeys the engine can see: versions for running instances, latest for entry."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

from shared.journeys import Journey, PublishedJourney


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

    def open_for_entry(self) -> list[Journey]:
        """The newest active version of each journey, by id (paused or archived: nobody enters)."""
        return self._open
