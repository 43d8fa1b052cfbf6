"""The admin's recent-events view remembers what it wrote for a contact, so a contact heard from
again is not read back from the store; and it forgets all of it when its partitions may have
changed hands, so another member's writes meanwhile are never overwritten from memory. On the
real broker and document server."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from pymongo import MongoClient

from services.admin.adapters.recent_events import RecentEventsView, recent_event_writes
from shared.contracts import ContactEvent, Event, Profile
from shared.docstore import connect, database
from shared.settings import CommonSettings
from tests.e2e.helpers import unique, wait_for

pytestmark = pytest.mark.e2e

T = TypeVar("T")
START = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


class Loop:
    """One event loop on a thread of its own, with one document-store client, for the views of
    a test: a view can stop and run again with what it remembers."""

    def __init__(self, settings: CommonSettings) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.settings = settings
        self.client = self.call(self._connect())

    async def _connect(self) -> Any:
        return connect(self.settings, "waypost-test-recent-events")

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=60)

    def start(self, view: RecentEventsView) -> tuple[asyncio.Event, Any]:
        """Run `view` until the returned event is set (`stop`)."""

        async def make() -> asyncio.Event:
            return asyncio.Event()

        stop = self.call(make())
        running = asyncio.run_coroutine_threadsafe(view.run(stop), self._loop)
        return stop, running

    def stop(self, handle: tuple[asyncio.Event, Any]) -> None:
        stop, running = handle
        self._loop.call_soon_threadsafe(stop.set)
        running.result(timeout=60)

    def close(self) -> None:
        self.call(self.client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the views' event loop did not stop"
        self._loop.close()


@pytest.fixture
def setup(stack: Any) -> Iterator[tuple[Loop, str, str, MongoClient[dict[str, Any]]]]:
    settings = CommonSettings(
        kafka_bootstrap=stack.bootstrap, mongo_url=stack.mongo_url, topic_partitions=1
    )
    topic = unique("waypost.test-recent-events")
    admin = AdminClient({"bootstrap.servers": stack.bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    loop = Loop(settings)
    reader: MongoClient[dict[str, Any]] = MongoClient(stack.mongo_url)
    collection = topic.replace(".", "_")
    try:
        yield loop, topic, collection, reader
    finally:
        reader[settings.mongo_db][collection].drop()
        reader.close()
        loop.close()
        admin.delete_topics([topic])


def _view(loop: Loop, topic: str, collection: str, group: str) -> RecentEventsView:
    return RecentEventsView(
        loop.settings,
        database(loop.client, loop.settings),
        topic=topic,
        collection=collection,
        group_id=group,
        writes=recent_event_writes,
        name="test-recent-events",
    )


def _send(producer: Producer, topic: str, key: str, n: int, counted: int | None = None) -> str:
    """The contact's event `n`, with a profile that counts `counted` events (its n events)."""
    at = START + timedelta(minutes=n)
    event = Event(
        type="track",
        event="Product Viewed",
        user_id=key,
        message_id=f"{key}-{n}",
        timestamp=at,
        received_at=at,
        properties={"n": n},
    )
    counts = {"Product Viewed": n if counted is None else counted}
    profile = Profile(
        contact_key=key, first_seen=at, last_seen=at, updated_at=at, event_counts=counts
    )
    change = ContactEvent(contact_key=key, event=event, profile=profile)
    producer.produce(topic, key=key, value=change.to_wire())
    assert producer.flush(30) == 0
    return event.message_id


def test_a_contact_heard_from_again_is_not_read_back_unless_its_partition_moved(
    stack: Any, setup: tuple[Loop, str, str, MongoClient[dict[str, Any]]]
) -> None:
    loop, topic, collection, reader = setup
    stored = reader[loop.settings.mongo_db][collection]
    producer = Producer({"bootstrap.servers": stack.bootstrap, "enable.idempotence": True})
    group = unique("waypost-test-recent-events")
    sent: dict[str, list[str]] = {"ada": [], "bob": []}

    def holds(key: str) -> bool:
        found = stored.find_one({"_id": key})
        return found is not None and [e["id"] for e in found["events"]] == sent[key]

    def send(key: str, n: int) -> None:
        sent[key].append(_send(producer, topic, key, n))
        wait_for(lambda: holds(key), timeout=60, what=f"{key}'s events {sent[key]} stored")

    first = _view(loop, topic, collection, group)
    running = loop.start(first)
    send("ada", 1)
    send("bob", 1)
    send("ada", 2)
    send("ada", 3)
    # New contacts (their profiles count only these events) are inserted, not read; ada's
    # later events come from memory.
    assert first.reads == 0
    loop.stop(running)

    # Another member writes ada's next event while the first is away: it reads ada back.
    second = _view(loop, topic, collection, group)
    running = loop.start(second)
    send("ada", 4)
    assert second.reads == 1
    loop.stop(running)

    # The first member comes back with what it remembers, under a new consumer: it forgets
    # it and reads ada back, so the other member's event stays.
    running = loop.start(first)
    send("ada", 5)
    assert first.reads == 1
    loop.stop(running)
    assert holds("ada")
    assert holds("bob")


def test_a_contact_taken_for_new_but_stored_is_read_and_folded_not_replaced(
    stack: Any, setup: tuple[Loop, str, str, MongoClient[dict[str, Any]]]
) -> None:
    """A contact whose profile counts no earlier event is inserted without a read. When the
    store holds its document after all (an event the profile does not count, a member that
    held the partition before writing late), the refused insert becomes a read and a fold:
    the stored events stay."""
    loop, topic, collection, reader = setup
    stored = reader[loop.settings.mongo_db][collection]
    stored.insert_one({"_id": "cy", "events": [{"id": "cy-0", "at": START.isoformat()}]})
    producer = Producer({"bootstrap.servers": stack.bootstrap, "enable.idempotence": True})
    view = _view(loop, topic, collection, unique("waypost-test-recent-events"))
    running = loop.start(view)
    mine = _send(producer, topic, "cy", 1, counted=1)  # as if cy's first event
    new = _send(producer, topic, "dee", 1)

    def ids(key: str) -> list[str]:
        found = stored.find_one({"_id": key})
        return [] if found is None else [e["id"] for e in found["events"]]

    wait_for(lambda: ids("cy") == ["cy-0", mine], timeout=60, what="cy's events folded in")
    wait_for(lambda: ids("dee") == [new], timeout=60, what="dee's event inserted")
    assert view.reads == 1  # cy, once its insert was refused; dee not at all
    loop.stop(running)
