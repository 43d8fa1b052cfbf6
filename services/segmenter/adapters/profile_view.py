"""Materialises the compacted profiles topic into the document store's `profiles` collection, so
the admin can look a contact up and sample a segment's members without asking the workers.

The segmenter process runs it next to its stream worker, on a thread and event loop of its own
(`services/segmenter/__main__.py`), and stops it on shutdown:

    view = ProfileView(settings, database(connect(settings, "waypost-profile-view"), settings))
    task = asyncio.ensure_future(view.run(stop))
    ...
    stop.set(); await task                         # returns within ~200 ms; closes its consumer

It is a consumer group of its own (`waypost-profile-view`), so it keeps up independently of the
workers and several segmenter processes share its partitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import structlog
from pydantic import ValidationError
from pymongo import DeleteOne, ReplaceOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, PyMongoError

from shared.contracts import Profile
from shared.docstore import bulk_write_unordered
from shared.kafka import ConsumerLoop, Record
from shared.settings import CommonSettings
from shared.topics import PROFILES

log = structlog.get_logger(__name__)

COLLECTION = "profiles"
GROUP_ID = "waypost-profile-view"
# One bulk write per batch: up to this many records, or what arrived within this many seconds.
BATCH_RECORDS = 500
BATCH_SECONDS = 0.2
# Backoff between retries of a failed store write.
RETRY_FIRST = 0.2
RETRY_MAX = 5.0
# Internal de-duplication state of the segmenter, of no use to readers of the store.
NOT_STORED = frozenset({"recent_message_ids"})

Write = ReplaceOne[dict[str, Any]] | DeleteOne


class ProfileView:
    """Keeps one document per contact (`_id` = contact key) in step with the profiles topic; a
    tombstone (the contact was forgotten) deletes it. Offsets are committed only after the
    batch's writes succeeded, so a crash repeats writes at worst, and writes are idempotent."""

    def __init__(
        self,
        settings: CommonSettings,
        database: AsyncDatabase[dict[str, Any]],
        *,
        group_id: str = GROUP_ID,
    ) -> None:
        self._settings = settings
        self._profiles: AsyncCollection[dict[str, Any]] = database[COLLECTION]
        self._group_id = group_id

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the topic until `stop` is set."""
        if not await self._retrying(self._create_indexes, stop):
            return
        consumer = ConsumerLoop(
            self._settings.kafka(),
            group_id=self._group_id,
            topics=[PROFILES.name],
            client_id="profile-view",
        )
        try:
            async for batch in consumer.records(batch=BATCH_RECORDS, timeout=BATCH_SECONDS):
                if batch:
                    write = functools.partial(self._write, profile_writes(batch))
                    if not await self._retrying(write, stop):
                        return  # stopped before the batch was stored: not committed
                    # A commit lost to a rebalance is harmless: the new owner of these
                    # partitions writes the same records again, and the upserts are idempotent.
                    consumer.commit(batch)
                if stop.is_set():
                    return
        finally:
            consumer.close()

    async def _create_indexes(self) -> None:
        # Segment member samples look profiles up by segment id.
        await self._profiles.create_index("segments")

    async def _write(self, writes: list[tuple[str, Write]]) -> None:
        if not writes:
            return
        try:
            await bulk_write_unordered(self._profiles, [w for _key, w in writes])
        except BulkWriteError as exc:
            if exc.details.get("writeConcernErrors"):
                raise
            # The store refused some documents; the same document would be refused again.
            for error in exc.details.get("writeErrors", []):
                log.error(
                    "profile_view.document_refused",
                    key=writes[error["index"]][0],
                    error=error.get("errmsg"),
                )

    async def _retrying(
        self, operation: Callable[[], Awaitable[None]], stop: asyncio.Event
    ) -> bool:
        """Run `operation` until it succeeds (True) or `stop` is set first (False), backing off
        exponentially between store errors."""
        delay = RETRY_FIRST
        while True:
            try:
                await operation()
                return True
            except PyMongoError as exc:
                log.warning("profile_view.store_error", error=str(exc), retry_in=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            if stop.is_set():
                return False
            delay = min(delay * 2, RETRY_MAX)


def profile_writes(batch: Iterable[Record]) -> list[tuple[str, Write]]:
    """One write per contact key: the batch's last profile of it, or a delete for a tombstone."""
    latest: dict[str, Profile | None] = {}
    for record in batch:
        if record.key is None:
            log.error("profile_view.record_without_key", offset=record.offset)
            continue
        if not record.value:
            latest[record.key] = None
            continue
        try:
            latest[record.key] = Profile.model_validate_json(record.value)
        except ValidationError as exc:
            log.error(
                "profile_view.undecodable",
                key=record.key,
                partition=record.partition,
                offset=record.offset,
                error=str(exc),
            )
    return [
        (
            key,
            DeleteOne({"_id": key})
            if profile is None
            else ReplaceOne({"_id": key}, profile_document(profile), upsert=True),
        )
        for key, profile in latest.items()
    ]


def profile_document(profile: Profile) -> dict[str, Any]:
    """A profile as stored: its fields, datetimes as dates, keys escaped (see `storable`)."""
    fields = profile.model_dump(mode="python", exclude=set(NOT_STORED))
    document = storable(fields)
    assert isinstance(document, dict)
    return document


# The store refuses '.' and a leading '$' in field names, and NUL anywhere; traits, event names
# and aggregate ids are chosen by people. '%' is escaped too, so the mapping is reversible.
_ESCAPES = (("%", "%25"), (".", "%2E"), ("$", "%24"), ("\x00", "%00"))
_INT64 = (-(2**63), 2**63 - 1)


def storable(value: Any) -> Any:
    """A value the document store keeps as given: every mapping key escaped ('.' -> '%2E',
    '$' -> '%24', NUL -> '%00', '%' -> '%25'), and integers beyond 64 bits as decimal strings."""
    if isinstance(value, Mapping):
        return {_escape(str(key)): storable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [storable(item) for item in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return value if _INT64[0] <= value <= _INT64[1] else str(value)
    return value


def _escape(key: str) -> str:
    for plain, escaped in _ESCAPES:
        key = key.replace(plain, escaped)
    return key
