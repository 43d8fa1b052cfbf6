"""A document view (`shared.document_view`) for the end-to-end tests, run as a process:
`python -m tests.e2e.view_member TOPIC COLLECTION GROUP` with `WAYPOST_*` settings.

Each record of TOPIC becomes the document `{"_id": key, "value": value}` of COLLECTION (the
batch's last value per key), the way the services' views write. It runs until SIGTERM; a test
may SIGSTOP it to keep it out of its group past its session.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Iterable
from typing import Any

from pymongo import ReplaceOne
from pymongo.asynchronous.database import AsyncDatabase

from shared.docstore import connect, database
from shared.document_view import DocumentView, Write
from shared.kafka import Record
from shared.logs import configure_logging
from shared.settings import CommonSettings


def latest_values(batch: Iterable[Record]) -> list[tuple[str, Write]]:
    latest = {record.key: record.value.decode() for record in batch if record.key is not None}
    return [
        (key, ReplaceOne({"_id": key}, {"_id": key, "value": value}, upsert=True))
        for key, value in latest.items()
    ]


def view(
    settings: CommonSettings,
    db: AsyncDatabase[dict[str, Any]],
    topic: str,
    collection: str,
    group: str,
) -> DocumentView:
    return DocumentView(
        settings,
        db,
        topic=topic,
        collection=collection,
        group_id=group,
        writes=latest_values,
        name="test_view",
    )


async def follow(topic: str, collection: str, group: str) -> None:
    settings = CommonSettings()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    client = connect(settings, "waypost-test-view-member")
    try:
        await view(settings, database(client, settings), topic, collection, group).run(stop)
    finally:
        await client.close()


if __name__ == "__main__":
    configure_logging("view-member", "info", "json")
    asyncio.run(follow(*sys.argv[1:4]))
