"""The object index behind fan-out triggers (S8): relation and fan-out records, the per-object
entry, the copies of an object event, and the shell run over dict-backed fakes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.segmenter.adapters import relations as relations_adapter
from services.segmenter.adapters.relations import RelationIndex
from services.segmenter.domain.relations import (
    FAN_OUT_MARK,
    MAX_OBJECT_VALUE_BYTES,
    MAX_OBJECTS,
    add_relation,
    cap,
    epoch_ms,
    fan_out_copy,
    fan_out_requests,
    has_expired,
    is_fan_out_copy,
    longest_within,
    object_key,
    prune,
    related_contacts,
    related_objects,
    relation_records,
    relations_of,
    unrelated,
)
from shared.cli import load_journey_file
from shared.clock import ManualClock
from shared.contracts import DeadLetter, Event, ObjectRelation
from shared.deadletter import DeadLetters
from shared.journeys import ObjectEventTrigger, Relation
from shared.kafka import ProducerBusy, Record
from shared.streams import Table, focus
from shared.topics import DEAD_LETTER, EVENTS, OBJECT_RELATIONS

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
DAY = timedelta(days=1)
_MINUTE = timedelta(minutes=1)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "journeys"


def _example_trigger() -> ObjectEventTrigger:
    """The trigger of the S8 example journey, as published."""
    found = load_journey_file(EXAMPLES / "s08-price-drop.yaml").journey.trigger
    assert isinstance(found, ObjectEventTrigger)
    return found


PRICE_DROP = _example_trigger()
VIEWED_P7 = "Product Viewed|product_id|p-7"


def trigger(
    event: str = "Price Dropped",
    object_property: str = "product_id",
    related_event: str = "Product Viewed",
    related_property: str = "product_id",
    within: str = "30d",
) -> ObjectEventTrigger:
    return ObjectEventTrigger(
        type="object_event",
        event=event,
        object_property=object_property,
        related_by=Relation(event=related_event, property=related_property, within=within),
    )


def track(
    name: str,
    properties: dict[str, Any],
    *,
    user: str = "ada",
    at: datetime = T0,
    message_id: str = "m-1",
) -> Event:
    return Event(
        type="track",
        event=name,
        user_id=user,
        message_id=message_id,
        timestamp=at,
        received_at=at,
        properties=properties,
        context={"ip": "203.0.113.9"},
        source="web",
    )


def drop(product: Any = "p-7", *, at: datetime = T0, message_id: str = "drop-1") -> Event:
    props = {"product_id": product, "old_price": 129.0, "new_price": 99.0}
    return track("Price Dropped", props, user="catalog", at=at, message_id=message_id)


# --- object keys ------------------------------------------------------------------------------


def test_object_key_names_the_relation_event_property_and_value() -> None:
    assert object_key("Product Viewed", "product_id", "p-7") == VIEWED_P7


def test_a_number_and_its_string_name_the_same_object() -> None:
    assert object_key("E", "id", 7) == object_key("E", "id", "7") == "E|id|7"


def test_non_string_values_are_canonical_json() -> None:
    assert object_key("E", "sku", {"b": 1, "a": [True, None]}) == (
        'E|sku|{"a": [true, null], "b": 1}'
    )
    assert object_key("E", "flag", True) == "E|flag|true"


def test_a_long_value_names_its_object_by_a_digest_and_a_short_one_as_it_is() -> None:
    url = "https://shop.example/p/" + "x" * 32_000
    short = "x" * MAX_OBJECT_VALUE_BYTES

    key = object_key("Page Viewed", "url", url)

    assert key == f"Page Viewed|url|sha256:{hashlib.sha256(url.encode()).hexdigest()}"
    assert object_key("Page Viewed", "url", short) == f"Page Viewed|url|{short}"
    assert object_key("Page Viewed", "url", url + "y") != key
    # Bytes, not characters: 32 three-byte characters are 96 bytes.
    assert "sha256:" in object_key("E", "p", "€" * 32)
    assert object_key("E", "p", {"id": url}).startswith("E|p|sha256:")


def test_a_long_value_relates_and_fans_out_under_the_same_key() -> None:
    url = "https://shop.example/p/" + "x" * 5_000
    pages = trigger("Page Updated", "url", "Page Viewed", "url")

    (relation,) = relation_records(track("Page Viewed", {"url": url}), "ada", [pages], T0)
    (request,) = fan_out_requests(track("Page Updated", {"url": url}, user="cms"), [pages], T0)

    assert relation.object_key == request.object_key
    assert len(relation.object_key) < 100


def test_a_contact_related_to_the_most_objects_of_long_values_keeps_a_small_row() -> None:
    records = [
        ObjectRelation(
            kind="related",
            object_key=object_key("Page Viewed", "url", f"{n}" + "x" * 30_000),
            at=T0,
            contact_key="ada",
        )
        for n in range(MAX_OBJECTS + 10)
    ]

    objects, gone = related_objects({}, records, T0, 30 * DAY)

    assert len(objects) <= MAX_OBJECTS
    assert len(objects) + len(gone) == MAX_OBJECTS + 10
    # Under an eighth of the broker's 1 MiB, where 1,000 raw values of 30 KB would be 30 MB.
    assert len(json.dumps(objects)) < 128 * 1024


# --- relation records -------------------------------------------------------------------------


def test_a_view_of_a_product_relates_the_contact_to_it() -> None:
    view = track("Product Viewed", {"product_id": "p-7"}, at=T0)

    records = relation_records(view, "ada", [PRICE_DROP], T0 + timedelta(minutes=1))

    assert records == [
        ObjectRelation(kind="related", object_key=VIEWED_P7, at=T0, contact_key="ada")
    ]


def test_triggers_sharing_a_relation_give_one_record() -> None:
    view = track("Product Viewed", {"product_id": "p-7", "category": "lamps"})
    triggers = [
        trigger(within="30d"),
        trigger(event="Back In Stock", within="7d"),
        trigger(related_property="category", object_property="category"),
    ]

    records = relation_records(view, "ada", triggers, T0)

    assert [r.object_key for r in records] == [VIEWED_P7, "Product Viewed|category|lamps"]


@pytest.mark.parametrize(
    "view",
    [
        track("Product Added", {"product_id": "p-7"}),
        track("Product Viewed", {"sku": "p-7"}),
        track("Product Viewed", {"product_id": None}),
        track("Product Viewed", {"product_id": ""}),
    ],
    ids=["other event", "no property", "null value", "empty value"],
)
def test_events_that_name_no_related_object_relate_nobody(view: Event) -> None:
    assert relation_records(view, "ada", [PRICE_DROP], T0) == []


def test_a_relation_older_than_every_window_is_not_recorded() -> None:
    view = track("Product Viewed", {"product_id": "p-7"}, at=T0)
    short, long = trigger(within="7d"), trigger(event="Back In Stock", within="30d")

    assert relation_records(view, "ada", [short], T0 + 8 * DAY) == []
    assert len(relation_records(view, "ada", [short, long], T0 + 8 * DAY)) == 1
    assert relation_records(view, "ada", [], T0) == []


# --- fan-out requests -------------------------------------------------------------------------


def test_an_object_event_asks_for_a_fan_out_to_the_related_contacts() -> None:
    event = drop(at=T0)

    (record,) = fan_out_requests(event, [PRICE_DROP], T0)

    assert record == ObjectRelation(
        kind="fan_out", object_key=VIEWED_P7, at=T0, event=event, within="30d"
    )


def test_triggers_sharing_an_object_key_fan_out_once_with_the_longest_window() -> None:
    triggers = [trigger(within="7d"), trigger(within="6w"), trigger(within="30d")]

    records = fan_out_requests(drop(), triggers, T0)

    assert [(r.object_key, r.within) for r in records] == [(VIEWED_P7, "6w")]


def test_different_relations_fan_out_separately() -> None:
    triggers = [trigger(), trigger(related_event="Product Added", within="3d")]

    records = fan_out_requests(drop(), triggers, T0)

    assert [(r.object_key, r.within) for r in records] == [
        (VIEWED_P7, "30d"),
        ("Product Added|product_id|p-7", "3d"),
    ]


def test_an_event_without_the_object_property_fans_out_nowhere() -> None:
    no_product = track("Price Dropped", {"new_price": 99.0}, user="catalog")

    assert fan_out_requests(no_product, [PRICE_DROP], T0) == []
    assert fan_out_requests(drop(), [trigger(event="Back In Stock")], T0) == []


def test_longest_within_is_how_long_the_index_remembers() -> None:
    assert longest_within([trigger(within="7d"), trigger(within="2w")]) == 14 * DAY
    assert longest_within([]) is None


# --- the entry of one object ------------------------------------------------------------------


def test_add_relation_keeps_each_contacts_latest_time() -> None:
    state = add_relation(None, "ada", T0 + DAY)
    state = add_relation(state, "ada", T0)
    state = add_relation(state, "bob", T0)

    assert state == {"ada": epoch_ms(T0 + DAY), "bob": epoch_ms(T0)}


def test_add_relation_leaves_the_given_entry_alone() -> None:
    state = {"ada": epoch_ms(T0)}

    add_relation(state, "bob", T0)

    assert state == {"ada": epoch_ms(T0)}


def test_prune_drops_contacts_related_before_the_kept_span() -> None:
    state = {"ada": epoch_ms(T0), "bob": epoch_ms(T0 + 10 * DAY)}

    assert prune(state, T0 + 30 * DAY, 30 * DAY) == state
    assert prune(state, T0 + 31 * DAY, 30 * DAY) == {"bob": epoch_ms(T0 + 10 * DAY)}
    assert prune(state, T0 + 41 * DAY, 30 * DAY) is None


def test_the_cap_keeps_the_most_recently_related_contacts() -> None:
    state = {f"c{i:03d}": epoch_ms(T0 + i * timedelta(minutes=1)) for i in range(300)}

    assert cap(state, 300) == state
    kept = cap(state, 200)

    # Trimmed to 99% of the cap, newest first, so a hot object is not trimmed on every write.
    assert sorted(kept) == [f"c{i:03d}" for i in range(102, 300)]
    assert prune(state, T0, 365 * DAY, max_contacts=200) == kept
    assert prune(state, T0, 365 * DAY, max_contacts=None) == state


def test_related_contacts_are_those_related_within_the_window_before_the_object_event() -> None:
    state = {
        "ada": epoch_ms(T0 - 30 * DAY),
        "bob": epoch_ms(T0 - 30 * DAY - timedelta(milliseconds=1)),
        "cyd": epoch_ms(T0 - DAY),
        "dee": epoch_ms(T0 + timedelta(minutes=5)),  # recorded after the event's time
    }

    assert related_contacts(state, T0, 30 * DAY) == ["ada", "cyd", "dee"]
    assert related_contacts(state, T0, 2 * DAY) == ["cyd", "dee"]
    assert related_contacts({}, T0, 30 * DAY) == []


# Operations on one entry: relate a contact at a minute, or prune at a minute.
_CONTACTS = st.sampled_from(["ada", "bob", "cyd", "dee", "eve", "fay"])
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("relate"), _CONTACTS, st.integers(0, 200)),
        st.tuples(st.just("prune"), st.just(""), st.integers(0, 300)),
    ),
    max_size=40,
)


def _brute_force(
    relations: list[tuple[str, int]], now: int, keep: int, max_contacts: int
) -> list[tuple[str, int]]:
    """Prune the raw relation list: forget relations older than `keep`, then every relation of
    the contacts beyond the cap (ranked by their latest relation, ties by key)."""
    fresh = [(c, t) for c, t in relations if t >= now - keep]
    latest: dict[str, int] = {}
    for contact, at in fresh:
        latest[contact] = max(latest.get(contact, at), at)
    if len(latest) > max_contacts:
        target = max(1, max_contacts - max_contacts // 100)
        ranked = sorted(latest, key=lambda c: (latest[c], c), reverse=True)[:target]
        fresh = [(c, t) for c, t in fresh if c in ranked]
    return fresh


@settings(max_examples=300, deadline=None)
@given(
    ops=_OPS,
    keep=st.integers(1, 120),
    max_contacts=st.integers(1, 7),
    at=st.integers(0, 300),
    within=st.integers(0, 150),
)
def test_related_contacts_match_a_recomputation_over_the_raw_relations(
    ops: list[tuple[str, str, int]], keep: int, max_contacts: int, at: int, within: int
) -> None:
    def minute(m: int) -> datetime:
        return T0 + timedelta(minutes=m)

    state: dict[str, int] | None = None
    relations: list[tuple[str, int]] = []
    for op, contact, when in ops:
        if op == "relate":
            state = add_relation(state, contact, minute(when))
            relations.append((contact, when))
        elif state is not None:
            state = prune(state, minute(when), timedelta(minutes=keep), max_contacts=max_contacts)
            relations = _brute_force(relations, when, keep, max_contacts)

    found = related_contacts(state or {}, minute(at), timedelta(minutes=within))

    assert found == sorted({c for c, t in relations if t >= at - within})
    assert (state or {}) == {
        c: epoch_ms(minute(max(t for d, t in relations if d == c))) for c, _ in relations
    }


# --- copies of an object event ----------------------------------------------------------------


def test_a_copy_is_the_object_event_as_an_event_of_the_related_contact() -> None:
    origin = drop(at=T0)

    copy = fan_out_copy(origin, "ada", VIEWED_P7)

    assert copy.contact_key == "ada"
    assert (copy.user_id, copy.anonymous_id) == ("ada", None)
    assert (copy.type, copy.label, copy.properties) == ("track", "Price Dropped", origin.properties)
    assert (copy.timestamp, copy.received_at) == (origin.timestamp, origin.received_at)
    assert copy.context == {"waypost": {FAN_OUT_MARK: "drop-1", "object_key": VIEWED_P7}}
    assert copy.source == "waypost"
    assert is_fan_out_copy(copy)
    assert not is_fan_out_copy(origin)


def test_a_client_cannot_pass_its_own_event_off_as_a_copy() -> None:
    spoofed = track("Product Viewed", {"product_id": "p-7"}).model_copy(
        update={"context": {"waypost": {FAN_OUT_MARK: "x"}}}
    )

    assert not is_fan_out_copy(spoofed)
    assert len(relation_records(spoofed, "ada", [PRICE_DROP], T0)) == 1


@given(contacts=st.sets(st.text(min_size=1, max_size=12), min_size=1, max_size=30))
def test_copies_have_stable_message_ids_distinct_per_contact(contacts: set[str]) -> None:
    origin = drop()

    ids = [fan_out_copy(origin, c, VIEWED_P7).message_id for c in sorted(contacts)]

    assert ids == [fan_out_copy(origin, c, VIEWED_P7).message_id for c in sorted(contacts)]
    assert len(set(ids)) == len(contacts)
    assert origin.message_id not in ids
    other = drop(message_id="drop-2")
    assert not set(ids) & {fan_out_copy(other, c, VIEWED_P7).message_id for c in contacts}


def test_copies_never_feed_the_index() -> None:
    # Even a trigger whose relation is the object event itself must not see its own copies.
    loop = trigger(related_event="Price Dropped")
    copy = fan_out_copy(drop(), "ada", VIEWED_P7)

    assert relation_records(copy, "ada", [PRICE_DROP, loop], T0) == []
    assert fan_out_requests(copy, [PRICE_DROP, loop], T0) == []
    assert len(relation_records(drop(), "catalog", [loop], T0)) == 1


# --- a contact's own list of related objects (what a forget takes it out of) -----------------


def test_a_contact_remembers_each_objects_latest_relation() -> None:
    viewed_p8 = "Product Viewed|product_id|p-8"
    records = [
        ObjectRelation(kind="related", object_key=VIEWED_P7, at=T0, contact_key="ada"),
        ObjectRelation(kind="related", object_key=viewed_p8, at=T0 - DAY, contact_key="ada"),
    ]

    objects, gone = related_objects({VIEWED_P7: epoch_ms(T0 - DAY)}, records, T0, 30 * DAY)

    assert objects == {VIEWED_P7: epoch_ms(T0), viewed_p8: epoch_ms(T0 - DAY)}
    assert gone == ()


def test_objects_related_before_the_kept_span_leave_the_list_and_are_named() -> None:
    stored = {VIEWED_P7: epoch_ms(T0 - 31 * DAY), "Product Viewed|product_id|p-8": epoch_ms(T0)}

    objects, gone = related_objects(stored, [], T0, 30 * DAY)

    assert objects == {"Product Viewed|product_id|p-8": epoch_ms(T0)}
    assert gone == (VIEWED_P7,)


def test_without_a_live_trigger_nothing_leaves_the_list_by_age() -> None:
    stored = {VIEWED_P7: epoch_ms(T0 - 400 * DAY)}
    assert related_objects(stored, [], T0, None) == (stored, ())


def test_past_the_cap_the_oldest_objects_leave_the_list_and_are_named() -> None:
    stored = {f"Product Viewed|product_id|p-{n}": epoch_ms(T0 + n * _MINUTE) for n in range(4)}
    newest = ObjectRelation(
        kind="related", object_key="Product Viewed|product_id|p-9", at=T0 + DAY, contact_key="ada"
    )

    objects, gone = related_objects(stored, [newest], T0 + DAY, 30 * DAY, max_objects=4)

    assert len(objects) < 5
    assert newest.object_key in objects
    assert gone == tuple(sorted(set(stored) - set(objects)))
    assert "Product Viewed|product_id|p-0" in gone


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(st.sampled_from([f"o-{n}" for n in range(8)]), st.integers(0, 60), max_size=8),
    st.lists(st.tuples(st.sampled_from([f"o-{n}" for n in range(10)]), st.integers(0, 60))),
    st.integers(1, 6),
)
def test_every_object_that_leaves_the_list_is_named_to_the_index(
    stored_days: dict[str, int], added_days: list[tuple[str, int]], max_objects: int
) -> None:
    # The index never keeps a contact the list does not name: what leaves is always returned.
    stored = {key: epoch_ms(T0 - days * DAY) for key, days in stored_days.items()}
    records = [
        ObjectRelation(kind="related", object_key=key, at=T0 - days * DAY, contact_key="ada")
        for key, days in added_days
    ]

    objects, gone = related_objects(stored, records, T0, 30 * DAY, max_objects=max_objects)

    named = set(stored) | {r.object_key for r in records}
    assert set(objects) | set(gone) == named
    assert not set(objects) & set(gone)
    assert len(objects) <= max_objects
    assert all(at >= epoch_ms(T0 - 30 * DAY) for at in objects.values())


def test_unrelated_records_take_the_contact_out_of_each_object() -> None:
    assert unrelated("ada", ["b", "a"], T0) == [
        ObjectRelation(kind="unrelated", object_key="a", at=T0, contact_key="ada"),
        ObjectRelation(kind="unrelated", object_key="b", at=T0, contact_key="ada"),
    ]


def test_relations_taken_over_keep_their_times() -> None:
    assert relations_of("ada", {VIEWED_P7: epoch_ms(T0)}) == [
        ObjectRelation(kind="related", object_key=VIEWED_P7, at=T0, contact_key="ada")
    ]


# --- the shell over fakes ---------------------------------------------------------------------


class FakeWorker:
    """What RelationIndex uses of a stream worker: a table (a dict here) and a processor."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[bytes, bytes]] = {}
        self.processors: dict[str, Callable[[list[Record]], Any]] = {}

    def table(self, name: str) -> dict[bytes, bytes]:
        return self.tables.setdefault(name, {})

    def consume(self, topics: list[str], process: Callable[[list[Record]], Any]) -> None:
        for topic in topics:
            self.processors[topic] = process


