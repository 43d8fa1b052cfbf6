"""Start a dispatcher worker: `python -m services.dispatcher`."""

from __future__ import annotations

import asyncio
import logging
import signal

import httpx
import structlog
from prometheus_client import start_http_server

from services.dispatcher.adapters.metrics import DispatchMetrics
from services.dispatcher.adapters.store import (
    Caps,
    Consent,
    Ledger,
    Suppressions,
    Templates,
    ensure_indexes,
)
from services.dispatcher.channels import build_providers
from services.dispatcher.channels.email.adapter import SmtpSender
from services.dispatcher.channels.sms.adapter import SmsSender
from services.dispatcher.handlers import Dispatcher, Stores
from services.dispatcher.settings import DispatcherSettings
from shared.clock import SystemClock
from shared.deadletter import DeadLetters
from shared.docstore import connect, database
from shared.kafka import AsyncProducer, ConsumerLoop, prepare_topics, run_pipelined
from shared.links import LinkSigner
from shared.logs import configure_logging
from shared.secrets import enforce
from shared.topics import DELIVERY_REPORTS, SEND_REQUESTS, SEND_RETRIES

log = structlog.get_logger(__name__)


async def serve(settings: DispatcherSettings) -> None:
    clock = SystemClock()
    kafka = settings.kafka()
    producer = AsyncProducer(kafka, client_id="dispatcher")
    client = connect(settings, "waypost-dispatcher", max_connections=settings.store_connections)
    db = database(client, settings)
    await ensure_indexes(db)
    metrics = DispatchMetrics()
    if settings.metrics_port:
        start_http_server(
            settings.metrics_port, addr=settings.metrics_host, registry=metrics.registry
        )
    # A connection per send in flight, all kept alive: SMS, push and WeChat sends neither
    # queue for a connection nor open one per request (httpx keeps 20 alive by default).
    # Retries due at once call providers beside the requests' sends, hence the second share.
    limits = httpx.Limits(
        max_connections=2 * settings.max_in_flight,
        max_keepalive_connections=settings.max_in_flight,
        keepalive_expiry=settings.http_keepalive_seconds,
    )
    http = httpx.AsyncClient(timeout=settings.provider_timeout_seconds, limits=limits)
    providers = build_providers(settings, clock, http)
    smtp = providers["email"]
    dispatcher = Dispatcher(
        settings,
        clock,
        Stores(Ledger(db), Templates(db, clock.monotonic), Caps(db), Consent(db), Suppressions(db)),
        providers,
        LinkSigner(settings.link_secret.get_secret_value(), settings.public_url),
        producer,
        DeadLetters(producer, "dispatcher", clock),
        metrics,
        clock.monotonic,
        sms_history=sms if isinstance(sms := providers["sms"], SmsSender) else None,
    )

    def consumer(group: str, topics: list[str], client_id: str) -> ConsumerLoop:
        return ConsumerLoop(kafka, group_id=group, topics=topics, client_id=client_id)

    requests = consumer(settings.group_id, [SEND_REQUESTS.name], "dispatcher")
    retries = consumer(
        f"{settings.group_id}-retries",
        [t.name for t in SEND_RETRIES.values()],
        "dispatcher-retries",
    )
    reports = consumer(
        f"{settings.group_id}-reports", [DELIVERY_REPORTS.name], "dispatcher-reports"
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    limit = settings.max_in_flight
    log.info("dispatcher.started", channels=sorted(providers), max_in_flight=limit)
    try:
        await asyncio.gather(
            run_pipelined(requests, dispatcher.on_request, stop, limit=limit),
            # Waiting retries hold no provider slot; the bound only caps memory.
            run_pipelined(retries, dispatcher.on_retry, stop, limit=limit * 16),
            run_pipelined(reports, dispatcher.on_report, stop, limit=limit),
        )
    finally:
        for loop_ in (requests, retries, reports):
            loop_.close()
        producer.close()
        if isinstance(smtp, SmtpSender):
            await smtp.aclose()  # QUIT the pooled SMTP sessions
        await http.aclose()
        await client.close()


def main() -> None:
    settings = DispatcherSettings()
    configure_logging("dispatcher", settings.log_level, settings.log_format)
    enforce(settings.env, settings.secrets())
    # One line per provider request drowns the outcomes; failures are logged as outcomes.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    prepare_topics(settings)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
