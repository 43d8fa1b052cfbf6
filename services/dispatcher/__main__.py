"""Start a dispatcher worker: `python -m services.dispatcher`."""

from __future__ import annotations

import asyncio
import signal
from datetime import timedelta

import structlog
from prometheus_client import start_http_server

from services.dispatcher.adapters.ledger_view import ledger_view
from services.dispatcher.adapters.metrics import DispatchMetrics
from services.dispatcher.adapters.receipts import CallReceipts
from services.dispatcher.adapters.store import ChannelPauses, Templates
from services.dispatcher.adapters.suppressions import SuppressionList, move_legacy_suppressions
from services.dispatcher.adapters.tables import (
    CAPS,
    CONSENT,
    FORGOTTEN,
    INTENTS,
    LEDGER,
    Caps,
    Consent,
    ForgottenContacts,
    IntentsFrom,
    Ledger,
)
from services.dispatcher.channels import build_providers
from services.dispatcher.channels.email.adapter import SmtpSender
from services.dispatcher.channels.email.events import QUERIES_IN_FLIGHT, email_events
from services.dispatcher.channels.http import ProviderClient
from services.dispatcher.channels.sms.adapter import SmsSender
from services.dispatcher.handlers import Dispatcher, Stores, retry_due
from services.dispatcher.settings import DispatcherSettings
from shared import event_loop
from shared.channels import CHANNELS
from shared.clock import SystemClock
from shared.deadletter import DeadLetters
from shared.docstore import connect, database
from shared.document_view import run_view_thread
from shared.heap import collect_less_often, freeze_startup_heap
from shared.kafka import AsyncProducer, CompactedTopicView, Record, prepare_topics
from shared.links import LinkSigner
from shared.logs import configure_logging
from shared.secrets import enforce
from shared.streams import StreamWorker, transactional_config, worker_name
from shared.topics import DELIVERY_REPORTS, SEND_REQUESTS, SEND_RETRIES, SUPPRESSIONS

log = structlog.get_logger(__name__)


async def serve(settings: DispatcherSettings, worker: StreamWorker, clock: SystemClock) -> None:
    producer = worker.producer
    client = connect(settings, "waypost-dispatcher", max_connections=settings.store_connections)
    db = database(client, settings)
    metrics = DispatchMetrics()
    if settings.metrics_port:
        start_http_server(
            settings.metrics_port, addr=settings.metrics_host, registry=metrics.registry
        )
    # A connection per send in flight, all kept alive: SMS, push and WeChat sends neither
    # queue for a connection nor open one per request.
    http = ProviderClient(
        max_connections=sum(settings.in_flight(c) for c in CHANNELS if c != "email")
        + (QUERIES_IN_FLIGHT if settings.email_events_url else 0),
        timeout=settings.provider_timeout_seconds,
        keepalive_seconds=settings.http_keepalive_seconds,
    )
    providers = build_providers(settings, clock, http)
    smtp = providers["email"]

    # Every worker reads the whole suppression list; the sends wait until it is read.
    suppressed = CompactedTopicView(settings.kafka(), SUPPRESSIONS.name)
    suppressed.start()
    key = settings.suppression_secret.get_secret_value().encode()
    legacy = AsyncProducer(settings.kafka(), client_id="dispatcher-suppressions")
    try:
        await move_legacy_suppressions(db, SuppressionList(suppressed, legacy, key), legacy)
    finally:
        legacy.close()
    while not await asyncio.to_thread(suppressed.wait_caught_up, 5.0):
        log.info("dispatcher.waiting_for_suppressions")
    suppressions = SuppressionList(suppressed, producer, key)

    # Intents and receipts are written outside the batch's transaction, each the moment its
    # try needs it, and sent within `receipts_linger_ms`: a receipt the broker has not
    # acknowledged when the worker dies is of no use, and the tries in flight share requests.
    # Their acknowledgements are served on the event loop: each try waits for its intent's
    # before its call, and a poll thread's hand-off through the GIL was half that wait.
    receipted = AsyncProducer(
        settings.kafka(),
        client_id="dispatcher-receipts",
        extra={"linger.ms": settings.receipts_linger_ms},
        serve_on_loop=True,
    )
    receipts = CallReceipts(settings.kafka(), receipted)

    async def no_batch(_message_id: str, _rev: int, _entry: bytes) -> None:
        raise RuntimeError("a try began outside a batch")

    dispatcher = Dispatcher(
        settings,
        clock,
        Stores(
            Ledger(worker.tables[LEDGER], no_batch),
            Templates(db, clock.monotonic),
            Caps(worker.tables[CAPS]),
            Consent(worker.tables[CONSENT]),
            suppressions,
            ForgottenContacts(worker.tables[FORGOTTEN], key),
            IntentsFrom(worker.tables[INTENTS]),
        ),
        providers,
        LinkSigner(settings.link_secret.get_secret_value(), settings.public_url),
        producer,
        DeadLetters(producer, "dispatcher", clock),
        metrics,
        clock.monotonic,
        sms_history=sms if isinstance(sms := providers["sms"], SmsSender) else None,
        email_history=email_events(settings, http),
        pauses=ChannelPauses(
            db,
            worker_name(settings),
            timedelta(seconds=settings.provider_pause_seconds),
        ),
        receipts=receipts,
    )

    async def process(records: list[Record]) -> None:
        await dispatcher.process(
            records, worker.prove_owner, worker.owner_within_lease, worker.held_since
        )

    worker.on_assignment(dispatcher.on_assignment)
    worker.consume([SEND_REQUESTS.name, DELIVERY_REPORTS.name], process)
    worker.consume([t.name for t in SEND_RETRIES.values()], process, due=retry_due)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "dispatcher.started",
        channels=sorted(providers),
        in_flight={channel: settings.in_flight(channel) for channel in sorted(providers)},
    )
    log.info("dispatcher.heap_frozen", objects=freeze_startup_heap())
    collect_less_often()
    try:
        await worker.run(stop)
    finally:
        if isinstance(smtp, SmtpSender):
            await smtp.aclose()  # QUIT the pooled SMTP sessions
        await http.aclose()
        await client.close()
        suppressed.stop()
        receipts.close()
        receipted.close()


def main() -> None:
    settings = DispatcherSettings()
    configure_logging("dispatcher", settings.log_level, settings.log_format)
    enforce(settings.env, settings.secrets())
    clock = SystemClock()
    producer = AsyncProducer(
        settings.kafka(),
        client_id="dispatcher",
        extra=transactional_config(settings.app_id, settings),
    )
    worker = StreamWorker(
        settings.app_id, settings, producer, clock, service="dispatcher", transactional=True
    )
    worker.table(CAPS)
    worker.table(CONSENT)
    worker.table(FORGOTTEN)
    worker.table(INTENTS)
    worker.table(LEDGER, primary=True)
    prepare_topics(settings, worker.changelogs())
    stop_view = run_view_thread(
        settings, "waypost-ledger-view", lambda db: ledger_view(settings, db, settings.app_id)
    )
    try:
        event_loop.run(serve(settings, worker, clock), settings.event_loop)
    finally:
        stop_view()
        producer.close()


if __name__ == "__main__":
    main()
