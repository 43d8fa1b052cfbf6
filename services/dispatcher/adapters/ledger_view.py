"""The message ledger as the admin reads it: the ledger table's changelog, materialised into the
document store's `messages` collection (one document per message id, its times as dates), in
bulk and off the dispatcher's hot path (`shared.document_view`).

Only committed transactions are read, so the view never shows a try that a fenced or crashed
worker abandoned. Each entry carries `rev`, the count of its changes, and a document is replaced
only by a higher one: a view consumer that was stopped with a batch in hand (its process paused,
its partitions moved on) and writes it late cannot put an older state over a newer one.

A batch is written in one bulk write, with no read before it: each entry is a replacement of
its document filtered on its id and a lower revision, with upsert. A document stored at a lower
revision is replaced; none stored, the entry is inserted; one stored at the same revision or a
higher one does not match the filter, so the upsert's insert meets the unique id and is refused
as a duplicate, which means there is nothing to do. A lookup by id is served by an index (on the
local FerretDB, by the GIN twins of `deploy/local/ferretdb/index_twins.sql`); reading the stored
revisions first with `$in`, as before, made FerretDB parse the whole collection twice per batch,
since it does not push `$in` down to PostgreSQL. Documents an older version stored without `rev`
are numbered 0 when the view starts.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

import structlog
from pymongo import DeleteOne, InsertOne
from pymongo.asynchronous.database import AsyncDatabase

from services.dispatcher.adapters.tables import LEDGER, entry_times
from shared.docstore import replace_unless_newer
from shared.document_view import DUPLICATE_KEY, DocumentView, Write
from shared.kafka import Record
from shared.settings import CommonSettings

log = structlog.get_logger(__name__)

COLLECTION = "messages"
GROUP_ID = "waypost-ledger-view"
# Tries of an entry the store refused for another reason than holding it already, the first
# pause between them (doubling).
REFUSED_TRIES = 5
REFUSED_RETRY_FIRST = 0.2


def ledger_changelog(app_id: str) -> str:
    """The ledger table's changelog topic (`shared.streams.StreamWorker.table`)."""
    return f"{app_id}-{LEDGER}-changelog"


class LedgerView(DocumentView):
    async def _create_indexes(self) -> None:
        await super()._create_indexes()
        # Documents an older version stored without a revision: any entry replaces them.
        await self._collection.update_many({"rev": {"$exists": False}}, {"$set": {"rev": 0}})

    async def _write(self, writes: list[tuple[str, Write]]) -> None:
        """The deletions, then each entry inserted or put over an older revision of itself.

        A duplicate key means the store holds this revision or a later one: nothing to do. Any
        other refusal of one entry (the store busy, a statement it gave up on) is tried again,
        that entry alone, a few times with a pause: a view that skipped it would show the
        message's older state for good, since no later record of it may come."""
        await super()._write([(k, w) for k, w in writes if not isinstance(w, InsertOne)])
        entries = [(key, w._doc) for key, w in writes if isinstance(w, InsertOne)]
        delay = REFUSED_RETRY_FIRST
        for attempt in range(1, REFUSED_TRIES + 1):
            documents = [doc for _k, doc in entries]
            refused = await replace_unless_newer(self._collection, documents, "rev")
            errors = [e for e in refused if e.get("code") != DUPLICATE_KEY]
            if not errors:
                return
            entries = [entries[e["index"]] for e in errors]
            if attempt == REFUSED_TRIES:
                for (key, _doc), error in zip(entries, errors, strict=True):
                    log.error("ledger_view.document_refused", key=key, error=error.get("errmsg"))
                return
            log.warning(
                "ledger_view.documents_refused_retrying",
                documents=len(entries),
                error=errors[0].get("errmsg"),
                retry_in=delay,
            )
            await asyncio.sleep(delay)
            delay *= 2


def ledger_view(
    settings: CommonSettings, database: AsyncDatabase[dict[str, Any]], app_id: str
) -> DocumentView:
    """Erasure looks entries up by contact, hence the index."""
    return LedgerView(
        settings,
        database,
        topic=ledger_changelog(app_id),
        collection=COLLECTION,
        group_id=GROUP_ID,
        writes=ledger_writes,
        indexes=("contact_key",),
        name="ledger_view",
    )


def ledger_writes(batch: Iterable[Record]) -> list[tuple[str, Write]]:
    """One write per message id: the batch's last entry of it (a tombstone deletes it)."""
    latest: dict[str, dict[str, Any] | None] = {}
    for record in batch:
        if record.key is None:
            continue  # the table's bookkeeping never reaches its changelog; nothing to store
        if not record.value:
            latest[record.key] = None
            continue
        try:
            latest[record.key] = entry_times(json.loads(record.value))
        except (ValueError, TypeError) as exc:
            log.error("ledger_view.undecodable", key=record.key, error=str(exc))
    writes: list[tuple[str, Write]] = []
    for key, entry in latest.items():
        if entry is None:
            writes.append((key, DeleteOne({"_id": key})))
            continue
        document = {"_id": key, **entry, "rev": int(entry.get("rev", 0))}
        writes.append((key, InsertOne(document)))
    return writes
