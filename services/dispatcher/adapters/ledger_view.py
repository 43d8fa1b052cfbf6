"""The message ledger as the admin reads it: the ledger table's changelog, materialised into the
document store's `messages` collection (one document per message id, its times as dates), in
bulk and off the dispatcher's hot path (`shared.document_view`).

Only committed transactions are read, so the view never shows a try that a fenced or crashed
worker abandoned.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import structlog
from pymongo import DeleteOne, ReplaceOne
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
    return [
        (
            key,
            DeleteOne({"_id": key})
            if entry is None
            else ReplaceOne({"_id": key}, {"_id": key, **entry}, upsert=True),
        )
        for key, entry in latest.items()
    ]
