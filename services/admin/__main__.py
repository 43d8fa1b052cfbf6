"""Start the admin API: `python -m services.admin`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import Any

import uvicorn
from pymongo.asynchronous.database import AsyncDatabase

from services.admin.adapters.analytics import JourneyLogStore, follow_journey_log
from services.admin.adapters.catalog import PublishedJourneys
from services.admin.app import create_app
from services.admin.settings import AdminSettings
from shared.docstore import connect, database
from shared.kafka import ConsumerLoop, topic_record_count, wait_for_broker
from shared.logs import configure_logging
from shared.topics import EVENTS, JOURNEY_LOG


async def _message_counts(db: AsyncDatabase[dict[str, Any]]) -> dict[str, int]:
    cursor = await db["messages"].aggregate([{"$group": {"_id": "$state", "n": {"$sum": 1}}}])
    return {str(row["_id"]): int(row["n"]) async for row in cursor}


async def serve(settings: AdminSettings) -> None:
    client = connect(settings, "waypost-admin")
    db = database(client, settings)
    journeys = PublishedJourneys(settings.kafka_bootstrap)
    journeys.start()
    store = JourneyLogStore(db)
    consumer = ConsumerLoop(
        settings.kafka_bootstrap,
        group_id=f"{settings.group_id}-journey-log",
        topics=[JOURNEY_LOG.name],
        client_id="admin",
    )
    app = create_app(
        settings,
        journeys,
        store,
        functools.partial(_message_counts, db),
        functools.partial(topic_record_count, settings.kafka_bootstrap, EVENTS.name),
    )
    stop = asyncio.Event()
    follower = asyncio.create_task(follow_journey_log(consumer, store, stop))
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=settings.admin_host, port=settings.admin_port, log_level=settings.log_level
        )
    )
    try:
        await server.serve()
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(follower, timeout=5)
        consumer.close()
        journeys.stop()
        await client.close()


def main() -> None:
    settings = AdminSettings()
    configure_logging("admin", settings.log_level, settings.log_format)
    wait_for_broker(settings.kafka_bootstrap)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
