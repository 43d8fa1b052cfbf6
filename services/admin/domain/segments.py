"""What the admin shows of segments, aggregates and contacts: live member counts summed from the
segmenter's per-partition counts, definitions as JSON, stored profiles as JSON, and the
command that forgets a contact."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared.channels import ConsentScope
from shared.contracts import ContactCommand, Event, SegmentCount
from shared.ids import stable_id
from shared.profiles import STORED_OFFSET
from shared.segment_checks import aggregates_read, segments_read
from shared.segments import PublishedAggregate, PublishedSegment
from shared.system_events import SUBSCRIBED, UNSUBSCRIBED


@dataclass(frozen=True)
class SegmentTotal:
    """The exact member count of a segment: the sum of the latest count of every partition."""

    members: int = 0
    # When the newest of those counts was taken (None: the segmenter has counted nobody yet).
    counted_at: datetime | None = None


def segment_totals(counts: Iterable[SegmentCount]) -> dict[str, SegmentTotal]:
    """Sum the latest count per partition (one record per key `<segment>/<partition>`)."""
    totals: dict[str, SegmentTotal] = {}
    for count in counts:
        total = totals.get(count.segment_id, SegmentTotal())
        newest = count.at if total.counted_at is None else max(total.counted_at, count.at)
        totals[count.segment_id] = SegmentTotal(total.members + count.members, newest)
    return totals


def segment_view(published: PublishedSegment, total: SegmentTotal) -> dict[str, Any]:
    segment = published.segment
    return {
        "id": segment.id,
        "name": segment.name,
        "description": segment.description,
        "definition": segment.model_dump(mode="json", by_alias=True, exclude_none=True),
        "reads": {
            "aggregates": sorted(aggregates_read(segment.condition)),
            "segments": sorted(segments_read(segment.condition)),
        },
        "published_at": published.published_at,
        "members": total.members,
        "counted_at": total.counted_at,
    }


def aggregate_view(
    published: PublishedAggregate, segments: Iterable[PublishedSegment]
) -> dict[str, Any]:
    aggregate = published.aggregate
    return {
        "id": aggregate.id,
        "name": aggregate.name,
        "definition": aggregate.model_dump(mode="json", by_alias=True, exclude_none=True),
        "read_by": sorted(
            s.segment.id for s in segments if aggregate.id in aggregates_read(s.segment.condition)
        ),
        "published_at": published.published_at,
    }


def forget_command(contact_key: str, now: datetime) -> ContactCommand:
    """Ask the segmenter, the profile's only writer, to erase the contact."""
    return ContactCommand(
        command_id=stable_id("forget", contact_key, now.isoformat()),
        contact_key=contact_key,
        kind="forget",
        reason="admin",
        at=now,
    )


# One channel or every channel (`shared.channels` says what each means).
ConsentChannel = ConsentScope
# The source of consent changes made through the admin API (a Waypost source: see
# shared/system_events.py).
ADMIN_SOURCE = "waypost-admin"


def consent_event(
    profile: Mapping[str, Any], channel: ConsentChannel, subscribed: bool, now: datetime
) -> Event:
    """`Subscribed` or `Unsubscribed` for a stored contact, as an operator recorded it."""
    contact_key = str(profile["_id"])
    user_id = profile.get("user_id")
    is_user = isinstance(user_id, str) and user_id == contact_key
    name = SUBSCRIBED if subscribed else UNSUBSCRIBED
    return Event(
        type="track",
        event=name,
        user_id=contact_key if is_user else None,
        anonymous_id=None if is_user else contact_key,
        message_id=stable_id("consent", contact_key, channel, name, now.isoformat()),
        timestamp=now,
        received_at=now,
        properties={"channel": channel, "method": "admin"},
        source=ADMIN_SOURCE,
    )


# Keys of stored profiles are escaped (the store refuses '.' and '$' in field names); see
# docs/segments.md, "The profiles collection".
_UNESCAPES = (("%2E", "."), ("%24", "$"), ("%00", "\x00"), ("%25", "%"))


def contact_view(document: Mapping[str, Any]) -> dict[str, Any]:
    """A stored profile document as the API shows it: the contact key, the fields, keys as the
    contact's data named them (the view's own bookkeeping left out)."""
    fields = {
        name: _unescaped(value)
        for name, value in document.items()
        if name not in ("_id", STORED_OFFSET)
    }
    return {"contact_key": document["_id"], **fields}


def _unescaped(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {_unescape(str(key)): _unescaped(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_unescaped(item) for item in value]
    return value


def _unescape(key: str) -> str:
    if "%" not in key:
        return key
    out = []
    index = 0
    while index < len(key):
        for escaped, plain in _UNESCAPES:
            if key.startswith(escaped, index):
                out.append(plain)
                index += len(escaped)
                break
        else:
            out.append(key[index])
            index += 1
    return "".join(out)
