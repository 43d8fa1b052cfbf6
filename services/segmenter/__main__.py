"""Start a segmenter worker: `python -m services.segmenter`."""

from __future__ import annotations

from datetime import timedelta

import structlog

from services.segmenter.adapters.definitions import LiveDefinitions
from services.segmenter.adapters.profile_view import profile_view
from services.segmenter.adapters.relations import RelationIndex
from services.segmenter.app import Segmenter
from services.segmenter.settings import SegmenterSettings
from shared.clock import SystemClock
from shared.deadletter import DeadLetters
from shared.document_view import run_view_thread
from shared.kafka import AsyncProducer, prepare_topics
from shared.logs import configure_logging
from shared.secrets import enforce
from shared.streams import StreamWorker, run_stream_worker

log = structlog.get_logger(__name__)
# How long the profile view waits before it starts again after a failure.
PROFILE_VIEW_RESTART_SECONDS = 5.0


def main() -> None:
    settings = SegmenterSettings()
    configure_logging("segmenter", settings.log_level, settings.log_format)
    enforce(settings.env, settings.secrets())
    clock = SystemClock()
    kafka = settings.kafka()
    # Delivery reports served on the worker's loop, in one go while a batch waits for its
    # acknowledgements, rather than by a poll thread taking the GIL from the fold for each
    # record (docs/stream-processing.md).
    producer = AsyncProducer(kafka, client_id="segmenter", serve_on_loop=True)
    definitions = LiveDefinitions(kafka)
    worker = StreamWorker(settings.app_id, settings, producer, clock, service="segmenter")
    dead_letters = DeadLetters(producer, "segmenter", clock)
    Segmenter(worker, settings, clock, producer, dead_letters, definitions)

    def relations_kept() -> timedelta:
        return definitions.current().relations_kept or timedelta(0)

    RelationIndex(
        worker,
        producer,
        dead_letters,
        clock,
        relations_kept,
        sweep_seconds=settings.relations_sweep_seconds,
    )
    prepare_topics(settings, worker.changelogs())
    definitions.start()
    stop_view = run_view_thread(
        settings, "waypost-segmenter", lambda db: profile_view(settings, db)
    )
    try:
        run_stream_worker(worker)
    finally:
        stop_view()
        definitions.stop()
        producer.close()


if __name__ == "__main__":
    main()
