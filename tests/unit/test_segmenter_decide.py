"""The segmenter's decisions, without servers: what one event or contact command publishes,
stores and logs (fan-out, suppression after forget, forwarding of merged anonymous contacts,
forget, merge and absorb, the change itself), as the exact commands the shell applies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.segmenter.domain import contact
from services.segmenter.domain.contact import ContactRow
from services.segmenter.domain.decide import (
    Announce,
    Command,
    DeleteAlias,
    DeleteMembership,
    DeleteRow,
    Forward,
    IndexObject,
    LinkAlias,
    Log,
    PublishProfile,
    Report,
    RequestTimer,
    SendCommand,
    StoreMembership,
    StoreRow,
    Suppress,
    UpdateMembers,
    decide,
)
from services.segmenter.domain.definitions import Definitions
from services.segmenter.domain.relations import epoch_ms, fan_out_copy
from shared.conditions import condition_from
from shared.contracts import (
    ContactCommand,
    ContactEvent,
    Event,
    ObjectRelation,
    Profile,
    SegmentTimerRequest,
)
from shared.ids import stable_id
from shared.journeys import ObjectEventTrigger, Relation
from shared.profiles import CONTACT_FORGOTTEN, announce
from shared.segments import AggregateDefinition, SegmentDefinition

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
PRICE_DROP = ObjectEventTrigger(
    type="object_event",
    event="Price Dropped",
    object_property="product_id",
    related_by=Relation(event="Product Viewed", property="product_id", within="30d"),
)
VIEWED_P7 = "Product Viewed|product_id|p-7"
_BASE = Definitions.of(
    [
        AggregateDefinition.model_validate(
            {"id": "views", "event": "Product Viewed", "window": "1d"}
        )
    ],
    [
        SegmentDefinition(
            id="browsers",
            condition=condition_from({"field": "aggregates.views", "op": "gte", "value": 2}),
        ),
        SegmentDefinition(id="vips", condition=condition_from({"tag": "vip"})),
    ],
)
DEFS = Definitions(
    _BASE.aggregates, _BASE.segments, (PRICE_DROP,), _BASE.segment_aggregates, _BASE.digest
)


class Rows:
    """The contact's rows as a fake view; `reads` names what the decision read."""

    def __init__(
        self, row: ContactRow | None = None, merged_into: str | None = None, forgotten: bool = False
    ) -> None:
        self._row, self._merged_into, self._forgotten = row, merged_into, forgotten
        self.reads: list[str] = []

    def row(self) -> ContactRow | None:
        self.reads.append("row")
        return self._row

    def merged_into(self) -> str | None:
        self.reads.append("merged_into")
        return self._merged_into

    def forgotten(self) -> bool:
        self.reads.append("forgotten")
        return self._forgotten


def track(
    name: str, message_id: str, properties: dict[str, Any] | None = None, **who: Any
) -> Event:
    return Event.model_validate(
        {
            "type": "track",
            "event": name,
            "messageId": message_id,
            "properties": properties or {},
            "timestamp": NOW - timedelta(minutes=5),
            "receivedAt": NOW - timedelta(minutes=5),
            **who,
        }
    )


def viewed(message_id: str = "m-1", product: str | None = None, **who: Any) -> Event:
    who = who or {"userId": "ada"}
    return track("Product Viewed", message_id, {"product_id": product} if product else {}, **who)


def order(key: str, kind: str, command_id: str = "c-1", **spec: Any) -> ContactCommand:
    return ContactCommand.model_validate(
        {"command_id": command_id, "contact_key": key, "kind": kind, "at": NOW, **spec}
    )


def row_after(*events: Event, key: str = "ada") -> ContactRow:
    """The row the contact core folds from `events`."""
    row: ContactRow | None = None
    for event in events:
        row = contact.apply(row, event, DEFS, NOW).row
    assert row is not None
    assert row.profile.contact_key == key
    return row


