"""Call receipts against the broker (`services.dispatcher.adapters.receipts`): written the
moment a call answers, to its request's partition; found by partition, message id and try, from
a little before the try was marked, read on from where the last lookup stopped, and back when a
try marked earlier is asked about."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from structlog.testing import capture_logs

from services.dispatcher.adapters.receipts import LOOKBACK, CallReceipts
from services.dispatcher.domain.outcomes import Outcome, Receipt
from shared.kafka import AsyncProducer
from tests.e2e.helpers import filled_topic

pytestmark = [pytest.mark.e2e]


async def _found(
    receipts: CallReceipts, partition: int, message_id: str, try_id: str, marked: datetime
) -> Outcome:
    """The receipt once it is there (it is written without waiting), within a deadline."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = await receipts.find(partition, message_id, try_id, marked)
        if found is not None:
            return found.outcome
        await asyncio.sleep(0.05)
    raise AssertionError(f"no receipt of {message_id} {try_id} in partition {partition}")


async def test_a_receipt_is_found_by_its_partition_message_and_try(stack: Any) -> None:
    topic, _admin = filled_topic(stack.bootstrap, "receipts", [])
    producer = AsyncProducer(stack.bootstrap, client_id="receipts-test")
    receipts = CallReceipts(stack.bootstrap, producer, topic)
    marked = datetime.now(UTC)
    bounced = Outcome("recipient", "550 no such user", code="550", address_invalid=True)
    try:
        receipts.record(1, "m-1", "1:first", Outcome("sent", None, provider_id="SM1"))
        receipts.record(1, "m-2", "1:first", Outcome("unknown", "timed out"))  # not written
        receipts.record(1, "m-3", "2:retry", bounced)
        receipts.record(0, "m-4", "1:first", Outcome("sent", None))

        assert await _found(receipts, 1, "m-3", "2:retry", marked) == bounced
        assert await receipts.find(1, "m-1", "1:first", marked) == Receipt(
            Outcome("sent", None, provider_id="SM1")
        )
        assert await receipts.find(1, "m-2", "1:first", marked) is None
        assert await receipts.find(1, "m-3", "1:first", marked) is None  # another try's
        assert await receipts.find(1, "m-4", "1:first", marked) is None  # another partition's
        assert await _found(receipts, 0, "m-4", "1:first", marked) == Outcome("sent", None)

        # Read on from where the last lookup of the partition stopped; an email's receipt
        # says the route it went by.
        receipts.record(1, "m-5", "1:first", Outcome("sent", None), "route-1")
        assert await _found(receipts, 1, "m-5", "1:first", marked) == Outcome("sent", None)
        assert await receipts.find(1, "m-5", "1:first", marked) == Receipt(
            Outcome("sent", None), "route-1"
        )
        # The newest email of a route the server accepted, among the receipts read, with
        # when its receipt was written.
        accepted = Outcome("sent", None, provider_id="<m-6@mail.example.com>")
        receipts.record(1, "m-6", "1:first", accepted, "route-1")
        assert await _found(receipts, 1, "m-6", "1:first", marked) == accepted
        found = receipts.accepted(1, "route-1")
        assert found is not None
        assert found[0] == "<m-6@mail.example.com>"
        assert abs(found[1] - datetime.now(UTC)) < timedelta(seconds=60)
        assert receipts.accepted(1, "route-2") is None
        assert receipts.accepted(0, "route-1") is None

        # A lookup reads from the try's mark, less the margin for clocks: a worker that never
        # read the partition finds nothing written before that.
        fresh = CallReceipts(stack.bootstrap, producer, topic)
        try:
            assert await fresh.find(1, "m-1", "1:first", marked + 3 * LOOKBACK) is None
            # Then a try marked earlier than the one asked about: read back to its own mark.
            assert await fresh.find(1, "m-1", "1:first", marked) == Receipt(
                Outcome("sent", None, provider_id="SM1")
            )
        finally:
            fresh.close()
        # Partitions no longer owned are read afresh should they come back.
        receipts.forget(frozenset({0}))
        assert await receipts.find(1, "m-1", "1:first", marked - timedelta(seconds=1)) == Receipt(
            Outcome("sent", None, provider_id="SM1")
        )
    finally:
        receipts.close()
        producer.close()


