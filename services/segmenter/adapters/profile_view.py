"""Materialises the compacted profiles topic into the document store's `profiles` collection, so
the admin can look a contact up and sample a segment's members without asking the workers.

The segmenter process runs it next to its stream worker, on a thread and event loop of its own
(`shared.document_view.run_view_thread`), and stops it on shutdown. It is a consumer group of
its own (`waypost-profile-view`), so it keeps up independently of the workers and several
segmenter processes share its partitions.

The view is versioned by the record's offset (`shared.document_view`): a member that was paused
with a batch in hand while its partitions moved on writes no older profile over one the new
owner wrote. A tombstone deletes the document, keeping nothing of the key (docs/erasure.md); a
late batch can therefore still write a profile back after its tombstone (docs/segments.md, "The
profiles collection").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import structlog
from pydantic import ValidationError
from pymongo import DeleteOne, InsertOne
from pymongo.asynchronous.database import AsyncDatabase

from shared.contracts import Profile
from shared.document_view import DocumentView, Write
from shared.kafka import Record
from shared.profiles import STORED_OFFSET
from shared.settings import CommonSettings
from shared.topics import PROFILES

log = structlog.get_logger(__name__)

COLLECTION = "profiles"
GROUP_ID = "waypost-profile-view"
# Internal de-duplication state of the segmenter, of no use to readers of the store.
NOT_STORED = frozenset({"recent_message_ids"})


def profile_view(
    settings: CommonSettings,
    database: AsyncDatabase[dict[str, Any]],
    *,
    group_id: str = GROUP_ID,
) -> DocumentView:
    """One document per contact (`_id` = contact key) in step with the profiles topic; a
    tombstone (the contact was forgotten, or merged away) deletes it. Segment member samples
    look profiles up by segment id, hence the index."""
    return DocumentView(
        settings,
        database,
        topic=PROFILES.name,
        collection=COLLECTION,
        group_id=group_id,
        writes=profile_writes,
        indexes=("segments",),
        name="profile_view",
        version=STORED_OFFSET,
    )


def profile_writes(batch: Iterable[Record]) -> list[tuple[str, Write]]:
    """One write per contact key, the batch's last word on it: its profile, with its record's
    offset, or a delete for a tombstone. Only that last record is decoded (an undecodable one
    is logged and the one before it stands in)."""
    records: dict[str, list[Record]] = {}
    for record in batch:
        if record.key is None:
            log.error("profile_view.record_without_key", offset=record.offset)
            continue
        records.setdefault(record.key, []).append(record)
    writes: list[tuple[str, Write]] = []
    for key, kept in records.items():
        write = _last_word(key, kept)
        if write is not None:
            writes.append((key, write))
    return writes


def _last_word(key: str, records: list[Record]) -> Write | None:
    """The write of the newest of a key's records that decodes (None: none does)."""
    for record in reversed(records):
        if not record.value:
            return DeleteOne({"_id": key})
        try:
            profile = Profile.model_validate_json(record.value)
        except ValidationError as exc:
            log.error(
                "profile_view.undecodable",
                key=key,
                partition=record.partition,
                offset=record.offset,
                error=str(exc),
            )
            continue
        return InsertOne({**profile_document(profile), "_id": key, STORED_OFFSET: record.offset})
    return None


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
    '$' -> '%24', NUL -> '%00', '%' -> '%25'), and integers beyond 64 bits as decimal strings.

    It walks every profile the view writes, on the segmenter's process: the common types are
    told apart by `type` before the general rules (an ABC check per value cost the segmenter
    about 4 % of its samples in the pipeline bench)."""
    kind = type(value)
    if kind in _AS_IS:
        return value
    if kind is int or (isinstance(value, int) and not isinstance(value, bool)):
        return value if _INT64[0] <= value <= _INT64[1] else str(value)
    if kind is dict or isinstance(value, Mapping):
        return {
            _escape(key if type(key) is str else str(key)): (
                item if type(item) in _AS_IS else storable(item)
            )
            for key, item in value.items()
        }
    if kind is list or kind is tuple or isinstance(value, list | tuple):
        return [item if type(item) in _AS_IS else storable(item) for item in value]
    return value


# Values kept as they are, told apart by their exact type (subclasses take the general rules).
_AS_IS = frozenset({str, float, bool, type(None), datetime})


def _escape(key: str) -> str:
    if "%" not in key and "." not in key and "$" not in key and "\x00" not in key:
        return key
    for plain, escaped in _ESCAPES:
        key = key.replace(plain, escaped)
    return key