def published(key: str, outcome: contact.Outcome) -> list[Command]:
    """What a changed contact publishes first: one contact event holding its events, then its
    profile."""
    assert outcome.row is not None
    profile = outcome.row.profile
    first, *rest = outcome.events
    return [
        Announce(
            ContactEvent(contact_key=key, event=first, announcements=tuple(rest), profile=profile)
        ),
        PublishProfile(key, profile),
    ]


def cancel(key: str) -> RequestTimer:
    return RequestTimer(SegmentTimerRequest(contact_key=key, due_at=None, requested_at=NOW))


# --- events -----------------------------------------------------------------------------------


def test_a_first_event_announces_publishes_asks_for_a_timer_and_stores_the_rows() -> None:
    event = viewed()
    outcome = contact.apply(None, event, DEFS, NOW)
    row = outcome.row
    assert row is not None
    assert row.next_tick is not None

    decision = decide(Rows(), event, DEFS, NOW)

    assert decision.commands == (
        *published("ada", outcome),
        RequestTimer(
            SegmentTimerRequest(contact_key="ada", due_at=row.next_tick, requested_at=NOW)
        ),
        StoreRow("ada", row),
        StoreMembership("ada", DEFS.digest, ()),
    )


def test_entering_a_segment_stores_the_memberships_row_and_updates_the_member_index() -> None:
    before = row_after(viewed("m-1"))
    event = viewed("m-2")
    outcome = contact.apply(before, event, DEFS, NOW)
    after = outcome.row
    assert after is not None
    assert after.profile.segments == ("browsers",)

    commands = decide(Rows(before), event, DEFS, NOW).commands

    assert commands[-3:] == (
        StoreRow("ada", after),
        StoreMembership("ada", DEFS.digest, ("browsers",)),
        UpdateMembers("ada", (), ("browsers",)),
    )
    assert commands[:2] == tuple(published("ada", outcome))


def test_one_change_is_one_contact_event_with_one_profile_snapshot() -> None:
    """The event and the segments it makes the contact enter travel as one record."""
    event = viewed("m-2")
    commands = decide(Rows(row_after(viewed("m-1"))), event, DEFS, NOW).commands

    announced = [c.contact_event for c in commands if isinstance(c, Announce)]
    assert len(announced) == 1
    (change,) = announced
    assert change.event == event
    assert [(e.event, e.properties) for e in change.announcements] == [
        ("Segment Entered", {"segment": "browsers"})
    ]
    assert change.profile.segments == ("browsers",)
    assert [single.event for single in change.each()] == [event, *change.announcements]
    assert all(single.profile is change.profile for single in change.each())


@pytest.mark.parametrize(
    "name", ["Message Delivered", "Email Opened", "Email Link Clicked", "Unsubscribed"]
)
def test_what_the_dispatcher_follows_is_passed_on_to_its_topic_once(name: str) -> None:
    report = track(name, "r-1", {"message_id": "msg-9", "channel": "email"}, userId="ada")
    report = report.model_copy(update={"source": "waypost-ingest"})
    before = row_after(viewed("m-1"))

    commands = decide(Rows(before), report, DEFS, NOW).commands

    assert [c for c in commands if isinstance(c, Report)] == [Report("ada", report)]
    again = decide(Rows(contact.apply(before, report, DEFS, NOW).row), report, DEFS, NOW)
    assert not [c for c in again.commands if isinstance(c, Report)]


def test_behaviour_is_not_passed_on_to_the_dispatcher() -> None:
    commands = decide(Rows(row_after(viewed("m-1"))), viewed("m-2"), DEFS, NOW).commands
    assert not [c for c in commands if isinstance(c, Report)]


def test_a_duplicate_does_nothing_but_say_so() -> None:
    event = viewed("m-1")
    decision = decide(Rows(row_after(event)), event, DEFS, NOW)
    assert decision.commands == (Log("debug", "segmenter.duplicate", {"message_id": "m-1"}),)


