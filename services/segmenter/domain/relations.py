"""The object index behind fan-out triggers (S8): who did what to which object, and lately.

A contact's event that a live trigger relates to an object (`Product Viewed` by `product_id`)
becomes a `related` record; an object event (`Price Dropped`) becomes a `fan_out` record; both
are keyed by the object. The index entry of an object maps contact keys to the epoch
milliseconds of their latest relation, and a fan-out hands one copy of the object event to each
contact related recently enough.

Bounded memory: an entry keeps only contacts related within `keep` (the longest `within` of the
live triggers), pruned on every write and by a periodic sweep (`prune` records for the entries
nobody writes any more), and at most `max_contacts` of them (the newest).

Erasure: the contact's own row lists the objects it is related to (`related_objects`), so a
forgotten contact takes itself out of each of them with an `unrelated` record routed to the
object's partition. The list drops an object only by sending such a record, so the index never
holds a contact its row does not name.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.contracts import Event, ObjectRelation
from shared.durations import parse_duration
from shared.ids import stable_id
from shared.journeys import ObjectEventTrigger

FAN_OUT_MARK = "fan_out_of"
# Where copies carry their mark: context["waypost"], set only by Waypost itself.
CONTEXT_KEY = "waypost"
COPY_SOURCE = "waypost"
MAX_CONTACTS = 1_000_000
# Objects one contact's row remembers (the most recently related); past it, the oldest relations
# are taken out of the index too.
MAX_OBJECTS = 1_000
# A property value longer than this (bytes, as UTF-8) names its object by its SHA-256 instead,
# so an object key stays short: the contact's row lists up to `MAX_OBJECTS` of them, and an
# event may carry a value of some 32 KB.
MAX_OBJECT_VALUE_BYTES = 64

# contact key -> epoch milliseconds of the contact's latest relation to the object (JSON-ready).
RelationState = dict[str, int]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def epoch_ms(when: datetime) -> int:
    return (when - _EPOCH) // _MS


def from_epoch_ms(ms: int) -> datetime:
    return _EPOCH + ms * _MS


def object_key(event_name: str, prop: str, value: Any) -> str:
    """`<event>|<property>|<value>`: strings as they are, anything else as canonical JSON.

    So `7` and `"7"` name the same object: clients often send an id as a number in one event and
    as a string in another. A value longer than `MAX_OBJECT_VALUE_BYTES` is `sha256:<hex>` of
    that text: the relation and the object event derive the same key from the same value, so a
    fan-out still finds its contacts (a long URL as the object, say).
    """
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_OBJECT_VALUE_BYTES:
        text = f"sha256:{hashlib.sha256(raw).hexdigest()}"
    return f"{event_name}|{prop}|{text}"


def is_fan_out_copy(event: Event) -> bool:
    """Whether Waypost made this event by fanning out an object event (see `fan_out_copy`)."""
    mark = event.context.get(CONTEXT_KEY)
    return event.source == COPY_SOURCE and isinstance(mark, dict) and FAN_OUT_MARK in mark


def _object_value(event: Event, prop: str) -> Any | None:
    # An absent, null or empty value names no object.
    value = event.properties.get(prop)
    return None if value is None or value == "" else value


def relation_records(
    event: Event, contact_key: str, triggers: Sequence[ObjectEventTrigger], now: datetime
) -> list[ObjectRelation]:
    """One `related` record per object this contact's event relates to under the live triggers.

    Copies of object events relate nobody (a fan-out never feeds the index), and neither does an
    event already older than every window that could use it.
    """
    if is_fan_out_copy(event):
        return []
    windows: dict[str, timedelta] = {}
    for trigger in triggers:
        relation = trigger.related_by
        value = _object_value(event, relation.property)
        if relation.event != event.label or value is None:
            continue
        key = object_key(relation.event, relation.property, value)
        windows[key] = max(windows.get(key, timedelta(0)), parse_duration(relation.within))
    return [
        ObjectRelation(kind="related", object_key=key, at=event.timestamp, contact_key=contact_key)
        for key, window in windows.items()
        if event.timestamp >= now - window
    ]


def related_objects(
    objects: Mapping[str, int],
    records: Sequence[ObjectRelation],
    now: datetime,
    keep: timedelta | None,
    *,
    max_objects: int = MAX_OBJECTS,
) -> tuple[dict[str, int], tuple[str, ...]]:
    """The objects a contact is related to after `records` (object key -> epoch milliseconds of
    its latest relation), and the objects it must be taken out of, sorted.

    Objects related before `now - keep` go (no live trigger, `keep` None: none go by age), and
    past `max_objects` the oldest go; each that goes is returned, so the index drops the contact
    from it even when the object itself is never written again.
    """
    named = dict(objects)
    for record in records:
        named = add_relation(named, record.object_key, record.at)
    kept = named
    if keep is not None:
        oldest = epoch_ms(now - keep)
        kept = {key: at for key, at in kept.items() if at >= oldest}
    kept = cap(kept, max_objects)
    # A record just added but not kept is named too: the index has it (or is about to).
    return kept, tuple(sorted(set(named) - set(kept)))


def unrelated(contact_key: str, objects: Iterable[str], now: datetime) -> list[ObjectRelation]:
    """One `unrelated` record per object: the index takes the contact out of its entry."""
    return [
        ObjectRelation(kind="unrelated", object_key=key, at=now, contact_key=contact_key)
        for key in sorted(objects)
    ]


def relations_of(contact_key: str, objects: Mapping[str, int]) -> list[ObjectRelation]:
    """`related` records for a contact taking over another's relations (a merged anonymous
    history), each at the time it was last related."""
    return [
        ObjectRelation(
            kind="related", object_key=key, at=from_epoch_ms(at), contact_key=contact_key
        )
        for key, at in sorted(objects.items())
    ]


def fan_out_requests(
    event: Event, triggers: Sequence[ObjectEventTrigger], now: datetime
) -> list[ObjectRelation]:
    """One `fan_out` record per object this object event is about, under the live triggers.

    Triggers that share an object key share one record with the longest window; each journey's
    trigger condition still filters the copies at entry. `now` is not needed today.
    """
    if is_fan_out_copy(event):
        return []
    windows: dict[str, tuple[timedelta, str]] = {}
    for trigger in triggers:
        value = _object_value(event, trigger.object_property)
        if trigger.event != event.label or value is None:
            continue
        relation = trigger.related_by
        key = object_key(relation.event, relation.property, value)
        window = (parse_duration(relation.within), relation.within)
        if key not in windows or window[0] > windows[key][0]:
            windows[key] = window
    return [
        ObjectRelation(
            kind="fan_out", object_key=key, at=event.timestamp, event=event, within=within
        )
        for key, (_span, within) in windows.items()
    ]


def longest_within(triggers: Sequence[ObjectEventTrigger]) -> timedelta | None:
    """How long the index must remember a relation for these triggers (None: no trigger)."""
    return max((parse_duration(t.related_by.within) for t in triggers), default=None)


def add_relation(state: Mapping[str, int] | None, contact_key: str, at: datetime) -> RelationState:
    """The entry with this contact related at `at` (its latest relation time is kept). Also
    serves a contact's list of objects, keyed by object instead."""
    updated = dict(state or {})
    at_ms = epoch_ms(at)
    updated[contact_key] = max(updated.get(contact_key, at_ms), at_ms)
    return updated


