"""A consumer whose fetching stopped while its partitions still hold records is replaced by a
new one, which reads on from the committed offsets (shared.membership.Progress).

The stall is made real: the librdkafka consumer under a `ConsumerLoop` is paused behind the
loop's back, so it stops fetching exactly as a fetcher left stuck by a broker restart did, with
its group membership settled and the loop believing it fetches.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from shared.kafka import ConsumerLoop
from shared.membership import Watermarks
from tests.e2e.helpers import filled_topic, unique

pytestmark = [pytest.mark.e2e]


async def test_a_consumer_that_stopped_fetching_is_replaced_and_reads_on(stack: Any) -> None:
    topic = unique("stall")
    admin = AdminClient({"bootstrap.servers": stack.bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(
        timeout=30
    )
    producer = Producer({"bootstrap.servers": stack.bootstrap})

    def produce(first: int, count: int) -> None:
        for n in range(first, first + count):
            producer.produce(topic, value=str(n).encode(), key=b"k")
        assert producer.flush(30) == 0

    loop = ConsumerLoop(
        stack.bootstrap,
        group_id=unique("stall-group"),
        topics=[topic],
        client_id="stall",
        stall_seconds=4,
    )
    received: list[int] = []

    async def follow() -> None:
        async for batch in loop.records(timeout=0.2):
            received.extend(int(r.value) for r in batch)
            loop.commit(batch)

    reader = asyncio.create_task(follow())

    async def wait_received(count: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while len(set(received)) < count:
                await asyncio.sleep(0.1)  # poll the shared list; the deadline bounds the wait

    try:
        produce(0, 5)
        await wait_received(5, 60)
        first = loop._consumer
        first.pause(first.assignment())  # fetching stops; the loop does not know
        produce(5, 5)
        await wait_received(10, 90)
        assert loop._consumer is not first, "the stalled consumer was replaced"
        assert sorted(set(received)) == list(range(10))
    finally:
        loop.close()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


def test_watermarks_of_many_partitions_come_from_the_broker_in_one_ask(stack: Any) -> None:
    topic, admin = filled_topic(stack.bootstrap, "marks", [0] * 5)
    watermarks = Watermarks({"bootstrap.servers": stack.bootstrap})
    assert watermarks([(topic, 0), (topic, 1)]) == {(topic, 0): (0, 5), (topic, 1): (0, 0)}
    # Records deleted below offset 2 move the low watermark.
    deleted = admin.delete_records([TopicPartition(topic, 0, 2)])
    for future in deleted.values():
        future.result(timeout=30)
    assert watermarks([(topic, 0)]) == {(topic, 0): (2, 5)}
    assert watermarks([]) == {}
