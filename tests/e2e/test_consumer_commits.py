"""A commit the broker refuses is sent again while the member still holds the partition
(`ConsumerLoop._commit_again`), so the group's committed offset reaches what was handled even
when no record of the partition comes again.

A rebalance refuses the commits of the generation it ends, and a cooperative one leaves the
partition with the member, read past the refused offset: a view whose partition then went
quiet kept its lag for good, and a test waiting for the pipeline to drain timed out. A refusal
cannot be had from a rebalance on demand, so it is made real another way: behind the loop's
back, its consumer commits the offset with metadata past the broker's limit
(`offset.metadata.max.bytes`, 4,096), which the broker refuses for that partition alone.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from shared.kafka import ConsumerLoop
from tests.e2e.helpers import filled_topic, unique

pytestmark = [pytest.mark.e2e]

TOO_MUCH_METADATA = "x" * 5000


def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> list[int]:
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        asked = [TopicPartition(topic, p) for p in range(partitions)]
        return [tp.offset for tp in reader.committed(asked, timeout=10)]
    finally:
        reader.close()


async def test_a_refused_commit_is_sent_again_while_the_partition_is_held(stack: Any) -> None:
    topic, _admin = filled_topic(stack.bootstrap, "refused-commit", [n % 2 for n in range(6)])
    group = unique("refused-commit-group")

    loop = ConsumerLoop(stack.bootstrap, group_id=group, topics=[topic], client_id="refused")
    received: list[tuple[int, int]] = []
    refused = asyncio.Event()

    async def follow() -> None:
        async for batch in loop.records(timeout=0.2):
            received.extend((r.partition, r.offset) for r in batch)
            if len(received) == 6 and not refused.is_set():
                # Both partitions read to their ends (offset 3). Partition 0's commit is refused;
                # partition 1 is no longer held when its commit is refused (as after a
                # rebalance that moved it), so it is not sent again.
                loop._committed_at[(topic, 0)] = 3
                loop._committed_at[(topic, 1)] = 3
                loop._consumer.incremental_unassign([TopicPartition(topic, 1)])
                loop._consumer.commit(
                    offsets=[
                        TopicPartition(topic, p, 3, metadata=TOO_MUCH_METADATA) for p in (0, 1)
                    ],
                    asynchronous=True,
                )
                refused.set()

    reader = asyncio.create_task(follow())
    try:
        async with asyncio.timeout(90):
            await refused.wait()
            while _committed(stack.bootstrap, group, topic, 2)[0] != 3:
                await asyncio.sleep(0.2)  # ask again; the timeout bounds the wait
        assert sorted(received) == [(p, o) for p in (0, 1) for o in range(3)]
        # The commit of the partition no longer held was not sent again: nothing is committed
        # there (a negative offset: none). The loop has had several seconds of polls to do it.
        assert _committed(stack.bootstrap, group, topic, 2)[1] < 0
    finally:
        loop.close()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
