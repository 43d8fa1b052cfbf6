"""Start an orchestrator worker: `python -m services.orchestrator`."""

from __future__ import annotations

from services.orchestrator.adapters.audience_schedule import AudienceProgress
from services.orchestrator.adapters.definitions import DefinitionsCatalog
from services.orchestrator.app import Orchestrator
from services.orchestrator.settings import OrchestratorSettings
from shared.clock import SystemClock
from shared.deadletter import DeadLetters
from shared.faust_app import build_faust_app, run_worker
from shared.kafka import AsyncProducer, prepare_topics
from shared.logs import configure_logging


def main() -> None:
    settings = OrchestratorSettings()
    configure_logging("orchestrator", settings.log_level, settings.log_format)
    prepare_topics(settings)
    clock = SystemClock()
    producer = AsyncProducer(settings.kafka_bootstrap, client_id="orchestrator")
    catalog = DefinitionsCatalog(settings.kafka_bootstrap)
    catalog.start()
    audience_progress = AudienceProgress(settings.kafka_bootstrap)
    audience_progress.start()
    app = build_faust_app(settings.app_id, settings, data_dir=settings.data_dir / "orchestrator")
    Orchestrator(
        app,
        settings,
        clock,
        catalog,
        producer,
        DeadLetters(producer, "orchestrator", clock),
        audience_progress,
    )
    try:
        run_worker(app, settings)
    finally:
        audience_progress.stop()
        catalog.stop()
        producer.close()


if __name__ == "__main__":
    main()
