"""A stream worker left outside its group, holding nothing while its input waits, joins again
and reads on from the committed offsets (shared.membership.Orphan).

The orphan is made real: the worker's librdkafka consumer is unsubscribed behind the worker's
back, so it leaves the group and holds nothing, as a consumer that never rejoined after a broker
restart did, while the worker believes it is a member with nothing to do.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from shared.clock import SystemClock
from shared.kafka import AsyncProducer, Record
from shared.settings import StreamSettings
from shared.streams import StreamWorker
from tests.e2e.helpers import unique

pytestmark = [pytest.mark.e2e]


async def test_a_worker_left_outside_its_group_joins_again_and_reads_on(
    stack: Any, tmp_path: Path
) -> None:
    topic = unique("orphan")
    admin = AdminClient({"bootstrap.servers": stack.bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(
        timeout=30
    )
    raw = Producer({"bootstrap.servers": stack.bootstrap})

    def produce(first: int, count: int) -> None:
        for n in range(first, first + count):
            raw.produce(topic, value=str(n).encode(), key=f"k{n}".encode())
        assert raw.flush(30) == 0

    app_id = unique("orphan-worker")
    settings = StreamSettings(kafka_bootstrap=stack.bootstrap, data_dir=tmp_path)
    producer = AsyncProducer(settings.kafka_bootstrap, client_id=app_id)
    worker = StreamWorker(app_id, settings, producer, SystemClock(), service="orphan")
    worker.orphan_seconds, worker.orphan_check_seconds = 4.0, 1.0
    received: list[int] = []

    async def process(records: list[Record]) -> None:
        received.extend(int(record.value) for record in records)

    worker.consume([topic], process)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))

    async def until(condition: Any, timeout: float, what: str) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    await asyncio.sleep(0.1)  # poll the worker's state; the deadline bounds it
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None

    try:
        produce(0, 6)
        await until(lambda: len(set(received)) == 6, 60, "the first records")
        first = worker._consumer
        assert first is not None
        first.unsubscribe()  # out of the group; the worker does not know
        await until(lambda: not worker.owned(), 30, "the worker to hold nothing")
        produce(6, 6)
        await until(lambda: len(set(received)) == 12, 90, "the records after the orphaning")
        assert worker._consumer is not first, "the orphaned consumer was replaced"
        assert worker.owned() == frozenset({0, 1})
        assert sorted(set(received)) == list(range(12))
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=60)
        producer.close()
