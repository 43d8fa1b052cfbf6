"""Materialises `waypost.journey-log.v1` into the document store for analytics and the admin.

A `forgotten` record (the orchestrator erased the contact, after every other record of theirs on
the partition) deletes the contact's documents instead of adding one."""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial
from typing import Any

import structlog
from pydantic import ValidationError
from pymongo import InsertOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from shared.contracts import JourneyLogRecord
from shared.deadletter import through_outages
from shared.docstore import bulk_write_unordered
from shared.document_view import DUPLICATE_KEY, RESTART_SECONDS
from shared.kafka import ConsumerLoop

log = structlog.get_logger(__name__)

JOURNEY_LOG = "journey_log"
# Journey-log records per bulk write at most. The view runs on the API's event loop, and a
# batch's validation and encoding (about 10 µs a record: parse, dump, BSON) hold requests up
# meanwhile: a busy second of the log is written in a few batches, each holding it ~10 ms.
BATCH_RECORDS = 1000


class JourneyLogStore:
    def __init__(self, db: AsyncDatabase[dict[str, Any]]) -> None:
        self._log = db[JOURNEY_LOG]

    async def prepare(self) -> None:
        """Erasure deletes by contact, and the web UI reads a journey's records, hence the
        indexes."""
        await self._log.create_index("contact_key")
        await self._log.create_index("journey_id")

    async def write(self, records: list[JourneyLogRecord]) -> None:
        """Idempotent on `record_id`: replays leave one document per record. Erased contacts'
        documents are deleted once the batch's others are written (their records came first)."""
        kept = [r for r in records if r.kind != "forgotten"]
        forgotten = sorted({r.contact_key for r in records if r.kind == "forgotten"})
        if kept:
            # Inserts, not upserts: a replayed record's copy is refused by the unique id, with
            # no lookup before each write. Fields at their defaults (no reason, no detail, not
            # in the holdout) are left out: the store's cost grows with a document's fields,
            # and its readers put the defaults back (`Insights`).
            try:
                await bulk_write_unordered(
                    self._log,
                    [
                        InsertOne(
                            {
                                "_id": r.record_id,
                                **r.model_dump(
                                    mode="python", exclude={"record_id"}, exclude_defaults=True
                                ),
                            }
                        )
                        for r in kept
                    ],
                )
            except BulkWriteError as exc:
                others = [
                    error
                    for error in exc.details.get("writeErrors", [])
                    if error.get("code") != DUPLICATE_KEY
                ]
                if others or exc.details.get("writeConcernErrors"):
                    raise BulkWriteError({**exc.details, "writeErrors": others}) from exc
        if forgotten:
            deleted = await self._log.delete_many({"contact_key": {"$in": forgotten}})
            log.info(
                "admin.journey_log_forgotten",
                contacts=len(forgotten),
                deleted=deleted.deleted_count,
            )

    async def counts(self) -> dict[str, dict[str, int]]:
        """Per journey, how many log records of each kind."""
        result: dict[str, dict[str, int]] = {}
        cursor = await self._log.aggregate(
            [{"$group": {"_id": {"journey": "$journey_id", "kind": "$kind"}, "n": {"$sum": 1}}}]
        )
        async for row in cursor:
            result.setdefault(row["_id"]["journey"], {})[row["_id"]["kind"]] = row["n"]
        return result

    async def conversion_counts(self, journey_id: str) -> dict[tuple[bool, str], int]:
        """Distinct instances that entered and that converted, split by holdout."""
        cursor = await self._log.aggregate(
            [
                {"$match": {"journey_id": journey_id, "kind": {"$in": ["entered", "converted"]}}},
                {
                    "$group": {
                        "_id": {
                            "instance": "$instance_id",
                            "kind": "$kind",
                            "holdout": "$holdout",
                        }
                    }
                },
                {
                    "$group": {
                        "_id": {"kind": "$_id.kind", "holdout": "$_id.holdout"},
                        "n": {"$sum": 1},
                    }
                },
            ]
        )
        return {
            (bool(row["_id"].get("holdout")), str(row["_id"]["kind"])): int(row["n"])
            async for row in cursor
        }


async def message_states(db: AsyncDatabase[dict[str, Any]]) -> dict[str, int]:
    """How many ledger entries are in each state (the dispatcher's `messages` collection)."""
    cursor = await db["messages"].aggregate([{"$group": {"_id": "$state", "n": {"$sum": 1}}}])
    return {str(row["_id"]): int(row["n"]) async for row in cursor}


async def follow_journey_log(
    consumer: ConsumerLoop, store: JourneyLogStore, stop: asyncio.Event, batch_seconds: float
) -> None:
    """Write the journey log in bulk: what arrived within `batch_seconds` (the views' setting,
    `WAYPOST_VIEW_BATCH_SECONDS`), up to `BATCH_RECORDS`, per write."""
    await through_outages(store.prepare, what="journey-log view")
    while not stop.is_set():
        try:
            await _follow(consumer, store, stop, batch_seconds)
        except Exception:
            log.exception("admin.journey_log_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RESTART_SECONDS)


async def _follow(
    consumer: ConsumerLoop, store: JourneyLogStore, stop: asyncio.Event, batch_seconds: float
) -> None:
    async for batch in consumer.records(batch=BATCH_RECORDS, timeout=batch_seconds):
        records = []
        for record in batch:
            try:
                records.append(JourneyLogRecord.model_validate_json(record.value))
            except ValidationError as exc:
                log.error("admin.bad_journey_log", offset=record.offset, error=str(exc))
        # A store outage holds the view (the offsets wait) until the store answers again.
        await through_outages(partial(store.write, records), what="journey-log view")
        if batch:
            consumer.commit(batch)
        if stop.is_set():
            return