def test_an_object_event_becomes_fan_out_requests_and_reads_nothing() -> None:
    dropped = track("Price Dropped", "drop-1", {"product_id": "p-7"}, userId="catalog")
    rows = Rows(forgotten=True)

    decision = decide(rows, dropped, DEFS, NOW)

    assert decision.commands == (
        IndexObject(
            ObjectRelation(
                kind="fan_out",
                object_key=VIEWED_P7,
                at=dropped.timestamp,
                event=dropped,
                within="30d",
            )
        ),
    )
    assert rows.reads == []


def test_a_related_event_is_indexed_after_the_profile_and_before_the_rows() -> None:
    event = viewed(product="p-7")
    outcome = contact.apply(None, event, DEFS, NOW)
    row = outcome.row
    assert row is not None
    relation = ObjectRelation(
        kind="related", object_key=VIEWED_P7, at=event.timestamp, contact_key="ada"
    )

    decision = decide(Rows(), event, DEFS, NOW)

    # The row lists the object, so that forgetting the contact can take it out of the index.
    listed = row.model_copy(update={"related": {VIEWED_P7: epoch_ms(event.timestamp)}})
    assert decision.commands == (
        *published("ada", outcome),
        RequestTimer(
            SegmentTimerRequest(contact_key="ada", due_at=row.next_tick, requested_at=NOW)
        ),
        IndexObject(relation),
        StoreRow("ada", listed),
        StoreMembership("ada", DEFS.digest, ()),
    )


def test_an_object_that_ages_out_of_the_contacts_list_leaves_the_index() -> None:
    old = NOW - timedelta(days=31)
    known = row_after(viewed()).model_copy(update={"related": {VIEWED_P7: epoch_ms(old)}})

    commands = decide(Rows(known), viewed("m-2", product="p-8"), DEFS, NOW).commands

    viewed_p8 = "Product Viewed|product_id|p-8"
    at = NOW - timedelta(minutes=5)
    assert [c.relation for c in commands if isinstance(c, IndexObject)] == [
        ObjectRelation(kind="related", object_key=viewed_p8, at=at, contact_key="ada"),
        ObjectRelation(kind="unrelated", object_key=VIEWED_P7, at=NOW, contact_key="ada"),
    ]
    (stored,) = [c.row for c in commands if isinstance(c, StoreRow)]
    assert stored.related == {viewed_p8: epoch_ms(at)}


def test_a_forgotten_contacts_events_are_suppressed_without_reading_its_row() -> None:
    rows = Rows(row_after(viewed()), forgotten=True)

    decision = decide(rows, viewed("m-9"), DEFS, NOW)

    assert decision.commands == (Log("info", "segmenter.suppressed_event", {"message_id": "m-9"}),)
    assert "row" not in rows.reads


def test_a_merged_anonymous_contacts_event_is_forwarded_to_the_known_contact() -> None:
    event = viewed("m-3", anonymousId="an-1")
    rows = Rows(merged_into="ada")

    decision = decide(rows, event, DEFS, NOW)

    assert decision.commands == (Forward("ada", event.model_copy(update={"user_id": "ada"})),)
    assert "row" not in rows.reads


def test_a_fan_out_copy_to_a_merged_anonymous_contact_is_forwarded_too() -> None:
    origin = track("Price Dropped", "drop-1", {"product_id": "p-7"}, userId="catalog")
    copy = fan_out_copy(origin, "an-1", VIEWED_P7)

    decision = decide(Rows(merged_into="ada"), copy, DEFS, NOW)

    assert decision.commands == (Forward("ada", copy.model_copy(update={"user_id": "ada"})),)


def test_an_event_of_the_known_contact_itself_is_not_forwarded() -> None:
    # A link names only anonymous keys; an event with a userId is that user's.
    event = viewed("m-4", userId="an-1")
    commands = decide(Rows(merged_into="ada"), event, DEFS, NOW).commands
    assert not any(isinstance(c, Forward) for c in commands)
    assert StoreRow("an-1", row_after(event, key="an-1")) in commands


