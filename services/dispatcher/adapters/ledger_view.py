"""The message ledger as the admin reads it: the ledger table's changelog, materialised into the
document store's `messages` collection (one document per message id, its times as dates), in
bulk and off the dispatcher's hot path (`shared.document_view`).

Only committed transactions are read, so the view never shows a try that a fenced or crashed
worker abandoned. Each entry carries `rev`, the count of its changes, and a document is replaced
only by a higher one: a view consumer that was stopped with a batch in hand (its process paused,
its partitions moved on) and writes it late cannot put an older state over a newer one. A batch
is written in two passes: the entries not stored yet are inserted (an insert that meets a stored
one is skipped), then stored ones older than the batch's are replaced.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import structlog
from pymongo import DeleteOne, InsertOne, ReplaceOne
from pymongo.asynchronous.database import AsyncDatabase

from services.dispatcher.adapters.tables import LEDGER, entry_times
from shared.document_view import DUPLICATE_KEY, DocumentView, Write
from shared.kafka import Record
from shared.settings import CommonSettings

log = structlog.get_logger(__name__)

COLLECTION = "messages"
GROUP_ID = "waypost-ledger-view"


def ledger_changelog(app_id: str) -> str:
    """The ledger table's changelog topic (`shared.streams.StreamWorker.table`)."""
    return f"{app_id}-{LEDGER}-changelog"


class LedgerView(DocumentView):
    async def _write(self, writes: list[tuple[str, Write]]) -> None:
        """The inserts first (inserting what is stored already is refused as a "duplicate
        key", and skipped), then the replacements and deletions."""
        inserts = [write for _key, write in writes if isinstance(write, InsertOne)]
        await self._bulk(inserts, quiet_codes={DUPLICATE_KEY})
        await super()._write([(k, w) for k, w in writes if not isinstance(w, InsertOne)])


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
        document = {"_id": key, **entry}
        newer = {"rev": {"$lt": int(entry.get("rev", 0))}}
        writes.append((key, InsertOne(document)))
        writes.append(
            (key, ReplaceOne({"_id": key, "$or": [newer, {"rev": {"$exists": False}}]}, document))
        )
    return writes
