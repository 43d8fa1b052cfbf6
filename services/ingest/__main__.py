"""Start the ingest API: `python -m services.ingest`."""

from __future__ import annotations

import uvicorn

from services.ingest.adapters.publisher import KafkaEventPublisher
from services.ingest.app import create_app
from services.ingest.settings import IngestSettings
from shared.clock import SystemClock
from shared.kafka import AsyncProducer, prepare_topics
from shared.logs import configure_logging


def main() -> None:
    settings = IngestSettings()
    configure_logging("ingest", settings.log_level, settings.log_format)
    prepare_topics(settings)
    producer = AsyncProducer(settings.kafka_bootstrap, client_id="ingest")
    app = create_app(settings, KafkaEventPublisher(producer), SystemClock())
    try:
        uvicorn.run(
            app,
            host=settings.ingest_host,
            port=settings.ingest_port,
            log_level=settings.log_level,
            access_log=False,
        )
    finally:
        producer.close()


if __name__ == "__main__":
    main()
