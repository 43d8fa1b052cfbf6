"""Start an orchestrator worker: `python -m services.orchestrator`."""

from __future__ import annotations

from services.orchestrator.adapters.audience_schedule import AudienceProgress
from services.orchestrator.adapters.definitions import DefinitionsCatalog
from services.orchestrator.app import Orchestrator
from services.orchestrator.settings import OrchestratorSettings
from shared.clock import SystemClock
from shared.deadletter import DeadLetters
from shared.kafka import AsyncProducer, prepare_topics
from shared.logs import configure_logging
from shared.secrets import enforce
from shared.streams import StreamWorker, run_stream_worker


def main() -> None:
    settings = OrchestratorSettings()
    configure_logging("orchestrator", settings.log_level, settings.log_format)
    enforce(settings.env, settings.secrets())
    clock = SystemClock()
    kafka = settings.kafka()
    # Delivery reports served on the worker's loop, as the segmenter's (docs/stream-processing.md).
    producer = AsyncProducer(kafka, client_id="orchestrator", serve_on_loop=True)
    catalog = DefinitionsCatalog(kafka)
    audience_progress = AudienceProgress(kafka)
    worker = StreamWorker(settings.app_id, settings, producer, clock, service="orchestrator")
    Orchestrator(
        worker,
        settings,
        clock,
        catalog,
        producer,
        DeadLetters(producer, "orchestrator", clock),
        audience_progress,
        coupon_key=settings.coupon_key(),
    )
    prepare_topics(settings, worker.changelogs())
    catalog.start()
    audience_progress.start()
    try:
        run_stream_worker(worker)
    finally:
        audience_progress.stop()
        catalog.stop()
        producer.close()


if __name__ == "__main__":
    main()
