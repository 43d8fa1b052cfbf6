"""Start a segmenter worker: `python -m services.segmenter`."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from datetime import timedelta

import structlog

from services.segmenter.adapters.definitions import LiveDefinitions
from services.segmenter.adapters.profile_view import ProfileView
from services.segmenter.adapters.relations import RelationIndex
from services.segmenter.app import Segmenter
from services.segmenter.domain.relations import longest_within
from services.segmenter.settings import SegmenterSettings
from shared.clock import SystemClock
from shared.deadletter import DeadLetters
from shared.docstore import connect, database
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
    producer = AsyncProducer(kafka, client_id="segmenter")
    definitions = LiveDefinitions(kafka)
    worker = StreamWorker(settings.app_id, settings, producer, clock, service="segmenter")
    dead_letters = DeadLetters(producer, "segmenter", clock)
    Segmenter(worker, settings, clock, producer, dead_letters, definitions)

    def relations_kept() -> timedelta:
        return longest_within(definitions.current().object_triggers) or timedelta(0)

    RelationIndex(worker, producer, dead_letters, clock, relations_kept)
    prepare_topics(settings, worker.changelogs())
    definitions.start()
    stop_view = threading.Event()
    view = threading.Thread(
        target=asyncio.run, args=(profile_view(settings, stop_view),), name="profile-view"
    )
    view.daemon = True  # never holds the process up once the worker has stopped
    view.start()
    try:
        run_stream_worker(worker)
    finally:
        stop_view.set()
        view.join(timeout=5)
        definitions.stop()
        producer.close()


async def profile_view(settings: SegmenterSettings, stop: threading.Event) -> None:
    """Profiles into the document store for the admin (its own consumer group), on a thread
    and event loop of its own so it never takes time from the worker's. A failure restarts the
    view after a pause instead of stopping the worker."""
    stopped = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            await asyncio.sleep(0.2)
        stopped.set()

    watcher = asyncio.ensure_future(watch())
    try:
        while not stopped.is_set():
            client = connect(settings, "waypost-segmenter")
            try:
                await ProfileView(settings, database(client, settings)).run(stopped)
            except Exception:
                log.exception("segmenter.profile_view_failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopped.wait(), PROFILE_VIEW_RESTART_SECONDS)
            finally:
                await client.close()
    finally:
        watcher.cancel()


if __name__ == "__main__":
    main()