def prune(
    state: Mapping[str, int],
    now: datetime,
    keep: timedelta,
    *,
    max_contacts: int | None = MAX_CONTACTS,
) -> RelationState | None:
    """The contacts related within `keep` before `now`, capped as `cap` does; None when empty."""
    oldest = epoch_ms(now - keep)
    fresh = {contact: at for contact, at in state.items() if at >= oldest}
    if max_contacts is not None:
        fresh = cap(fresh, max_contacts)
    return fresh or None


def has_expired(state: Mapping[str, int], now: datetime, keep: timedelta) -> bool:
    """Whether the entry holds a contact related before `now - keep` (what `prune` drops)."""
    oldest = epoch_ms(now - keep)
    return any(at < oldest for at in state.values())


def prune_request(object_key: str, now: datetime) -> ObjectRelation:
    """A `prune` record: the index prunes the object's entry as a write to it would."""
    return ObjectRelation(kind="prune", object_key=object_key, at=now)


def cap(state: Mapping[str, int], max_contacts: int) -> RelationState:
    """At most `max_contacts` contacts, the most recently related (ties by contact key).

    An entry over the cap is trimmed to 99% of it, so a hot object is trimmed (and logged) once
    per hundredth of the cap in new contacts rather than on every write.
    """
    if len(state) <= max_contacts:
        return dict(state)
    target = max(1, max_contacts - max_contacts // 100)
    newest = heapq.nlargest(target, state.items(), key=lambda item: (item[1], item[0]))
    return dict(newest)


def without(state: Mapping[str, int], contact_key: str) -> RelationState | None:
    """The entry without this contact; None when nobody is left."""
    rest = {contact: at for contact, at in state.items() if contact != contact_key}
    return rest or None


def related_contacts(state: Mapping[str, int], at: datetime, within: timedelta) -> list[str]:
    """The contacts whose latest relation is no earlier than `within` before `at`, sorted.

    `at` is the object event's time. A relation recorded after it still counts: the contact did
    the event on the object lately, and the index keeps only the latest time per contact.
    """
    oldest = epoch_ms(at - within)
    return sorted(contact for contact, last in state.items() if last >= oldest)


def fan_out_copy(origin: Event, contact_key: str, object_key: str) -> Event:
    """The object event as an event of one related contact, with a message id stable per
    (origin, contact): a repeated fan-out sends the same copies, which the segmenter drops."""
    return Event(
        type=origin.type,
        event=origin.event,
        name=origin.name,
        user_id=contact_key,
        anonymous_id=None,
        message_id=stable_id(origin.message_id, contact_key),
        timestamp=origin.timestamp,
        received_at=origin.received_at,
        properties=dict(origin.properties),
        context={CONTEXT_KEY: {FAN_OUT_MARK: origin.message_id, "object_key": object_key}},
        source=COPY_SOURCE,
    )
