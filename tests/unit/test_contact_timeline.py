"""A contact's timeline (pure): what the recent-events view keeps of an event, the newest 50 per
contact once each, the erasure in a batch, and events, journey steps and messages merged newest
first."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from jinja2 import Environment, FileSystemLoader
from pymongo import DeleteOne, InsertOne

from services.admin.adapters.recent_events import recent_event_writes
from services.admin.domain.timeline import (
    RECENT_EVENTS,
    contact_timeline,
    keep_recent,
    recent_entry,
)
from services.admin.ui.pages import HERE
from shared.contracts import ContactEvent, Event, Profile
from shared.kafka import Record
from shared.profiles import CONTACT_FORGOTTEN
from shared.topics import CONTACT_EVENTS

T0 = datetime(2026, 11, 3, 9, 0, tzinfo=UTC)


def event(name: str, n: int, minutes: int = 0, **properties: Any) -> Event:
    return Event(
        type="track",
        event=name,
        user_id="ada",
        message_id=f"m-{n}",
        timestamp=T0 + timedelta(minutes=minutes),
        received_at=T0 + timedelta(minutes=minutes),
        properties=properties,
    )


def record(offset: int, change: Event, key: str = "ada") -> Record:
    profile = Profile(contact_key=key, first_seen=T0, last_seen=T0, updated_at=T0)
    value = ContactEvent(contact_key=key, event=change, profile=profile).to_wire()
    return Record(CONTACT_EVENTS.name, 0, offset, key, value)


def test_an_event_keeps_its_name_time_and_first_few_properties_cut_short() -> None:
    kept = recent_entry(
        event("Order Completed", 1, total=80, note="x" * 100, a=1, b=True, c=None, d="more")
    )

    assert kept == {
        "id": "m-1",
        "name": "Order Completed",
        "type": "track",
        "at": T0,
        "properties": {"total": 80, "note": "x" * 59 + "…", "a": 1, "b": True, "c": None},
        "more_properties": 1,
    }
    identify = Event(
        type="identify",
        user_id="ada",
        message_id="m-2",
        timestamp=T0,
        received_at=T0,
        traits={"plan": "pro"},
    )
    assert recent_entry(identify)["properties"] == {"plan": "pro"}
    assert recent_entry(identify)["name"] == "identify"


def test_only_the_newest_events_are_kept_each_once() -> None:
    stored = [recent_entry(event("Page Viewed", n, minutes=n)) for n in range(RECENT_EVENTS)]
    arrived = [
        recent_entry(event("Page Viewed", RECENT_EVENTS - 1, minutes=RECENT_EVENTS - 1)),  # again
        recent_entry(event("Order Completed", 100, minutes=100)),
    ]

    kept = keep_recent(stored, arrived)

    assert len(kept) == RECENT_EVENTS
    assert kept[0]["id"] == "m-1"  # the oldest made room
    assert [e["id"] for e in kept[-2:]] == [f"m-{RECENT_EVENTS - 1}", "m-100"]
    assert keep_recent(kept, arrived) == kept  # a replayed batch changes nothing


def test_a_batch_becomes_one_write_per_contact_and_an_erasure_deletes() -> None:
    batch = [
        record(0, event("Product Viewed", 1)),
        record(1, event("Cart Viewed", 2, key_unused=1), key="bob"),
        record(2, event("Product Added", 3)),
        record(3, event(CONTACT_FORGOTTEN, 4), key="bob"),
        record(4, event("Cart Viewed", 5), key="bob"),  # after the erasure: not kept
        Record(CONTACT_EVENTS.name, 0, 5, "ada", b"not json"),
    ]

    writes = dict(recent_event_writes(batch))

    assert isinstance(writes["bob"], DeleteOne)
    assert isinstance(writes["ada"], InsertOne)
    assert [e["name"] for e in writes["ada"]._doc["events"]] == ["Product Viewed", "Product Added"]
    # Her profile counts no events at all here: nothing can be stored for her yet.
    assert writes["ada"]._doc["new"] is True


def test_a_contact_is_taken_for_new_only_while_its_profile_counts_no_earlier_event() -> None:
    def counted(n: int, total: int, key: str = "ada") -> Record:
        change = ContactEvent(
            contact_key=key,
            event=event("Product Viewed", n),
            profile=Profile(
                contact_key=key,
                first_seen=T0,
                last_seen=T0,
                updated_at=T0,
                event_counts={"Product Viewed": total - 1, "Signed Up": 1},
            ),
        )
        return Record(CONTACT_EVENTS.name, 0, n, key, change.to_wire())

    first_two = dict(recent_event_writes([counted(1, 1), counted(2, 2)]))
    later = dict(recent_event_writes([counted(3, 3)]))
    both = dict(recent_event_writes([counted(1, 1, key="bob"), counted(4, 5)]))

    assert first_two["ada"]._doc["new"] is True
    assert later["ada"]._doc["new"] is False  # counts 3 events, the batch brings 1
    assert both["bob"]._doc["new"] is True
    assert both["ada"]._doc["new"] is False


def test_events_journey_steps_and_messages_merge_newest_first() -> None:
    at = T0.replace(tzinfo=None)  # the store gives times back without a zone, in UTC
    events = [
        {"id": "m-1", "name": "Signed Up", "type": "track", "at": at, "properties": {"plan": "pro"}}
    ]
    records = [
        {
            "kind": "step_completed",
            "journey_id": "welcome",
            "journey_version": 1,
            "step_id": "hello",
            "at": at + timedelta(seconds=1),
            "why": "send welcome on email",
        },
        {
            "kind": "waiting",
            "journey_id": "welcome",
            "journey_version": 1,
            "step_id": "pause",
            "at": at + timedelta(seconds=1),
            "why": "wait until 2026-11-04 09:00 UTC",
        },
        {"kind": "forgotten", "journey_id": "", "at": at + timedelta(days=9)},
    ]
    messages = [
        {
            "message_id": "msg-1",
            "channel": "email",
            "template_id": "welcome",
            "journey_id": "welcome",
            "step_id": "hello",
            "state": "delivered",
            "requested_at": at + timedelta(seconds=1),
            "sent_at": at + timedelta(seconds=2),
            "delivered_at": at + timedelta(seconds=3),
        }
    ]

    lines = contact_timeline(events, records, messages)

    assert [(line["kind"], line["text"]) for line in lines] == [
        ("message", "welcome on email: delivered"),
        ("journey", "wait until 2026-11-04 09:00 UTC"),
        ("journey", "send welcome on email"),
        ("event", "Signed Up (plan = pro)"),
    ]
    assert [s["state"] for s in lines[0]["states"]] == ["requested", "sent", "delivered"]
    assert lines[0]["at"] == at + timedelta(seconds=3)


def test_the_contact_page_s_timeline_shows_each_line_with_its_states() -> None:
    at = T0.replace(tzinfo=None)
    lines = contact_timeline(
        [{"id": "m-1", "name": "Signed Up", "type": "track", "at": at, "properties": {}}],
        [],
        [
            {
                "message_id": "msg-1",
                "channel": "email",
                "template_id": "welcome",
                "journey_id": "welcome",
                "step_id": "hello",
                "state": "sent",
                "requested_at": at,
                "sent_at": at + timedelta(seconds=2),
            }
        ],
    )
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True)
    env.globals.update(quote=str)

    page = env.get_template("contact_timeline.html").render(timeline=lines)

    rows = re.findall(r'<tr class="timeline-(\w+)">', page)
    assert rows == ["message", "event"]
    assert "(requested 09:00:00, sent 09:00:02)" in page
    assert "<td>Signed Up</td>" in page