def test_a_fan_out_copy_to_an_anonymous_contact_stays_anonymous_and_relates_nothing() -> None:
    anonymous = row_after(viewed("m-1", product="p-7", anonymousId="an-1"), key="an-1")
    origin = track("Price Dropped", "drop-1", {"product_id": "p-7"}, userId="catalog")
    copy = fan_out_copy(origin, "an-1", VIEWED_P7)
    as_anonymous = copy.model_copy(update={"user_id": None, "anonymous_id": "an-1"})
    outcome = contact.apply(anonymous, as_anonymous, DEFS, NOW)
    assert outcome.row is not None

    commands = decide(Rows(anonymous), copy, DEFS, NOW).commands

    assert commands[: len(outcome.events) + 1] == tuple(published("an-1", outcome))
    assert outcome.row.profile.user_id is None
    assert not any(isinstance(c, IndexObject) for c in commands)


def test_an_event_linking_an_anonymous_id_asks_it_to_merge_in() -> None:
    identified = Event.model_validate(
        {
            "type": "identify",
            "userId": "ada",
            "anonymousId": "an-1",
            "messageId": "m-5",
            "traits": {"plan": "pro"},
            "timestamp": NOW,
            "receivedAt": NOW,
        }
    )
    outcome = contact.apply(None, identified, DEFS, NOW)
    assert outcome.row is not None
    assert outcome.linked == "an-1"
    merge = ContactCommand(
        command_id=stable_id("m-5", "merge", "an-1"),
        contact_key="an-1",
        kind="merge_into",
        other_key="ada",
        reason="identified",
        at=NOW,
    )

    commands = decide(Rows(), identified, DEFS, NOW).commands

    assert commands == (
        *published("ada", outcome),
        SendCommand(merge),
        StoreRow("ada", outcome.row),
        StoreMembership("ada", DEFS.digest, ()),
    )
    assert outcome.row.profile.anonymous_ids == ("an-1",)


def test_events_waypost_alone_emits_and_events_without_a_contact_are_refused() -> None:
    forged = track("Segment Entered", "m-6", {"segment": "vips"}, userId="ada")
    with pytest.raises(ValueError, match="an event only Waypost emits"):
        decide(Rows(), forged, DEFS, NOW)
    with pytest.raises(ValueError, match="neither userId nor anonymousId"):
        decide(Rows(), track("Product Viewed", "m-7"), DEFS, NOW)


# --- forget -----------------------------------------------------------------------------------


def test_forget_erases_every_row_keeps_a_suppression_and_forgets_merged_ids_again() -> None:
    known = row_after(viewed("m-1"), viewed("m-2"))
    merged = known.profile.model_copy(update={"anonymous_ids": ("an-1", "an-2")})
    viewed_p8 = "Product Viewed|product_id|p-8"
    objects = {viewed_p8: epoch_ms(NOW), VIEWED_P7: epoch_ms(NOW)}
    known = known.model_copy(update={"profile": merged, "related": objects})
    assert known.next_tick is not None
    assert known.profile.segments == ("browsers",)
    forget = order("ada", "forget", reason="asked")
    blank = Profile(contact_key="ada", first_seen=NOW, last_seen=NOW, updated_at=NOW)
    forgotten = announce(
        known.profile, CONTACT_FORGOTTEN, {}, stable_id("c-1", "forgotten"), NOW, NOW
    )

    decision = decide(Rows(known), forget, DEFS, NOW)

    assert decision.commands == (
        Announce(ContactEvent(contact_key="ada", event=forgotten, profile=blank)),
        PublishProfile("ada", None),
        Report("ada", forgotten),
        # The contact leaves every object it is related to, on the objects' own partitions.
        IndexObject(
            ObjectRelation(kind="unrelated", object_key=VIEWED_P7, at=NOW, contact_key="ada")
        ),
        IndexObject(
            ObjectRelation(kind="unrelated", object_key=viewed_p8, at=NOW, contact_key="ada")
        ),
        cancel("ada"),
        SendCommand(
            forget.model_copy(
                update={"command_id": stable_id("c-1", "an-1"), "contact_key": "an-1"}
            )
        ),
        SendCommand(
            forget.model_copy(
                update={"command_id": stable_id("c-1", "an-2"), "contact_key": "an-2"}
            )
        ),
        Suppress("ada", NOW),
        DeleteRow("ada"),
        DeleteMembership("ada"),
        DeleteAlias("ada"),
        UpdateMembers("ada", ("browsers",), ()),
        Log("info", "segmenter.contact_forgotten", {"reason": "asked"}),
    )


