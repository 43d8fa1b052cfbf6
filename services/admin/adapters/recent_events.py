"""A contact's recent events for the admin's timeline: `waypost.contact-events.v1` (the events
as the segmenter accepted them, under the contact's key after identity merges), kept as one
`recent_events` document per contact holding its newest events (`domain/timeline.py`).

It is a view of the admin's own (`shared.document_view`): a consumer group that reads the topic
in large batches on a thread of its own and writes in bulk, so no worker's hot path waits on
it. Per batch it reads each contact's stored document by its id (index-served), folds the new
events in, keeps the newest 50, and replaces the document; a replayed record changes nothing,
since events are kept once per id. The events it last wrote for the most recent few thousand
contacts are remembered, so a contact heard from again is not read back: only this member
writes the keys of its partitions, and what it remembers is forgotten whenever its partitions
may have changed hands (a rebalance) or a write failed. The store is not asked to trim
(`$push` with `$slice`): FerretDB 1.24 accepts the modifier and ignores it, and refuses TTL
indexes. A `Contact Forgotten` event deletes the contact's document.

A contact whose profile counts no more events than the batch brings for it (a new contact, its
first events all here) is not read either: its document is inserted. A lookup costs the local
store about as much CPU as a whole bulk insert of a few documents (docs/document-store.md);
a guess that was wrong (an event the profile does not count, a document stored by another
member) is refused as a duplicate key, and that contact is then read and folded as any other.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, ValidationError
from pymongo import DeleteOne, InsertOne, ReplaceOne
from pymongo.asynchronous.database import AsyncDatabase

from services.admin.domain.timeline import keep_recent, recent_entry
from shared.contracts import Event
from shared.document_view import DocumentView, Write
from shared.kafka import Record
from shared.profiles import CONTACT_FORGOTTEN
from shared.settings import CommonSettings
from shared.topics import CONTACT_EVENTS

log = structlog.get_logger(__name__)

RECENT_EVENTS = "recent_events"
# Stored documents read at once while a batch is folded in.
READS_AT_ONCE = 16
# Contacts whose last written events are remembered (the most recently written).
REMEMBERED_CONTACTS = 5_000


class _Counts(BaseModel):
    """The part of the profile snapshot the view reads: how many events it counts."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_counts: dict[str, int] = {}


class _Change(BaseModel):
    """The part of a contact-events record the view reads: the event, and the profile's counts
    (whether the contact can have been heard from before)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    contact_key: str
    event: Event
    profile: _Counts = _Counts()


class RecentEventsView(DocumentView):
    """`writes` gives, per contact, an `InsertOne` of the batch's new events (folded into the
    stored document here; its `new` says whether the contact is likely new to the store) or a
    `DeleteOne` (the contact was forgotten)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # contact key -> the events last written for it, least recently written first
        self._written: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._rebalances: int | None = None
        self.reads = 0  # stored documents read back (a figure for tests and operators)

    def _held_since(self, rebalances: int) -> None:
        if rebalances != self._rebalances:
            self._written.clear()
            self._rebalances = rebalances

    async def _write(self, writes: list[tuple[str, Write]]) -> None:
        deletes: list[tuple[str, Write]] = [(k, w) for k, w in writes if isinstance(w, DeleteOne)]
        arrived = {k: w._doc["events"] for k, w in writes if isinstance(w, InsertOne)}
        new = {k for k, w in writes if isinstance(w, InsertOne) and w._doc.get("new")}
        gate = asyncio.Semaphore(READS_AT_ONCE)
        absent: set[str] = set()

        async def stored(key: str) -> list[dict[str, Any]] | None:
            """The contact's stored events (None: the store holds no document)."""
            self.reads += 1
            async with gate:
                found = await self._collection.find_one({"_id": key}, {"events": 1})
            return None if found is None else list(found.get("events") or [])

        async def held(key: str) -> list[dict[str, Any]]:
            known = self._written.get(key)
            if known is not None:
                return known
            if key in new:
                absent.add(key)  # inserted without a read; refused, it is read after all
                return []
            found = await stored(key)
            if found is None:
                absent.add(key)
                return []
            return found

        keys = list(arrived)
        olds = await asyncio.gather(*(held(key) for key in keys))
        kept = {key: keep_recent(old, arrived[key]) for key, old in zip(keys, olds, strict=True)}
        try:
            # A contact the store holds nothing for is inserted (about a fifth of an upsert's
            # cost on the local store, docs/document-store.md). One it held after all (a wrong
            # guess, or a member that held the partition before, writing late) is read and
            # folded like any other.
            refused = await self._insert_all(
                [(key, _document(key, kept[key])) for key in keys if key in absent]
            )
            if refused:
                again = await asyncio.gather(*(stored(key) for key, _doc in refused))
                for (key, _doc), found in zip(refused, again, strict=True):
                    kept[key] = keep_recent(found or [], arrived[key])
                    absent.discard(key)
            replaced: list[tuple[str, Write]] = [
                (key, ReplaceOne({"_id": key}, _document(key, events), upsert=True))
                for key, events in kept.items()
                if key not in absent
            ]
            await super()._write(replaced + deletes)
        except BaseException:
            self._written.clear()  # some writes may have landed, some not
            raise
        for key, _delete in deletes:
            self._written.pop(key, None)
        for key, events in kept.items():
            self._written.pop(key, None)
            self._written[key] = events
        while len(self._written) > REMEMBERED_CONTACTS:
            self._written.popitem(last=False)


def recent_event_writes(batch: Iterable[Record]) -> list[tuple[str, Write]]:
    """Per contact in the batch: its new events, and whether its profile counts no more events
    than that (`new`: likely nothing stored yet), or a deletion once it was forgotten (events
    after the erasure in the same batch are not kept: the segmenter drops them anyway)."""
    arrived: dict[str, list[dict[str, Any]]] = {}
    counted: dict[str, int] = {}  # events the contact's latest profile counts
    forgotten: set[str] = set()
    for record in batch:
        if not record.value:
            continue
        try:
            change = _Change.model_validate_json(record.value)
        except ValidationError as exc:
            log.error("recent_events.undecodable", offset=record.offset, error=str(exc))
            continue
        key = change.contact_key
        if change.event.label == CONTACT_FORGOTTEN:
            forgotten.add(key)
            arrived.pop(key, None)
        elif key not in forgotten:
            arrived.setdefault(key, []).append(recent_entry(change.event))
            counted[key] = sum(change.profile.event_counts.values())
    writes: list[tuple[str, Write]] = [(key, DeleteOne({"_id": key})) for key in sorted(forgotten)]
    writes += [
        # `new`: the profile counts no event before the batch's, so likely nothing is stored.
        (key, InsertOne({"_id": key, "events": events, "new": counted[key] <= len(events)}))
        for key, events in arrived.items()
    ]
    return writes


def _document(key: str, events: list[dict[str, Any]]) -> dict[str, Any]:
    """`last_at`, the newest event's time, says how long ago the contact was last active."""
    return {"_id": key, "events": events, "last_at": events[-1]["at"] if events else None}


def recent_events_view(
    settings: CommonSettings, database: AsyncDatabase[dict[str, Any]], group_id: str
) -> DocumentView:
    return RecentEventsView(
        settings,
        database,
        topic=CONTACT_EVENTS.name,
        collection=RECENT_EVENTS,
        group_id=group_id,
        writes=recent_event_writes,
        name="recent_events",
    )
