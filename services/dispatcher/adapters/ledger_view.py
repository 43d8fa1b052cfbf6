"""The message ledger as the admin reads it: the ledger table's changelog, materialised into the
document store's `messages` collection (one document per message id, its times as dates), in
bulk and off the dispatcher's hot path (`shared.document_view`).

Only committed transactions are read, so the view never shows a try that a fenced or crashed
worker abandoned. Each entry carries `rev`, the count of its changes, and a document is replaced
only by a higher one: a view consumer that was stopped with a batch in hand (its process paused,
its partitions moved on) and writes it late cannot put an older state over a newer one.

A batch is written in one bulk write, with no read before it (a versioned view,
`shared.document_view`): each entry is a replacement of its document filtered on its id and a
lower revision, with upsert. A document stored at a lower revision is replaced; none stored, the
entry is inserted; one stored at the same revision or a higher one does not match the filter, so
the upsert's insert meets the unique id and is refused as a duplicate, which means there is
nothing to do. A lookup by id is served by an index (on the
local FerretDB, by the GIN twins of `deploy/local/ferretdb/index_twins.sql`); reading the stored
revisions first with `$in`, as before, made FerretDB parse the whole collection twice per batch,
since it does not push `$in` down to PostgreSQL. Documents an older version stored without `rev`
are numbered -1 when the view starts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import structlog
from pydantic_core import from_json
from pymongo import DeleteOne, InsertOne
from pymongo.asynchronous.database import AsyncDatabase

from services.dispatcher.adapters.tables import LEDGER, entry_times
from shared.document_view import DocumentView, Write
from shared.kafka import Record
from shared.settings import CommonSettings

log = structlog.get_logger(__name__)

COLLECTION = "messages"
GROUP_ID = "waypost-ledger-view"


def ledger_changelog(app_id: str) -> str:
    """The ledger table's changelog topic (`shared.streams.StreamWorker.table`)."""
    return f"{app_id}-{LEDGER}-changelog"


def ledger_view(
    settings: CommonSettings, database: AsyncDatabase[dict[str, Any]], app_id: str
) -> DocumentView:
    """Erasure looks entries up by contact, hence the index."""
    return DocumentView(
        settings,
        database,
        topic=ledger_changelog(app_id),
        collection=COLLECTION,
        group_id=GROUP_ID,
        writes=ledger_writes,
        indexes=("contact_key",),
        name="ledger_view",
        version="rev",
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
            latest[record.key] = entry_times(from_json(record.value))
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
