"""A topic materialised into a document-store collection for the admin, written in bulk.

The segmenter keeps `profiles` this way (from `waypost.profiles.v1`) and the dispatcher keeps
`messages` (from its ledger table's changelog). A view is a consumer group of its own, so it
keeps up independently of the workers, and no worker's hot path waits on the store. Offsets are
committed only after a batch's writes succeeded, so a crash repeats writes at worst, and writes
are idempotent (whole documents by `_id`).

A versioned view (`version`: a field every document carries, growing with each change of it)
never puts an older document over a newer one: a member that was paused with a batch in hand
while its partitions moved on, and writes it late, leaves the newer documents as they are. Its
documents come as `InsertOne`s and are each written only over a lower version
(`shared.docstore.replace_unless_newer`); one stored at the same version or a higher one is
refused as a duplicate key, which means there is nothing to do. A document the view has not
stored before is tried as a plain insert first, far cheaper on the local store; refused (it is
stored after all), it takes the same conditional way.

A service runs its view on a thread and event loop of its own (`run_view_thread`), so the view
never takes time from the worker's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog
from pymongo import DeleteOne, InsertOne, ReplaceOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, PyMongoError

from shared import event_loop
from shared.docstore import bulk_write_unordered, connect, database, replace_unless_newer
from shared.kafka import ConsumerLoop, Record
from shared.settings import CommonSettings

log = structlog.get_logger(__name__)

# One bulk write per batch: up to this many records, or what arrived within
# `view_batch_seconds` (a setting, 2 s by default). A view behind a burst takes large batches,
# so the changes of one document (a message's requested, sending and sent) fold into one write:
# the document server spends most of its time per operation, and a replacement costs it more
# than an insert. With 500 the ledger view took over a minute to show a burst of 3,000 SMS;
# with 5,000, about 25 s. At a steady rate, 0.2 s of records split most messages' changes over
# two or three writes; 1 s folds most of them into one, 2 s most of a contact's session and
# what follows it (docs/document-store.md).
BATCH_RECORDS = 5000
# Backoff between retries of a failed store write.
RETRY_FIRST = 0.2
RETRY_MAX = 5.0
# How long a view that failed waits before it starts again.
RESTART_SECONDS = 5.0

DUPLICATE_KEY = 11000
# Tries of a versioned document the store refused for another reason than holding it already,
# and the first pause between them (doubling).
REFUSED_TRIES = 5
REFUSED_RETRY_FIRST = 0.2
# How many document ids a versioned view remembers having stored (about 100 bytes each).
STORED_IDS = 100_000
# The version documents stored before their view was versioned are given: any version replaces.
UNVERSIONED = -1

Write = ReplaceOne[dict[str, Any]] | DeleteOne | InsertOne[dict[str, Any]]
# A batch of records as writes, one per document key (the batch's last word on it).
Writes = Callable[[Iterable[Record]], list[tuple[str, Write]]]


class DocumentView:
    """Keeps `collection` in step with `topic`: `writes` turns each batch into one write per
    document; `indexes` are created once before the first batch."""

    def __init__(
        self,
        settings: CommonSettings,
        database: AsyncDatabase[dict[str, Any]],
        *,
        topic: str,
        collection: str,
        group_id: str,
        writes: Writes,
        indexes: Iterable[str] = (),
        name: str = "view",
        version: str | None = None,
    ) -> None:
        self._settings = settings
        self._collection: AsyncCollection[dict[str, Any]] = database[collection]
        self._topic = topic
        self._group_id = group_id
        self._writes = writes
        self._indexes = tuple(indexes)
        self._name = name
        self._version = version
        # Ids this view stored, the most recent last: their next version goes straight to the
        # conditional replacement; any other is tried as a plain insert first.
        self._stored: dict[str, None] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the topic until `stop` is set."""
        if not await self._retrying(self._create_indexes, stop):
            return
        consumer = ConsumerLoop(
            self._settings.kafka(),
            group_id=self._group_id,
            topics=[self._topic],
            client_id=self._name,
        )
        try:
            batches = consumer.records(
                batch=BATCH_RECORDS, timeout=self._settings.view_batch_seconds
            )
            async for batch in batches:
                self._held_since(consumer.rebalances)
                if batch:
                    write = functools.partial(self._write, self._writes(batch))
                    if not await self._retrying(write, stop):
                        return  # stopped before the batch was stored: not committed
                    # A commit a rebalance refuses is sent again while this member holds the
                    # partition (`ConsumerLoop`); one that moved on is its new owner's, who
                    # writes the same records again, and the writes are idempotent.
                    consumer.commit(batch)
                if stop.is_set():
                    return
        finally:
            consumer.close()

    def _held_since(self, rebalances: int) -> None:
        """Called before each batch with the consumer's count of rebalances: a view that
        remembers what it wrote for its partitions' keys forgets it when the count moved."""

    async def _create_indexes(self) -> None:
        for field in self._indexes:
            await self._collection.create_index(field)
        if self._version is not None:
            await self._collection.update_many(
                {self._version: {"$exists": False}}, {"$set": {self._version: UNVERSIONED}}
            )

    async def _write(self, writes: list[tuple[str, Write]]) -> None:
        version = self._version
        plain = [(k, w) for k, w in writes if version is None or not isinstance(w, InsertOne)]
        await self._bulk([w for _k, w in plain], keys=[k for k, _w in plain])
        if version is not None:
            entries = [(k, w._doc) for k, w in writes if isinstance(w, InsertOne)]
            await self._write_versioned(entries, version)

    async def _write_versioned(
        self, entries: list[tuple[str, dict[str, Any]]], version: str
    ) -> None:
        """Each document inserted, or put over a lower version of itself. A duplicate key means
        the store holds this version or a later one: nothing to do. Any other refusal of one
        document (the store busy, a statement it gave up on) is tried again, that document
        alone, a few times with a pause: a view that skipped it would show an older state for
        good, since no later record of it may come."""
        written = [doc["_id"] for _k, doc in entries]
        entries = await self._insert_new(entries)
        await self._replace_versioned(entries, version)
        self._remember_stored(written)

    async def _insert_new(
        self, entries: list[tuple[str, dict[str, Any]]]
    ) -> list[tuple[str, dict[str, Any]]]:
        """Insert the documents this view has not stored before, and return the entries still
        to write: those it has, and those the store refused (a duplicate key: stored by an
        earlier run, maybe at another version). On the local store an insert costs about a
        fifth of a conditional replacement of a new document (112 against 594 µs), and a
        refused one about half of one (430 µs): so only documents likely new are tried."""
        known = self._stored
        new = [(k, doc) for k, doc in entries if doc["_id"] not in known]
        if not new:
            return entries
        rest = [(k, doc) for k, doc in entries if doc["_id"] in known]
        return rest + await self._insert_all(new)

    async def _insert_all(
        self, entries: list[tuple[str, dict[str, Any]]]
    ) -> list[tuple[str, dict[str, Any]]]:
        """Insert every document in one unordered bulk write; the entries the store refused
        (a duplicate key, or any other refusal of that document alone)."""
        if not entries:
            return []
        try:
            await bulk_write_unordered(self._collection, [InsertOne(doc) for _k, doc in entries])
        except BulkWriteError as exc:
            if exc.details.get("writeConcernErrors"):
                raise
            return [entries[int(error["index"])] for error in exc.details.get("writeErrors", [])]
        return []

    def _remember_stored(self, ids: list[str]) -> None:
        stored = self._stored
        for document_id in ids:
            stored.pop(document_id, None)
            stored[document_id] = None
        while len(stored) > STORED_IDS:
            del stored[next(iter(stored))]

    async def _replace_versioned(
        self, entries: list[tuple[str, dict[str, Any]]], version: str
    ) -> None:
        delay = REFUSED_RETRY_FIRST
        for attempt in range(1, REFUSED_TRIES + 1):
            if not entries:
                return
            documents = [doc for _k, doc in entries]
            refused = await replace_unless_newer(self._collection, documents, version)
            errors = [e for e in refused if e.get("code") != DUPLICATE_KEY]
            if not errors:
                return
            entries = [entries[e["index"]] for e in errors]
            if attempt == REFUSED_TRIES:
                for (key, _doc), error in zip(entries, errors, strict=True):
                    log.error(f"{self._name}.document_refused", key=key, error=error.get("errmsg"))
                return
            log.warning(
                f"{self._name}.documents_refused_retrying",
                documents=len(entries),
                error=errors[0].get("errmsg"),
                retry_in=delay,
            )
            await asyncio.sleep(delay)
            delay *= 2

    async def _bulk(
        self,
        operations: list[Any],
        *,
        keys: list[str] | None = None,
        quiet_codes: frozenset[int] | set[int] = frozenset(),
    ) -> None:
        """The operations as unordered bulk writes. A document the store refuses would be
        refused again: it is logged (unless its error code is one of `quiet_codes`, answers
        the caller expects) and the batch goes on."""
        if not operations:
            return
        try:
            await bulk_write_unordered(self._collection, operations)
        except BulkWriteError as exc:
            if exc.details.get("writeConcernErrors"):
                raise
            for error in exc.details.get("writeErrors", []):
                if error.get("code") in quiet_codes:
                    continue
                index = error["index"]
                log.error(
                    f"{self._name}.document_refused",
                    key=keys[index] if keys is not None else index,
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
                log.warning(f"{self._name}.store_error", error=str(exc), retry_in=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            if stop.is_set():
                return False
            delay = min(delay * 2, RETRY_MAX)


ViewFactory = Callable[[AsyncDatabase[dict[str, Any]]], DocumentView]


def run_view_thread(
    settings: CommonSettings, app_name: str, view: ViewFactory
) -> Callable[[], None]:
    """Start the view on a daemon thread with its own event loop; returns `stop`, which ends it
    (waiting up to 5 s). A failure restarts the view after a pause instead of stopping the
    service."""
    stop = threading.Event()
    thread = threading.Thread(
        target=event_loop.run,
        args=(_keep_running(settings, app_name, view, stop), settings.event_loop),
        name=app_name,
    )
    thread.daemon = True  # never holds the process up once the worker has stopped
    thread.start()

    def stopper() -> None:
        stop.set()
        thread.join(timeout=5)

    return stopper


async def _keep_running(
    settings: CommonSettings, app_name: str, view: ViewFactory, stop: threading.Event
) -> None:
    stopped = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            await asyncio.sleep(0.2)
        stopped.set()

    watcher = asyncio.ensure_future(watch())
    try:
        while not stopped.is_set():
            client = connect(settings, app_name)
            try:
                await view(database(client, settings)).run(stopped)
            except Exception:
                log.exception("view.failed", view=app_name)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopped.wait(), RESTART_SECONDS)
            finally:
                await client.close()
    finally:
        watcher.cancel()
