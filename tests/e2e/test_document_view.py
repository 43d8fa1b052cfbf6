"""A document view (`shared.document_view`) keeps its collection in step with its topic while
members join and leave its consumer group: every record reaches the store within seconds of
each rebalance, on the real broker and document server."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from pymongo import MongoClient, ReplaceOne

from shared.docstore import connect, database
from shared.document_view import DocumentView, Write
from shared.kafka import Record
from shared.settings import CommonSettings
from tests.e2e.helpers import unique, wait_for

pytestmark = pytest.mark.e2e

PARTITIONS = 3
# Well under the 60 s after which a member replaces a consumer that stopped fetching: a view
# that needs that rescue to catch up after a rebalance fails here.
CATCH_UP_SECONDS = 25.0
# Joins and leaves per run (more to hunt a rare race locally).
ROUNDS = int(os.environ.get("WAYPOST_TEST_VIEW_ROUNDS", "4"))


def _writes(batch: Iterable[Record]) -> list[tuple[str, Write]]:
    latest = {record.key: record.value.decode() for record in batch if record.key is not None}
    return [
        (key, ReplaceOne({"_id": key}, {"_id": key, "value": value}, upsert=True))
        for key, value in latest.items()
    ]


class ViewMember:
    """One member of the view's group, on a thread and event loop of its own (as a service
    runs it)."""

    def __init__(self, settings: CommonSettings, topic: str, collection: str, group: str):
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._settings = settings
        self._topic, self._collection, self._group = topic, collection, group
        self._thread = threading.Thread(
            target=self._loop.run_until_complete, args=(self._follow(),), daemon=True
        )
        self._thread.start()

    async def _follow(self) -> None:
        client = connect(self._settings, "waypost-test-document-view")
        try:
            view = DocumentView(
                self._settings,
                database(client, self._settings),
                topic=self._topic,
                collection=self._collection,
                group_id=self._group,
                writes=_writes,
                name="test_view",
            )
            await view.run(self._stop)
        finally:
            await client.close()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the view did not stop"
        self._loop.close()


def test_every_record_reaches_the_store_while_members_join_and_leave(stack: Any) -> None:
    settings = CommonSettings(
        kafka_bootstrap=stack.bootstrap,
        mongo_url=stack.mongo_url,
        topic_partitions=stack.partitions,
    )
    topic, group = unique("waypost.test-view"), unique("waypost-test-view")
    collection = topic.replace(".", "_")
    admin = AdminClient({"bootstrap.servers": stack.bootstrap})
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(timeout=30)
    producer = Producer({"bootstrap.servers": stack.bootstrap, "enable.idempotence": True})
    client: MongoClient[dict[str, Any]] = MongoClient(stack.mongo_url)
    store = client[settings.mongo_db][collection]
    sent: dict[str, str] = {}

    def produce(round_: int, count: int) -> None:
        for n in range(count):
            key = f"k{n % 60}"
            value = f"{round_}-{n}"
            sent[key] = value
            producer.produce(topic, key=key, value=value)
        assert producer.flush(10) == 0

    def stored_all() -> bool:
        found = {doc["_id"]: doc["value"] for doc in store.find({})}
        return found == sent

    members = [ViewMember(settings, topic, collection, group)]
    try:
        produce(0, 120)
        wait_for(stored_all, timeout=CATCH_UP_SECONDS, what="the first records stored")
        for round_ in range(1, ROUNDS + 1):
            # Join or leave while records keep coming, so commits race the rebalance.
            produce(round_, 60)
            if round_ % 2:
                members.append(ViewMember(settings, topic, collection, group))
            else:
                members.pop().stop()
            for burst in range(5):
                produce(round_ * 10 + burst, 60)
                time.sleep(0.3)  # records spread over the rebalance, not a test's wait
            wait_for(
                stored_all,
                timeout=CATCH_UP_SECONDS,
                what=f"every record stored after rebalance {round_} ({len(members)} members)",
            )
    finally:
        for member in members:
            member.stop()
        admin.delete_topics([topic])
        store.drop()
        client.close()
