"""Audience schedules: ask the segmenter for each audience journey's members when a run is due.

Every orchestrator worker ticks, but only the one assigned partition 0 of the contact events
acts. During a rebalance two workers can both believe they own it for a moment and request the
same run twice; that is harmless, because a run's id is a hash of the journey and the instant,
and each contact enters once per run. Progress (the last run requested per journey) is the
compacted `waypost.audience-runs.v1`, which every worker follows, so a new owner carries on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import structlog
from pydantic import ValidationError

from services.orchestrator.adapters.definitions import CatalogSource
from services.orchestrator.domain.audiences import ScheduledRun, due_request, next_run
from shared.clock import Clock
from shared.contracts import AudienceRequest
from shared.journeys import AudienceTrigger, Journey
from shared.kafka import CompactedTopicView, DeliveryFailed, ProducerBusy
from shared.kafka_connection import KafkaConnection
from shared.topics import AUDIENCE_REQUESTS, AUDIENCE_RUNS

log = structlog.get_logger(__name__)


class Progress(Protocol):
    """The last run requested per audience journey, as durably recorded."""

    def ready(self) -> bool: ...

    def last_runs(self) -> dict[str, datetime]: ...


class RunPublisher(Protocol):
    async def broadcast(
        self, topic: str, key: str | None, value: bytes, partitions: int
    ) -> None: ...

    async def send(self, topic: str, key: str | None, value: bytes) -> None: ...


class AudienceProgress:
    """Follows `waypost.audience-runs.v1` (compacted, keyed by journey id) from the beginning."""

    def __init__(self, kafka: KafkaConnection | str) -> None:
        self._view = CompactedTopicView(kafka, AUDIENCE_RUNS.name)
        # Decoded values by key, with the raw bytes they came from, so a tick parses only changes.
        self._decoded: dict[str, tuple[bytes, datetime]] = {}

    def start(self) -> None:
        self._view.start()

    def stop(self) -> None:
        self._view.stop()

    def ready(self) -> bool:
        """Whether the topic was read to its end once: before that, progress is unknown."""
        return self._view.wait_caught_up(0)

    def last_runs(self) -> dict[str, datetime]:
        runs: dict[str, datetime] = {}
        decoded: dict[str, tuple[bytes, datetime]] = {}
        for journey_id, raw in self._view.snapshot().items():
            known = self._decoded.get(journey_id)
            if known is not None and known[0] == raw:
                decoded[journey_id] = known
            else:
                try:
                    request = AudienceRequest.model_validate_json(raw)
                except ValidationError as exc:
                    log.error(
                        "orchestrator.audience_progress_invalid", key=journey_id, error=str(exc)
                    )
                    continue
                decoded[journey_id] = (raw, request.run_at)
            runs[journey_id] = decoded[journey_id][1]
        self._decoded = decoded
        return runs


@dataclass(frozen=True)
class _Watch:
    """When a journey's next run falls, for one version and one last run: ticks before then
    cost a comparison, not a walk over the schedule."""

    version: int
    last_run_at: datetime | None
    next_at: datetime | None  # None: nothing more is due (the schedule is over, or unreadable)


class AudienceSchedule:
    """One tick: request every audience run that is due, then record it as the journey's progress.

    A crash between the two repeats the run on the next owner's tick; the run id is the same, so
    nobody enters twice.
    """

    def __init__(
        self,
        *,
        catalog: CatalogSource,
        progress: Progress,
        producer: RunPublisher,
        clock: Clock,
        partitions: int,
        owns_schedule: Callable[[], bool],
    ) -> None:
        self._catalog = catalog
        self._progress = progress
        self._producer = producer
        self._clock = clock
        self._partitions = partitions
        self._owns_schedule = owns_schedule
        # Runs this worker recorded, until its view of the progress topic shows them.
        self._recorded: dict[str, datetime] = {}
        self._watches: dict[str, _Watch] = {}

    async def tick(self) -> None:
        if not self._owns_schedule() or not self._progress.ready():
            return
        now = self._clock.now()
        last_runs = self._progress.last_runs()
        for journey_id, at in self._recorded.items():
            if journey_id not in last_runs or last_runs[journey_id] < at:
                last_runs[journey_id] = at
        # The newest version of each journey, while it is active: paused or archived ask nothing.
        for journey in self._catalog.current().open_for_entry():
            run = self._owed(journey, last_runs.get(journey.id), now)
            if run is not None:
                await self._request(run)

    def _owed(
        self, journey: Journey, last_run_at: datetime | None, now: datetime
    ) -> ScheduledRun | None:
        trigger = journey.trigger
        if not isinstance(trigger, AudienceTrigger):
            return None
        watch = self._watches.get(journey.id)
        if watch is None or (watch.version, watch.last_run_at) != (journey.version, last_run_at):
            try:
                next_at = next_run(trigger, last_run_at)
            except Exception:
                # Logged once per version and last run, not every tick (a cron that never
                # matches, say); the journey requests nothing until either changes.
                log.exception("orchestrator.audience_schedule_unreadable", journey_id=journey.id)
                next_at = None
            watch = self._watches[journey.id] = _Watch(journey.version, last_run_at, next_at)
        if watch.next_at is None or now < watch.next_at:
            return None
        return due_request(journey, last_run_at, now)

    async def _request(self, run: ScheduledRun) -> None:
        request = run.request
        value = request.to_wire()
        try:
            await self._producer.broadcast(
                AUDIENCE_REQUESTS.name, request.journey_id, value, self._partitions
            )
            await self._producer.send(AUDIENCE_RUNS.name, request.journey_id, value)
        except (DeliveryFailed, ProducerBusy) as exc:
            log.warning(
                "orchestrator.audience_request_failed",
                journey_id=request.journey_id,
                error=str(exc),
            )
            return  # nothing recorded: the next tick asks again, with the same run id
        self._recorded[request.journey_id] = request.run_at
        if run.skipped:
            log.warning(
                "orchestrator.audience_runs_skipped",
                journey_id=request.journey_id,
                skipped=run.skipped,
                requested_instead=request.run_at.isoformat(),
            )
        log.info(
            "orchestrator.audience_requested",
            journey_id=request.journey_id,
            journey_version=request.journey_version,
            run_id=request.run_id,
            run_at=request.run_at.isoformat(),
        )