class FakeProducer:
    """Records what would be produced, one list per `send_all` call."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, str | None, bytes | None]]] = []

    async def send(self, topic: str, key: str | None, value: bytes | None) -> None:
        self.batches.append([(topic, key, value)])

    async def send_all(self, records: Iterable[tuple[str, str | None, bytes | None]]) -> None:
        self.batches.append(list(records))


def index_of(
    *, keep: timedelta = 30 * DAY, shards: int = 8, batch: int = 2, max_contacts: int = 1000
) -> tuple[RelationIndex, FakeWorker, FakeProducer, ManualClock]:
    app, producer, clock = FakeWorker(), FakeProducer(), ManualClock(T0)
    index = RelationIndex(
        app,  # type: ignore[arg-type]
        producer,  # type: ignore[arg-type]
        DeadLetters(producer, "segmenter", clock),  # type: ignore[arg-type]
        clock,
        lambda: keep,
        shards=shards,
        batch=batch,
        max_contacts=max_contacts,
    )
    return index, app, producer, clock


def related(contact: str, at: datetime, key: str = VIEWED_P7) -> ObjectRelation:
    return ObjectRelation(kind="related", object_key=key, at=at, contact_key=contact)


async def test_the_index_fans_an_object_event_out_to_related_contacts_in_batches() -> None:
    index, app, producer, clock = index_of(batch=2)
    assert OBJECT_RELATIONS.name in app.processors
    for contact in ["eve", "ada", "cyd", "bob", "dee"]:
        await index.handle(related(contact, T0))
    await index.handle(related("old", T0 - 40 * DAY))
    await index.handle(related("fay", T0, key="Product Viewed|product_id|p-8"))
    clock.advance(DAY)

    (request,) = fan_out_requests(drop(at=T0 + DAY), [PRICE_DROP], T0 + DAY)
    await index.handle(request)

    assert [len(b) for b in producer.batches] == [2, 2, 1]
    sent = [
        (topic, key, Event.model_validate_json(value or b""))
        for b in producer.batches
        for topic, key, value in b
    ]
    assert [key for _topic, key, _event in sent] == ["ada", "bob", "cyd", "dee", "eve"]
    assert {topic for topic, _key, _event in sent} == {EVENTS.name}
    assert all(e.contact_key == key and is_fan_out_copy(e) for _t, key, e in sent)


async def test_a_repeated_fan_out_sends_the_same_copies() -> None:
    index, _app, producer, _clock = index_of()
    await index.handle(related("ada", T0))
    (request,) = fan_out_requests(drop(at=T0), [PRICE_DROP], T0)

    await index.handle(request)
    await index.handle(request)

    first, second = producer.batches
    assert first == second


async def test_rows_forget_relations_older_than_keep_when_written() -> None:
    index, app, producer, clock = index_of(keep=30 * DAY, shards=1)
    await index.handle(related("ada", T0))
    clock.advance(31 * DAY)
    await index.handle(related("bob", T0 + 31 * DAY))

    (row,) = app.tables["relations"].values()
    assert list(json.loads(row)) == ["bob"]

    clock.advance(31 * DAY)
    (request,) = fan_out_requests(drop(at=T0 + 62 * DAY), [PRICE_DROP], T0 + 62 * DAY)
    await index.handle(request)
    assert producer.batches == []
    assert app.tables["relations"] == {}  # the emptied row is deleted on the fan-out's read


async def test_an_entry_is_capped_to_the_newest_contacts() -> None:
    index, app, _producer, _clock = index_of(shards=1, max_contacts=3)
    for minute, contact in enumerate(["ada", "bob", "cyd", "dee"]):
        await index.handle(related(contact, T0 + timedelta(minutes=minute)))

    (row,) = app.tables["relations"].values()
    assert sorted(json.loads(row)) == ["bob", "cyd", "dee"]


async def test_an_unrelated_contact_leaves_the_entry_and_gets_no_more_copies() -> None:
    index, app, producer, _clock = index_of(shards=1)
    for contact in ["ada", "bob"]:
        await index.handle(related(contact, T0))
    leave = ObjectRelation(kind="unrelated", object_key=VIEWED_P7, at=T0, contact_key="ada")

    await index.handle(leave)
    await index.handle(leave)  # redelivered: nothing more to take out

    (row,) = app.tables["relations"].values()
    assert json.loads(row) == {"bob": epoch_ms(T0)}
    (request,) = fan_out_requests(drop(at=T0), [PRICE_DROP], T0)
    await index.handle(request)
    assert [key for b in producer.batches for _t, key, _v in b] == ["bob"]

    await index.handle(leave.model_copy(update={"contact_key": "bob"}))
    assert app.tables["relations"] == {}  # nobody left: the row is deleted


async def test_undecodable_and_incomplete_records_go_to_dead_letters() -> None:
    _index, app, producer, _clock = index_of()
    incomplete = ObjectRelation(kind="fan_out", object_key=VIEWED_P7, at=T0)
    values = [
        b"not json",
        incomplete.to_wire(),
        related("ada", T0).to_wire(),
        b'{"kind": "other"}',
    ]
    records = [
        Record(OBJECT_RELATIONS.name, 0, offset, VIEWED_P7, value)
        for offset, value in enumerate(values)
    ]

    await app.processors[OBJECT_RELATIONS.name](records)

    letters = [
        DeadLetter.model_validate_json(v or b"") for b in producer.batches for _t, _k, v in b
    ]
    assert [(letter.offset, letter.reason.split(":")[0]) for letter in letters] == [
        (0, "undecodable"),
        (1, "refused"),
        (3, "undecodable"),
    ]
    assert {t for b in producer.batches for t, _k, _v in b} == {DEAD_LETTER.name}
    assert len(app.tables["relations"]) == 1


async def test_an_incomplete_record_is_refused_by_handle_too() -> None:
    index, _app, _producer, _clock = index_of()

    with pytest.raises(ValueError, match="incomplete related record"):
        await index.handle(ObjectRelation(kind="related", object_key=VIEWED_P7, at=T0))


# --- the sweep, over a real table ---------------------------------------------------------------


def test_an_entry_has_expired_once_a_contact_is_older_than_keep() -> None:
    entry = {"ada": epoch_ms(T0), "bob": epoch_ms(T0 + 20 * DAY)}

    assert not has_expired(entry, T0 + 30 * DAY, 30 * DAY)
    assert has_expired(entry, T0 + 31 * DAY, 30 * DAY)


class TableWorker:
    """A stream worker as RelationIndex uses it, with real RocksDB tables on partition 0 (the
    rows a test stages are stored with `commit`, as the worker does after a batch)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.tables: dict[str, Table] = {}
        self.processors: dict[str, Callable[[list[Record]], Any]] = {}
        self.jobs: list[tuple[float, Callable[[], Any]]] = []
        self.hooks: list[Callable[[frozenset[int]], None]] = []

    def table(self, name: str) -> Table:
        table = Table(name, f"{name}-changelog", self.folder)
        table.open(0)
        self.tables[name] = table
        return table

    def consume(self, topics: list[str], process: Callable[[list[Record]], Any]) -> None:
        for topic in topics:
            self.processors[topic] = process

    def every(self, seconds: float, job: Callable[[], Any]) -> None:
        self.jobs.append((seconds, job))

    def on_assigned(self, hook: Callable[[frozenset[int]], None]) -> None:
        self.hooks.append(hook)

    def owned(self) -> frozenset[int]:
        return frozenset({0})

    def commit(self) -> None:
        for table in self.tables.values():
            table.apply(0, None)

    def rows(self) -> dict[str, dict[str, int]]:
        """Object key -> the entry, over all its rows."""
        entries: dict[str, dict[str, int]] = {}
        for key, value in self.tables["relations"].rows(0):
            entries.setdefault(key.rpartition(b"\x00")[0].decode(), {}).update(json.loads(value))
        return entries