def test_forgetting_an_unknown_or_forgotten_contact_erases_again() -> None:
    forget = order("zed", "forget")
    blank = Profile(contact_key="zed", first_seen=NOW, last_seen=NOW, updated_at=NOW)
    forgotten = announce(blank, CONTACT_FORGOTTEN, {}, stable_id("c-1", "forgotten"), NOW, NOW)

    for rows in (Rows(), Rows(forgotten=True)):
        assert decide(rows, forget, DEFS, NOW).commands == (
            Announce(ContactEvent(contact_key="zed", event=forgotten, profile=blank)),
            PublishProfile("zed", None),
            Report("zed", forgotten),
            Suppress("zed", NOW),
            DeleteRow("zed"),
            DeleteMembership("zed"),
            DeleteAlias("zed"),
            UpdateMembers("zed", (), ()),
            Log("info", "segmenter.contact_forgotten", {"reason": None}),
        )


@pytest.mark.parametrize(
    "command",
    [
        order("ada", "add_tag", tag="vip"),
        order("ada", "reevaluate"),
        order("ada", "merge_into", other_key="bob"),
        order("ada", "absorb"),  # refused if it were read: a forgotten contact reads nothing more
    ],
)
def test_a_forgotten_contact_ignores_every_command_but_forget(command: ContactCommand) -> None:
    assert decide(Rows(row_after(viewed()), forgotten=True), command, DEFS, NOW).commands == ()


# --- merge: the anonymous contact hands over, the known one absorbs ---------------------------


def test_merge_into_hands_the_row_over_and_leaves_a_link() -> None:
    anonymous = row_after(
        viewed("m-1", anonymousId="an-1"), viewed("m-2", anonymousId="an-1"), key="an-1"
    ).model_copy(update={"related": {VIEWED_P7: epoch_ms(NOW)}})
    assert anonymous.next_tick is not None
    merge = order("an-1", "merge_into", command_id="c-m", other_key="ada", reason="identified")
    absorb = ContactCommand(
        command_id=stable_id("c-m", "absorb"),
        contact_key="ada",
        kind="absorb",
        other_key="an-1",
        state=anonymous.model_dump(mode="json"),
        reason="identified",
        at=NOW,
    )

    decision = decide(Rows(anonymous), merge, DEFS, NOW)

    assert decision.commands == (
        SendCommand(absorb),
        PublishProfile("an-1", None),
        # The anonymous key leaves the index; the known contact takes its relations over.
        IndexObject(
            ObjectRelation(kind="unrelated", object_key=VIEWED_P7, at=NOW, contact_key="an-1")
        ),
        cancel("an-1"),
        DeleteRow("an-1"),
        DeleteMembership("an-1"),
        UpdateMembers("an-1", ("browsers",), ()),
        LinkAlias("an-1", "ada"),
        Log("info", "segmenter.merged", {"into": "ada", "had_history": True}),
    )


def test_merge_into_without_history_only_leaves_the_link() -> None:
    merge = order("an-1", "merge_into", other_key="ada")
    assert decide(Rows(), merge, DEFS, NOW).commands == (
        LinkAlias("an-1", "ada"),
        Log("info", "segmenter.merged", {"into": "ada", "had_history": False}),
    )


def test_the_first_link_wins() -> None:
    again = order("an-1", "merge_into", other_key="ada")
    other = order("an-1", "merge_into", other_key="bob")
    rows = Rows(row_after(viewed(anonymousId="an-1"), key="an-1"), merged_into="ada")
    assert decide(rows, again, DEFS, NOW).commands == ()
    assert decide(rows, other, DEFS, NOW).commands == (
        Log("warning", "segmenter.already_merged", {"into": "ada", "asked": "bob"}),
    )
    assert "row" not in rows.reads


