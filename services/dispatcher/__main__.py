"""Start a dispatcher worker: `python -m services.dispatcher`."""

from __future__ import annotations

import asyncio
import signal

from services.dispatcher.adapters.email import SmtpSender
from services.dispatcher.adapters.store import Ledger, Templates
from services.dispatcher.handlers import Dispatcher
from services.dispatcher.settings import DispatcherSettings
from shared.clock import SystemClock
from shared.deadletter import DeadLetters
from shared.docstore import connect, database
from shared.kafka import AsyncProducer, ConsumerLoop, wait_for_broker
from shared.logs import configure_logging
from shared.topics import SEND_REQUESTS


async def serve(settings: DispatcherSettings) -> None:
    clock = SystemClock()
    producer = AsyncProducer(settings.kafka_bootstrap, client_id="dispatcher")
    client = connect(settings, "waypost-dispatcher")
    db = database(client, settings)
    dispatcher = Dispatcher(
        settings,
        clock,
        Ledger(db),
        Templates(db),
        SmtpSender(settings),
        producer,
        DeadLetters(producer, "dispatcher", clock),
    )
    consumer = ConsumerLoop(
        settings.kafka_bootstrap,
        group_id=settings.group_id,
        topics=[SEND_REQUESTS.name],
        client_id="dispatcher",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await dispatcher.run(consumer, stop)
    finally:
        consumer.close()
        producer.close()
        await client.close()


def main() -> None:
    settings = DispatcherSettings()
    configure_logging("dispatcher", settings.log_level, settings.log_format)
    wait_for_broker(settings.kafka_bootstrap)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