@pytest.fixture
def swept(tmp_path: Path) -> Iterator[tuple[RelationIndex, TableWorker, FakeProducer, ManualClock]]:
    app, producer, clock = TableWorker(tmp_path), FakeProducer(), ManualClock(T0)
    keep = [30 * DAY]
    index = RelationIndex(
        app,  # type: ignore[arg-type]
        producer,  # type: ignore[arg-type]
        DeadLetters(producer, "segmenter", clock),  # type: ignore[arg-type]
        clock,
        lambda: keep[0],
        shards=8,
        sweep_seconds=3600,
    )
    focus(0)
    yield index, app, producer, clock
    focus(None)
    for table in app.tables.values():
        table.close(0)


def asked(producer: FakeProducer) -> list[ObjectRelation]:
    return [
        ObjectRelation.model_validate_json(value or b"")
        for batch in producer.batches
        for topic, _key, value in batch
        if topic == OBJECT_RELATIONS.name
    ]


async def test_the_sweep_prunes_objects_nobody_writes_any_more(
    swept: tuple[RelationIndex, TableWorker, FakeProducer, ManualClock],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    index, app, producer, clock = swept
    monkeypatch.setattr(relations_adapter, "SWEEP_SLICE", 2)  # several slices per object
    p8, p9 = "Product Viewed|product_id|p-8", "Product Viewed|product_id|p-9"
    for contact in ["ada", "bob", "cyd", "dee", "eve"]:
        await index.handle(related(contact, T0))  # p-7: all of them old by the sweep
    await index.handle(related("ada", T0, key=p8))
    await index.handle(related("fay", T0 + 10 * DAY, key=p8))
    await index.handle(related("gus", T0 + 10 * DAY, key=p9))
    app.commit()
    clock.advance(35 * DAY)

    assert await index.sweep() == 2

    prunes = asked(producer)
    assert [(p.kind, p.object_key) for p in prunes] == [("prune", VIEWED_P7), ("prune", p8)]
    assert [key for batch in producer.batches for _t, key, _v in batch] == [VIEWED_P7, p8]
    # Handled as records on the objects' keys, in order with any other record of theirs.
    records = [
        Record(OBJECT_RELATIONS.name, 0, n, p.object_key, p.to_wire()) for n, p in enumerate(prunes)
    ]
    await app.processors[OBJECT_RELATIONS.name](records)
    focus(0)
    app.commit()

    assert app.rows() == {
        p8: {"fay": epoch_ms(T0 + 10 * DAY)},
        p9: {"gus": epoch_ms(T0 + 10 * DAY)},
    }
    producer.batches.clear()
    assert await index.sweep() == 0  # nothing left to prune
    assert producer.batches == []


async def test_a_relation_recorded_after_the_sweep_read_its_object_is_kept(
    swept: tuple[RelationIndex, TableWorker, FakeProducer, ManualClock],
) -> None:
    index, app, producer, clock = swept
    await index.handle(related("ada", T0))
    app.commit()
    clock.advance(35 * DAY)
    await index.sweep()
    (prune_record,) = asked(producer)

    await index.handle(related("ada", T0 + 35 * DAY))  # ada viewed it again meanwhile
    await index.handle(prune_record)
    app.commit()

    assert app.rows() == {VIEWED_P7: {"ada": epoch_ms(T0 + 35 * DAY)}}


async def test_without_a_live_trigger_the_sweep_prunes_nothing(tmp_path: Path) -> None:
    app, producer, clock = TableWorker(tmp_path), FakeProducer(), ManualClock(T0)
    index = RelationIndex(
        app,  # type: ignore[arg-type]
        producer,  # type: ignore[arg-type]
        DeadLetters(producer, "segmenter", clock),  # type: ignore[arg-type]
        clock,
        lambda: timedelta(0),
        sweep_seconds=3600,
    )
    focus(0)
    try:
        await index.handle(related("ada", T0))
        app.commit()
        clock.advance(400 * DAY)

        assert await index.sweep() == 0
        assert producer.batches == []
    finally:
        focus(None)
        app.tables["relations"].close(0)


async def test_the_sweep_runs_at_the_start_after_a_rebalance_and_then_every_period(
    swept: tuple[RelationIndex, TableWorker, FakeProducer, ManualClock],
) -> None:
    index, app, producer, clock = swept
    ((look, job),) = app.jobs
    assert look == 60
    await index.handle(related("ada", T0))
    app.commit()
    clock.advance(35 * DAY)

    await job()  # the first look after the start sweeps
    await job()  # not due again yet
    assert len(asked(producer)) == 1
    for hook in app.hooks:
        hook(frozenset({0}))
    await job()  # partitions moved: swept again at once
    clock.advance(timedelta(hours=1))
    await job()  # and again once the period has passed

    assert len(asked(producer)) == 3


class BusyOnce(FakeProducer):
    """The local produce queue is full the first time the sweep sends."""

    def __init__(self) -> None:
        super().__init__()
        self.busy = True

    async def send_all(self, records: Iterable[tuple[str, str | None, bytes | None]]) -> None:
        if self.busy:
            self.busy = False
            raise ProducerBusy("queue full")
        await super().send_all(records)


async def test_a_sweep_that_cannot_publish_is_done_again_at_the_next_look(
    swept: tuple[RelationIndex, TableWorker, FakeProducer, ManualClock],
) -> None:
    index, app, _producer, clock = swept
    busy = BusyOnce()
    index.producer = busy  # type: ignore[assignment]
    ((_look, job),) = app.jobs
    await index.handle(related("ada", T0))
    app.commit()
    clock.advance(35 * DAY)

    await job()
    assert asked(busy) == []
    await job()

    assert [p.object_key for p in asked(busy)] == [VIEWED_P7]


async def test_rows_the_json_module_wrote_read_the_same_and_a_changed_row_is_read_anew() -> None:
    """Rows are JSON (msgspec writes them now, the json module did before); a row kept decoded
    is used only while its stored bytes are the ones it came from."""
    index, app, producer, _clock = index_of(shards=1)
    row_key = f"{VIEWED_P7}\x000".encode()
    older = {"ada": epoch_ms(T0 - DAY), "zoë": epoch_ms(T0 - 2 * DAY)}
    app.tables["relations"][row_key] = json.dumps(older, separators=(",", ":")).encode()

    await index.handle(related("bob", T0))

    stored = json.loads(app.tables["relations"][row_key])
    assert stored == {**older, "bob": epoch_ms(T0)}
    # Another writer (a restored changelog, say) changes the row: the kept decoding is not used.
    app.tables["relations"][row_key] = json.dumps({"cyd": epoch_ms(T0)}).encode()
    (request,) = fan_out_requests(drop(at=T0), [PRICE_DROP], T0)
    await index.handle(request)
    (copies,) = producer.batches
    assert [key for _topic, key, _value in copies] == ["cyd"]
    # The row just written is read back from what was kept, and equals its bytes.
    await index.handle(related("dee", T0))
    misses = index.decoded.misses
    await index.handle(related("eve", T0))
    assert index.decoded.misses == misses
    assert json.loads(app.tables["relations"][row_key]) == {
        "cyd": epoch_ms(T0),
        "dee": epoch_ms(T0),
        "eve": epoch_ms(T0),
    }


async def test_a_row_past_the_decoded_size_is_read_and_written_without_being_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows of a very popular object are parsed each time rather than held: the cache's memory
    stays bounded by its row count times the size it keeps."""
    monkeypatch.setattr(relations_adapter, "DECODED_ROW_BYTES", 40)
    index, app, _producer, _clock = index_of(shards=1)
    await index.handle(related("ada", T0))
    assert len(index.decoded) == 1  # a small row is kept
    for contact in ("bob", "cyd", "dee"):
        await index.handle(related(contact, T0))
    assert len(index.decoded) == 0
    (row,) = app.tables["relations"].values()
    assert json.loads(row) == {c: epoch_ms(T0) for c in ("ada", "bob", "cyd", "dee")}
