"""The message ledger as the admin reads it: the ledger table's changelog, materialised into the
document store's `messages` collection (one document per message id, its times as dates), in
bulk and off the dispatcher's hot path (`shared.document_view`).

Only committed transactions are read, so the view never shows a try that a fenced or crashed
worker abandoned. Each entry carries `rev`, the count of its changes, and a document is replaced
only by a higher one: a view consumer that was stopped with a batch in hand (its process paused,
its partitions moved on) and writes it late cannot put an older state over a newer one.

A batch is written in three steps: the stored revisions of its entries are read in one query;
the entries not stored are inserted (an insert that meets a document stored meanwhile is
skipped, and looked at again); the entries stored with a lower revision are replaced, each by a
filter on its id and the revision read, so a document changed meanwhile is left to the next
round. Every filter is one the document server answers by its primary index: the replacement
filtered with `$or` on the revision that came before made FerretDB scan the collection for each
entry, and the view fell more than a minute behind a burst of 3,000 SMS. Documents an older
version stored without `rev` are numbered 0 when the view starts.
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


# How many times a batch's entries are compared with the stored documents again, when other
# writers changed some of them meanwhile.
ROUNDS = 3


class LedgerView(DocumentView):
    async def _create_indexes(self) -> None:
        await super()._create_indexes()
        # Documents an older version stored without a revision: any entry replaces them.
        await self._collection.update_many({"rev": {"$exists": False}}, {"$set": {"rev": 0}})

    async def _write(self, writes: list[tuple[str, Write]]) -> None:
        """The deletions, then each entry inserted or put over an older revision of itself."""
        await super()._write([(k, w) for k, w in writes if not isinstance(w, InsertOne)])
        entries = {key: w._doc for key, w in writes if isinstance(w, InsertOne)}
        for _round in range(ROUNDS):
            if not entries:
                return
            stored = await self._revisions(list(entries))
            inserts = [InsertOne(doc) for key, doc in entries.items() if key not in stored]
            replacements = [
                ReplaceOne({"_id": key, "rev": stored[key]}, doc)
                for key, doc in entries.items()
                if key in stored and stored[key] < doc["rev"]
            ]
            await self._bulk(inserts, quiet_codes={DUPLICATE_KEY})
            await self._bulk(replacements)
            # What another writer stored meanwhile (an insert refused, a replacement that met
            # a changed revision) is compared again.
            stored = await self._revisions(list(entries))
            entries = {k: d for k, d in entries.items() if stored.get(k, -1) < d["rev"]}
        if entries:
            log.warning("ledger_view.contended", entries=len(entries))

    async def _revisions(self, keys: list[str]) -> dict[str, int]:
        """The stored revision of each of `keys` that is stored."""
        found = self._collection.find({"_id": {"$in": keys}}, {"rev": 1})
        return {str(doc["_id"]): int(doc.get("rev", 0)) async for doc in found}


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
