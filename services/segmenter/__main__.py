"""Start a segmenter worker: `python -m services.segmenter`."""

from __future__ import annotations

from faust.worker import Worker

from services.segmenter.app import Segmenter
from services.segmenter.settings import SegmenterSettings
from shared.clock import SystemClock
from shared.deadletter import DeadLetters
from shared.faust_app import build_faust_app
from shared.kafka import AsyncProducer, wait_for_broker
from shared.logs import configure_logging


def main() -> None:
    settings = SegmenterSettings()
    configure_logging("segmenter", settings.log_level, settings.log_format)
    wait_for_broker(settings.kafka_bootstrap)
    clock = SystemClock()
    producer = AsyncProducer(settings.kafka_bootstrap, client_id="segmenter")
    app = build_faust_app(settings.app_id, settings, data_dir=settings.data_dir / "segmenter")
    Segmenter(app, settings, clock, producer, DeadLetters(producer, "segmenter", clock))
    try:
        Worker(
            app, loglevel=settings.log_level.upper(), override_logging=False
        ).execute_from_commandline()
    finally:
        producer.close()


if __name__ == "__main__":
    main()