@pytest.mark.parametrize("other_key", [None, "", "an-1"])
def test_merge_into_needs_another_contact(other_key: str | None) -> None:
    with pytest.raises(ValueError, match="merge_into needs another contact"):
        decide(Rows(), order("an-1", "merge_into", other_key=other_key), DEFS, NOW)


def test_absorb_merges_the_anonymous_history_once() -> None:
    # The known contact linked the anonymous id (and asked it to merge) before the absorb.
    known = row_after(viewed("m-1", userId="ada", anonymousId="an-1"))
    anonymous = row_after(viewed("m-2", anonymousId="an-1"), key="an-1")
    absorb = order(
        "ada", "absorb", command_id="c-a", other_key="an-1", state=anonymous.model_dump(mode="json")
    )
    outcome = contact.absorb(known, "ada", anonymous, DEFS, NOW, "c-a")
    merged = outcome.row
    assert merged is not None
    assert merged.profile.segments == ("browsers",)
    assert not outcome.retime  # both viewed in the same hour: the timer stays where it was

    commands = decide(Rows(known), absorb, DEFS, NOW).commands

    assert commands == (
        *published("ada", outcome),
        StoreRow("ada", merged),
        StoreMembership("ada", DEFS.digest, ("browsers",)),
        UpdateMembers("ada", (), ("browsers",)),
    )
    assert merged.profile.anonymous_ids == ("an-1",)
    # Redelivered, the absorb changes nothing.
    assert decide(Rows(merged), absorb, DEFS, NOW).commands == ()


def test_absorb_takes_the_anonymous_relations_over_once() -> None:
    known = row_after(viewed("m-1", userId="ada", anonymousId="an-1"))
    seen = NOW - timedelta(days=2)
    anonymous = row_after(viewed("m-2", anonymousId="an-1"), key="an-1").model_copy(
        update={"related": {VIEWED_P7: epoch_ms(seen)}}
    )
    absorb = order(
        "ada", "absorb", command_id="c-a", other_key="an-1", state=anonymous.model_dump(mode="json")
    )

    commands = decide(Rows(known), absorb, DEFS, NOW).commands

    assert [c.relation for c in commands if isinstance(c, IndexObject)] == [
        ObjectRelation(kind="related", object_key=VIEWED_P7, at=seen, contact_key="ada")
    ]
    (stored,) = [c.row for c in commands if isinstance(c, StoreRow)]
    assert stored.related == {VIEWED_P7: epoch_ms(seen)}
    assert decide(Rows(stored), absorb, DEFS, NOW).commands == ()


def test_absorb_needs_the_state_and_the_other_key() -> None:
    with pytest.raises(ValueError, match="absorb needs"):
        decide(Rows(), order("ada", "absorb", other_key="an-1"), DEFS, NOW)


# --- other commands ---------------------------------------------------------------------------


def test_reevaluating_an_unknown_contact_does_nothing() -> None:
    assert decide(Rows(), order("ada", "reevaluate"), DEFS, NOW).commands == ()


def test_a_tag_enters_a_segment() -> None:
    known = row_after(viewed())
    tag = order("ada", "add_tag", tag="vip")
    outcome = contact.command(known, tag, DEFS, NOW)
    assert outcome.row is not None

    commands = decide(Rows(known), tag, DEFS, NOW).commands

    assert commands == (
        *published("ada", outcome),
        StoreRow("ada", outcome.row),
        StoreMembership("ada", DEFS.digest, ("vips",)),
        UpdateMembers("ada", (), ("vips",)),
    )


def test_a_command_that_changes_nothing_does_nothing() -> None:
    tagged = contact.command(row_after(viewed()), order("ada", "add_tag", tag="vip"), DEFS, NOW).row
    again = order("ada", "add_tag", command_id="c-2", tag="vip")
    assert decide(Rows(tagged), again, DEFS, NOW).commands == ()
