"""Start the ingest API: `python -m services.ingest`.

The parent process checks the topics once and starts `WAYPOST_INGEST_WORKERS` worker processes,
each listening on a socket of its own (`workers.py`: the kernel spreads connections over them;
the parent restarts any that dies); each worker builds its own app and producer in
`worker_app`.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI

from services.ingest.adapters.publisher import KafkaEventPublisher
from services.ingest.app import create_app
from services.ingest.fastpath import ASGIApp
from services.ingest.settings import IngestSettings
from services.ingest.workers import Workers, run
from shared.clock import SystemClock
from shared.heap import freeze_startup_heap
from shared.kafka import prepare_topics
from shared.logs import configure_logging
from shared.secrets import enforce

log = structlog.get_logger(__name__)


def worker_logging() -> None:
    """A worker's logging, set up before uvicorn loads `worker_app` (which may fail)."""
    settings = IngestSettings()
    configure_logging("ingest", settings.log_level, settings.log_format)


def worker_app() -> ASGIApp:
    """One worker's app, built in the worker process (a producer does not survive a fork)."""
    settings = IngestSettings()
    publisher = KafkaEventPublisher(
        settings.kafka(), client_id="ingest", linger_ms=settings.ingest_linger_ms
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Full collections then skip the 75,000 objects of start-up: 34-63 ms each, about 1 ms now.
        log.info("ingest.heap_frozen", objects=freeze_startup_heap())
        try:
            yield
        finally:
            undelivered = publisher.close()
            if undelivered:
                log.warning("ingest.undelivered_at_shutdown", records=undelivered)

    return create_app(settings, publisher, SystemClock(), lifespan=lifespan)


def main() -> None:
    settings = IngestSettings()
    configure_logging("ingest", settings.log_level, settings.log_format)
    enforce(settings.env, settings.secrets())
    prepare_topics(settings)
    workers = Workers(
        "services.ingest.__main__:worker_app",
        settings.ingest_host,
        settings.ingest_port,
        settings.worker_count(),
        options={
            "factory": True,
            "log_level": settings.log_level,
            "log_config": None,  # every line goes through the service's own logging
            "access_log": False,
            # Nothing in ingest reads the client's address: no X-Forwarded-* rewriting.
            "proxy_headers": False,
            "server_header": False,
        },
        setup="services.ingest.__main__:worker_logging",
    )
    log.info("ingest.starting", port=settings.ingest_port, workers=workers.count)
    sys.exit(run(workers))


if __name__ == "__main__":
    main()