async def test_a_partition_read_long_ago_is_read_again_past_what_retention_took(
    stack: Any,
) -> None:
    """A worker read a partition's receipts once, then the retention took the records after
    where it stopped: its next lookup reads from the oldest record left, not from the end."""
    topic, admin = filled_topic(stack.bootstrap, "receipts-retention", [])
    producer = AsyncProducer(stack.bootstrap, client_id="receipts-retention-test")
    receipts = CallReceipts(stack.bootstrap, producer, topic)
    marked = datetime.now(UTC)
    try:
        receipts.record(0, "m-1", "1:first", Outcome("sent", None))
        assert await _found(receipts, 0, "m-1", "1:first", marked) == Outcome("sent", None)
        for n in range(2, 6):
            receipts.record(0, f"m-{n}", "1:first", Outcome("sent", None))
        written = await _found_elsewhere(stack.bootstrap, topic, 5)
        # The retention takes every record but the last (the lookup stopped at offset 1).
        gone = admin.delete_records([TopicPartition(topic, 0, written - 1)])
        for future in gone.values():
            future.result(timeout=30)

        assert await receipts.find(0, "m-5", "1:first", marked) == Receipt(Outcome("sent", None))
        assert await receipts.find(0, "m-3", "1:first", marked) is None  # taken
    finally:
        receipts.close()
        producer.close()


async def _found_elsewhere(bootstrap: str, topic: str, count: int) -> int:
    """The partition's end once it holds `count` records (read by a consumer of its own)."""
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": "receipts-retention-probe"})
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            _low, high = reader.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
            if high >= count:
                return int(high)
            await asyncio.sleep(0.05)
        raise AssertionError(f"{topic} never held {count} records")
    finally:
        reader.close()


async def test_intents_are_read_from_an_offset_latest_per_message_and_never_taken_for_receipts(
    stack: Any,
) -> None:
    """A try's intent is acknowledged with its offset; a worker that takes the partition reads
    the intents from an offset to the end, the latest per message with its entry as written;
    a lookup of receipts passes them by."""
    topic, admin = filled_topic(stack.bootstrap, "receipts-intents", [])
    producer = AsyncProducer(stack.bootstrap, client_id="receipts-intents-test")
    receipts = CallReceipts(stack.bootstrap, producer, topic)
    marked = datetime.now(UTC)
    first_entry = json.dumps({"state": "sending", "try": "1:first", "rev": 2}).encode()
    later_entry = json.dumps({"state": "sending", "try": "2:due", "rev": 4}).encode()
    try:
        first = await receipts.intend(1, "m-1", 2, first_entry)
        receipts.record(1, "m-1", "1:first", Outcome("retry", "451 later", code="451"))
        later = await receipts.intend(1, "m-1", 4, later_entry)
        other = await receipts.intend(1, "m-2", 2, first_entry)
        elsewhere = await receipts.intend(0, "m-3", 2, first_entry)
        assert later > first
        assert other == later + 1
        assert elsewhere == 0

        found, end = await receipts.intents(1, None)  # from the oldest record
        assert end == other + 1
        assert {m: (rev, json.loads(entry)) for m, (rev, entry) in found.items()} == {
            "m-1": (4, json.loads(later_entry)),
            "m-2": (2, json.loads(first_entry)),
        }
        found, end = await receipts.intents(1, other)
        assert (list(found), end) == (["m-2"], other + 1)
        assert await receipts.intents(1, end) == ({}, end)

        # The receipt is found past the intent written after it; an intent is no receipt.
        assert await _found(receipts, 1, "m-1", "1:first", marked) == Outcome(
            "retry", "451 later", code="451"
        )
        assert await receipts.find(1, "m-2", "1:first", marked) is None

        # Read from before what the retention kept: from the oldest record left, said loudly.
        gone = admin.delete_records([TopicPartition(topic, 1, other)])
        for future in gone.values():
            future.result(timeout=30)
        with capture_logs() as logs:
            found, _ = await receipts.intents(1, first)
        assert list(found) == ["m-2"]
        assert [line["event"] for line in logs] == ["dispatcher.intents_expired"]
    finally:
        receipts.close()
        producer.close()
