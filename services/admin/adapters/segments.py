"""Where the admin reads and writes segments and contacts: live counts from the compacted
segment-counts topic, definitions on the definitions topic, stored profiles in the document
store, and contact commands to the segmenter."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from pydantic import ValidationError
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from shared.contracts import ContactCommand, Event, SegmentCount
from shared.definitions import PublishedJourneys
from shared.kafka import AsyncProducer, CompactedTopicView
from shared.kafka_connection import KafkaConnection
from shared.segments import PublishedAggregate, PublishedSegment
from shared.topics import CONTACT_COMMANDS, DEFINITIONS, EVENTS, SEGMENT_COUNTS

log = structlog.get_logger(__name__)

PROFILES = "profiles"  # written by the segmenter's profile view, `_id` = contact key


class SegmentCounts:
    """The latest count of every segment on every partition, followed from the compacted
    `waypost.segment-counts.v1`."""

    def __init__(self, kafka: KafkaConnection | str) -> None:
        self._view = CompactedTopicView(kafka, SEGMENT_COUNTS.name)

    def start(self) -> None:
        self._view.start()

    def stop(self) -> None:
        self._view.stop()

    def latest(self) -> list[SegmentCount]:
        counts = []
        for key, raw in self._view.snapshot().items():
            try:
                counts.append(SegmentCount.model_validate_json(raw))
            except ValidationError as exc:
                log.error("admin.bad_segment_count", key=key, error=str(exc))
        return counts


class SegmentDefinitions:
    """Writes segment and aggregate records (or a segment's tombstone) and waits until the
    admin's own follower has read them, so the next request sees what was just written."""

    def __init__(
        self,
        producer: AsyncProducer,
        followed: PublishedJourneys,
        timeout: float = 15.0,
        poll: float = 0.02,
    ) -> None:
        self._producer = producer
        self._followed = followed
        self._timeout = timeout
        self._poll = poll

    async def publish(self, records: Sequence[PublishedAggregate | PublishedSegment]) -> None:
        """In order, on the one partition: aggregates before the segments that read them."""
        for record in records:
            await self._producer.send(
                DEFINITIONS.name, record.key, record.model_dump_json().encode()
            )
        await self._until(lambda: all(self._holds(record) for record in records), records)

    async def delete(self, segment: PublishedSegment) -> None:
        await self._producer.send(DEFINITIONS.name, segment.key, None)
        await self._until(
            lambda: all(p.segment.id != segment.segment.id for p in self._followed.segments()),
            [segment],
        )

    def _holds(self, record: PublishedAggregate | PublishedSegment) -> bool:
        held: list[PublishedAggregate] | list[PublishedSegment] = (
            self._followed.segments()
            if isinstance(record, PublishedSegment)
            else self._followed.aggregates()
        )
        return record in held

    async def _until(
        self, seen: Callable[[], bool], records: Sequence[PublishedAggregate | PublishedSegment]
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        while not seen():
            if loop.time() > deadline:
                log.warning("admin.definition_not_followed_yet", keys=[r.key for r in records])
                return
            await asyncio.sleep(self._poll)  # the follower reads in its own thread


class Contacts:
    """Stored profiles (the `profiles` collection): one contact, or a sample of a segment."""

    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self._profiles = db[PROFILES]

    async def get(self, contact_key: str) -> dict[str, Any] | None:
        return await self._profiles.find_one({"_id": contact_key})

    async def stored(self, contact_keys: Sequence[str], chunk: int = 1000) -> set[str]:
        """Which of the keys have a stored profile (read by their ids, `chunk` at a time)."""
        held: set[str] = set()
        for start in range(0, len(contact_keys), chunk):
            wanted = list(contact_keys[start : start + chunk])
            found = self._profiles.find({"_id": {"$in": wanted}}, {"_id": 1})
            held.update([str(document["_id"]) async for document in found])
        return held

    async def in_segment(self, segment_id: str, limit: int) -> list[dict[str, Any]]:
        cursor = self._profiles.find({"segments": segment_id}).limit(limit)
        return [document async for document in cursor]

    async def sample(self, size: int) -> tuple[list[dict[str, Any]], int]:
        """Up to `size` stored profiles drawn at random (every one when there are no more), and
        how many are stored."""
        total = await self._profiles.count_documents({})
        if total <= size:
            return [document async for document in self._profiles.find({})], total
        try:
            cursor = await self._profiles.aggregate([{"$sample": {"size": size}}])
            return [document async for document in cursor], total
        except OperationFailure:  # a store without $sample: the first ones, by key
            found = self._profiles.find({}).sort("_id", 1).limit(size)
            return [document async for document in found], total


class ContactCommands:
    """Sends contact commands to the segmenter, keyed by contact (in order with its events), and
    records the consent changes an operator makes as events of Waypost's own."""

    def __init__(self, producer: AsyncProducer) -> None:
        self._producer = producer

    async def send(self, command: ContactCommand) -> None:
        """Returns once Kafka acknowledged the command (acks=all)."""
        await self._producer.send(CONTACT_COMMANDS.name, command.contact_key, command.to_wire())

    async def send_all(self, commands: Sequence[ContactCommand]) -> None:
        """Queues every command, then returns once Kafka acknowledged them all."""
        await self._producer.send_all(
            (CONTACT_COMMANDS.name, c.contact_key, c.to_wire()) for c in commands
        )

    async def record(self, event: Event) -> None:
        """Returns once Kafka acknowledged the event on the events topic."""
        await self._producer.send(EVENTS.name, event.contact_key, event.to_wire())
