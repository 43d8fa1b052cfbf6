"""The segmenter's contact fold: aggregates, memberships, time-driven changes, de-duplication,
alias merges, consent; and the property that incremental equals a fold from scratch."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from services.segmenter.domain import contact
from services.segmenter.domain.contact import ContactRow
from services.segmenter.domain.definitions import Definitions
from shared.conditions import condition_from
from shared.contracts import ContactCommand, Event, wire_json
from shared.journeys import SEGMENT_ENTERED, SEGMENT_LEFT
from shared.segments import AggregateDefinition, SegmentDefinition

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def _aggregate(**spec: Any) -> AggregateDefinition:
    return AggregateDefinition.model_validate(spec)


def _segment(segment_id: str, condition: dict[str, Any]) -> SegmentDefinition:
    return SegmentDefinition(id=segment_id, condition=condition_from(condition))


S11 = Definitions.of(
    [
        _aggregate(id="product_views_7d", event="Product Viewed", window="7d"),
        _aggregate(id="orders_7d", event="Order Completed", window="7d"),
        _aggregate(id="lifetime_value", event="Order Completed", function="sum", property="total"),
    ],
    [
        _segment(
            "high-intent",
            {
                "all": [
                    {"field": "aggregates.product_views_7d", "op": "gte", "value": 2},
                    {"field": "aggregates.orders_7d", "op": "eq", "value": 0},
                    {"field": "aggregates.lifetime_value", "op": "gt", "value": 100},
                ]
            },
        )
    ],
)
S9 = Definitions.of(
    [
        _aggregate(id="orders_total", event="Order Completed"),
        _aggregate(id="last_order_at", event="Order Completed", function="last_at"),
    ],
    [
        _segment(
            "churn-risk",
            {
                "all": [
                    {"field": "aggregates.orders_total", "op": "gte", "value": 1},
                    {"field": "aggregates.last_order_at", "op": "before", "ago": "90d"},
                ]
            },
        ),
        # A segment that reads another one sees the membership just worked out.
        _segment(
            "churn-risk-vip",
            {"all": [{"segment": "churn-risk"}, {"tag": "vip"}]},
        ),
    ],
)


def _event(
    name: str,
    at: datetime,
    message_id: str,
    *,
    received: datetime | None = None,
    user: str = "u-1",
    anonymous: str | None = None,
    **properties: Any,
) -> Event:
    return Event(
        type="track",
        event=name,
        user_id=user,
        anonymous_id=anonymous,
        message_id=message_id,
        timestamp=at,
        received_at=received or at,
        properties=properties,
    )


def _labels(outcome: contact.Outcome) -> list[tuple[str, Any]]:
    return [
        (e.event, e.properties.get("segment"))
        for e in outcome.events
        if e.event in (SEGMENT_ENTERED, SEGMENT_LEFT)
    ]


def _fold(events: list[Event], defs: Definitions, now: datetime) -> ContactRow:
    row: ContactRow | None = None
    for event in events:
        outcome = contact.apply(row, event, defs, now)
        row = outcome.row
    assert row is not None
    return row


def test_s11_enters_on_the_second_view_and_leaves_when_the_window_slides() -> None:
    now = T0
    row = _fold(
        [
            _event("Order Completed", now - 10 * DAY, "o-1", received=now, total=150),
            _event("Product Viewed", now - timedelta(hours=3), "v-1", received=now),
        ],
        S11,
        now,
    )
    assert row.profile.segments == ()
    outcome = contact.apply(row, _event("Product Viewed", now, "v-2"), S11, now)
    assert _labels(outcome) == [(SEGMENT_ENTERED, "high-intent")]
    assert outcome.row is not None
    assert outcome.row.profile.aggregates == {
        "lifetime_value": 150,
        "orders_7d": 0,
        "product_views_7d": 2,
    }
    # The first view's hourly bucket leaves the 7-day window first: the timer was armed for it
    # by that view, and the second view did not move it.
    first_bucket = (now - timedelta(hours=3)).replace(minute=0)
    assert not outcome.retime
    assert outcome.row.next_tick == first_bucket + 7 * DAY
    # Time alone: at that instant the count drops to 1 and the contact leaves.
    tick = outcome.row.next_tick
    assert tick is not None
    before = contact.reevaluate(outcome.row, "tick-1", S11, tick - timedelta(seconds=1))
    assert _labels(before) == []
    left = contact.reevaluate(outcome.row, "tick-1", S11, tick)
    assert _labels(left) == [(SEGMENT_LEFT, "high-intent")]
    assert left.row is not None
    assert left.row.profile.aggregates["product_views_7d"] == 1


def test_s11_an_order_in_the_window_takes_the_contact_out_at_once() -> None:
    row = _fold(
        [
            _event("Order Completed", T0 - 10 * DAY, "o-1", received=T0, total=150),
            _event("Product Viewed", T0, "v-1"),
            _event("Product Viewed", T0, "v-2"),
        ],
        S11,
        T0,
    )
    assert row.profile.segments == ("high-intent",)
    outcome = contact.apply(row, _event("Order Completed", T0, "o-2", total=20), S11, T0)
    assert _labels(outcome) == [(SEGMENT_LEFT, "high-intent")]


def test_s9_enters_when_the_last_order_becomes_older_than_90_days() -> None:
    row = _fold([_event("Order Completed", T0, "o-1")], S9, T0)
    assert row.profile.segments == ()
    tick = row.next_tick
    assert tick is not None
    assert tick > T0 + 90 * DAY
    assert tick - (T0 + 90 * DAY) < timedelta(seconds=1)
    entered = contact.reevaluate(row, "tick", S9, tick)
    assert _labels(entered) == [(SEGMENT_ENTERED, "churn-risk")]
    # A new order puts the contact back out and moves the timer 90 days on.
    assert entered.row is not None
    later = tick + 5 * DAY
    back = contact.apply(entered.row, _event("Order Completed", later, "o-2"), S9, later)
    assert _labels(back) == [(SEGMENT_LEFT, "churn-risk")]
    assert back.row is not None
    assert back.row.next_tick is not None
    assert back.row.next_tick - later - 90 * DAY < timedelta(milliseconds=1)


def test_the_timer_moves_only_earlier_and_an_early_firing_arms_the_next() -> None:
    first = _fold([_event("Order Completed", T0, "o-1")], S9, T0)
    armed = first.next_tick
    assert armed is not None
    # A second order moves the flip a day on; the timer already armed stays (it is sooner).
    later = T0 + DAY
    second = contact.apply(first, _event("Order Completed", later, "o-2"), S9, later)
    assert second.row is not None
    assert not second.retime
    assert second.row.next_tick == armed
    # It fires early: nothing changes, and the re-check arms the flip of the second order.
    early = contact.reevaluate(second.row, "tick-1", S9, armed)
    assert _labels(early) == []
    assert early.retime
    assert early.row is not None
    due = early.row.next_tick
    assert due is not None
    assert due - (later + 90 * DAY) < timedelta(seconds=1)
    assert due > later + 90 * DAY
    # Then the contact enters on time.
    entered = contact.reevaluate(early.row, "tick-2", S9, due)
    assert _labels(entered) == [(SEGMENT_ENTERED, "churn-risk")]


def test_a_sooner_instant_moves_the_timer_earlier() -> None:
    row = _fold([_event("Product Viewed", T0, "v-1")], S11, T0)
    assert row.next_tick == T0 + 7 * DAY  # the view's hourly bucket leaves the window
    # A view three days old, delivered late, has a bucket that leaves the window sooner.
    late = contact.apply(row, _event("Product Viewed", T0 - 3 * DAY, "v-0", received=T0), S11, T0)
    assert late.row is not None
    assert late.retime
    assert late.row.next_tick == T0 + 4 * DAY


def test_a_segment_reading_another_follows_it_in_the_same_turn() -> None:
    row = _fold([_event("Order Completed", T0 - 100 * DAY, "o-1", received=T0)], S9, T0)
    assert row.profile.segments == ("churn-risk",)
    tagged = contact.command(
        row,
        ContactCommand(command_id="c-1", contact_key="u-1", kind="add_tag", tag="vip", at=T0),
        S9,
        T0,
    )
    assert [e.event for e in tagged.events] == ["Tag Added", SEGMENT_ENTERED]
    assert tagged.row is not None
    assert tagged.row.profile.segments == ("churn-risk", "churn-risk-vip")


def test_a_repeated_message_id_changes_nothing_for_a_day() -> None:
    row = _fold([_event("Product Viewed", T0, "v-1")], S11, T0)
    again = contact.apply(row, _event("Product Viewed", T0, "v-1"), S11, T0 + 23 * DAY / 24)
    assert again.duplicate
    assert again.row is row
    # Ids are remembered for at least 24 hours, grouped by the hour, each hour's in one string;
    # past the window, only the newest `OLDER_IDS` stay: memory stays bounded by a day of
    # traffic and a few kilobytes.
    much_later = T0 + 2 * DAY
    other = contact.apply(row, _event("Product Viewed", much_later, "v-2"), S11, much_later)
    assert other.row is not None
    hour = str(int(much_later.timestamp()) // 3600 * 3600)
    assert other.row.seen == {contact.OLDER: row.seen[_hour(T0)], hour: _digest("v-2")}


def _hour(at: datetime) -> str:
    return str(int(at.timestamp()) // 3600 * 3600)


def _digest(message_id: str) -> str:
    return contact._message_digest(message_id)


def test_message_ids_older_than_the_window_stay_duplicates_up_to_a_count() -> None:
    count = contact.OLDER_IDS + 40
    ids = [f"v-{n}" for n in range(count)]
    # One event an hour: by the end, all but the last day's hours are past the window.
    row = None
    for n, message_id in enumerate(ids):
        at = T0 + timedelta(hours=n)
        outcome = contact.apply(row, _event("Product Viewed", at, message_id), S11, at)
        assert not outcome.duplicate
        row = outcome.row
    assert row is not None
    hours = [h for h in row.seen if h != contact.OLDER]
    assert 24 <= len(hours) <= 26
    # Of the ids before the window, the newest stay: with the window's, the last `OLDER_IDS`...
    older = row.seen[contact.OLDER].split()
    assert older == [_digest(i) for i in ids[-contact.OLDER_IDS : -len(hours)]]
    later = T0 + timedelta(hours=count)

    def again(message_id: str) -> bool:
        return contact.apply(row, _event("Product Viewed", later, message_id), S11, later).duplicate

    assert all(again(i) for i in ids[-contact.OLDER_IDS :])
    # ... and the oldest go: the row does not grow with the contact's history.
    assert not any(again(i) for i in ids[: -contact.OLDER_IDS])


def test_a_busy_contact_keeps_no_ids_from_before_the_window() -> None:
    """A day with `OLDER_IDS` events or more is all the row keeps: the window holds the newest
    ids already."""
    row = None
    start = T0 - 2 * DAY
    for n in range(contact.OLDER_IDS + 30):
        # 30 events two days ago, then the rest within the last hours.
        at = start + timedelta(minutes=n) if n < 30 else T0 + timedelta(seconds=n)
        outcome = contact.apply(row, _event("Product Viewed", at, f"b-{n}"), S11, at)
        row = outcome.row
    assert row is not None
    assert contact.OLDER not in row.seen
    assert not contact.apply(row, _event("Product Viewed", T0, "b-0"), S11, T0 + DAY / 2).duplicate


def test_a_row_written_with_lists_of_digests_reads_and_keeps_its_duplicates() -> None:
    row = _fold([_event("Product Viewed", T0, "v-1")], S11, T0)
    old = row.model_dump(mode="json")
    old["seen"] = {h: ids[0].split() for h, ids in old["seen"].items()}
    decoded = ContactRow.model_validate_json(json.dumps(old))
    assert decoded == row
    assert contact.apply(decoded, _event("Product Viewed", T0, "v-1"), S11, T0).duplicate


class _EarlierRow(BaseModel):
    """`ContactRow.seen` as segmenters of earlier versions read it."""

    seen: dict[str, list[str]]


def test_a_row_keeps_the_shape_earlier_versions_read() -> None:
    """A rolling upgrade or a rollback: an earlier segmenter reads the row (finding none of its
    digests) and adds a digest to the hour's list; this version then finds both."""
    row = _fold([_event("Product Viewed", T0, "v-1"), _event("Product Viewed", T0, "v-2")], S11, T0)
    earlier = _EarlierRow.model_validate_json(wire_json(row))
    assert earlier.seen == {_hour(T0): [f"{_digest('v-1')} {_digest('v-2')}"]}
    stored = json.loads(wire_json(row))
    stored["seen"][_hour(T0)].append(_digest("v-3"))
    back = ContactRow.model_validate(stored)
    assert back.seen == {_hour(T0): " ".join(map(_digest, ("v-1", "v-2", "v-3")))}
    for message_id in ("v-1", "v-2", "v-3"):
        assert contact.apply(back, _event("Product Viewed", T0, message_id), S11, T0).duplicate


def test_the_message_ids_a_profile_kept_move_into_the_row() -> None:
    """Rows written when the profile kept its last 256 message ids (in `recent_message_ids`):
    those ids stay duplicates, and the profile keeps none after the next change."""
    row = _fold([_event("Product Viewed", T0, "v-1")], S11, T0)
    legacy = row.model_copy(
        update={
            "seen": {},
            "profile": row.profile.model_copy(update={"recent_message_ids": ("v-0", "v-1")}),
        }
    )
    later = T0 + 3 * DAY
    assert contact.apply(legacy, _event("Product Viewed", later, "v-0"), S11, later).duplicate
    assert contact.apply(legacy, _event("Product Viewed", later, "v-1"), S11, later).duplicate
    moved = contact.apply(legacy, _event("Product Viewed", later, "v-2"), S11, later).row
    assert moved is not None
    assert moved.profile.recent_message_ids == ()
    assert moved.seen[contact.OLDER] == f"{_digest('v-0')} {_digest('v-1')}"
    assert moved.profile.event_counts == {"Product Viewed": 2}


def test_a_row_of_an_earlier_version_keeps_its_newest_256_ids() -> None:
    """Such a row holds its last day's digests by the hour and, in the profile, its last 256 ids,
    the day's among them: each is kept once, so none of the newest 256 is let go."""
    ids = [f"m-{n}" for n in range(400)]
    row = None
    for n, message_id in enumerate(ids):
        # 300 a day apart, then 100 within the last hour.
        at = T0 - timedelta(days=400 - n) if n < 300 else T0 - timedelta(minutes=50, seconds=-n)
        row = contact.apply(row, _event("Product Viewed", at, message_id), S11, at).row
    assert row is not None
    legacy = row.model_copy(
        update={
            "seen": {h: ids for h, ids in row.seen.items() if h != contact.OLDER},
            "profile": row.profile.model_copy(update={"recent_message_ids": tuple(ids[-256:])}),
        }
    )
    after = contact.apply(legacy, _event("Product Viewed", T0, "m-new"), S11, T0).row
    assert after is not None
    assert after.profile.recent_message_ids == ()
    assert [
        i
        for i in ids[-255:]
        if not contact.apply(after, _event("Product Viewed", T0, i), S11, T0).duplicate
    ] == []


def test_absorbing_keeps_each_digest_once_and_the_older_ones_in_order() -> None:
    """Digests already older than the window (under `OLDER`) come first, the anonymous
    contact's before the known one's (the newest stay when there are too many); then the
    hours that left the window, oldest first."""
    known = _fold([_event("Product Viewed", T0 - 3 * DAY, "k-old")], S11, T0 - 3 * DAY)
    known = contact.apply(known, _event("Product Viewed", T0, "k-new"), S11, T0).row
    anonymous = _fold(
        [_event("Product Viewed", T0 - 2 * DAY, "a-old", user="", anonymous="anon-1")],
        S11,
        T0 - 2 * DAY,
    )
    # An earlier version's anonymous row: its last ids in the profile, one also in its hours.
    anonymous = anonymous.model_copy(
        update={
            "profile": anonymous.profile.model_copy(
                update={"recent_message_ids": ("a-legacy", "a-old")}
            )
        }
    )
    assert known is not None
    merged = contact.absorb(known, "u-1", anonymous, S11, T0, "merge-1").row
    assert merged is not None
    older = merged.seen[contact.OLDER].split()
    assert older == [_digest(i) for i in ("a-legacy", "k-old", "a-old")]
    for message_id in ("k-old", "k-new", "a-old", "a-legacy"):
        again = _event("Product Viewed", T0, message_id, user="u-1")
        assert contact.apply(merged, again, S11, T0).duplicate


_digests = st.text("0123456789abcdef", min_size=16, max_size=16)


@settings(max_examples=300)
@given(
    hours=st.dictionaries(
        st.integers(min_value=0, max_value=60).map(lambda h: str(h * 3600)),
        st.lists(_digests, min_size=1, max_size=6),
        max_size=5,
    ),
    digest=_digests,
)
def test_a_digest_is_found_exactly_when_it_was_kept(
    hours: dict[str, list[str]], digest: str
) -> None:
    """One string an hour: a match is one of its digests, never a span across two."""
    seen = {h: " ".join(ids) for h, ids in hours.items()}
    now = datetime.fromtimestamp(30 * 3600, UTC)
    kept = contact._unless_seen(seen, digest, now)
    assert (kept is None) == any(digest in ids for ids in hours.values())
    if kept is not None:
        everything = {d for ids in hours.values() for d in ids}
        assert {d for ids in kept.values() for d in ids.split()} == everything


def test_unsubscribed_withdraws_the_channel_and_subscribed_gives_it_back() -> None:
    row = _fold([_event("Unsubscribed", T0, "u-1", channel="sms")], S11, T0)
    assert row.profile.consent == {"sms": False}
    row = _fold([_event("Subscribed", T0, "s-1", channel="sms")], S11, T0)
    assert row.profile.consent == {"sms": True}


def test_a_push_token_the_provider_called_unregistered_leaves_the_profile() -> None:
    identify = Event(
        type="identify",
        user_id="u-1",
        message_id="i-1",
        timestamp=T0,
        received_at=T0,
        traits={"push_tokens": ["old", "dead", "new"], "push_token": "dead"},
    )
    failed = _event(
        "Message Failed", T0, "f-1", channel="push", address_invalid=True, address="dead"
    )
    row = _fold([identify, failed], S11, T0)
    assert row.profile.traits["push_tokens"] == ["old", "new"]
    assert "push_token" not in row.profile.traits
    # A failure that does not condemn the token (a retry exhausted, say) keeps it.
    kept = _fold(
        [identify, _event("Message Failed", T0, "f-2", channel="push", address="new")], S11, T0
    )
    assert kept.profile.traits["push_tokens"] == ["old", "dead", "new"]


def test_an_identified_event_links_the_anonymous_key_once() -> None:
    first = contact.apply(
        None, _event("Signed Up", T0, "e-1", user="u-7", anonymous="anon-7"), S11, T0
    )
    assert first.linked == "anon-7"
    assert first.row is not None
    second = contact.apply(
        first.row, _event("Product Viewed", T0, "e-2", user="u-7", anonymous="anon-7"), S11, T0
    )
    assert second.linked is None


def test_absorbing_an_anonymous_history_merges_counts_and_memberships() -> None:
    anonymous = _fold(
        [_event("Product Viewed", T0, f"a-{i}", user="", anonymous="anon-1") for i in range(2)]
        + [
            _event(
                "Order Completed",
                T0 - 20 * DAY,
                "a-o",
                received=T0,
                user="",
                anonymous="anon-1",
                total=120,
            )
        ],
        S11,
        T0,
    )
    assert anonymous.profile.contact_key == "anon-1"
    known = _fold([_event("Signed Up", T0, "k-1", user="u-1", anonymous="anon-1")], S11, T0)
    merged = contact.absorb(known, "u-1", anonymous, S11, T0, "merge-1")
    assert merged.row is not None
    assert merged.row.profile.aggregates["product_views_7d"] == 2
    assert merged.row.profile.aggregates["lifetime_value"] == 120
    assert merged.row.profile.event_counts["Product Viewed"] == 2
    assert _labels(merged) == [(SEGMENT_ENTERED, "high-intent")]
    # A repeated hand-over adds nothing.
    again = contact.absorb(merged.row, "u-1", anonymous, S11, T0, "merge-1")
    assert again.row is merged.row
    # The anonymous ids it saw are remembered: a replayed anonymous event is a duplicate.
    replay = contact.apply(merged.row, _event("Product Viewed", T0, "a-0", user="u-1"), S11, T0)
    assert replay.duplicate


def test_absorbing_before_the_known_contact_linked_the_id_lists_it_once() -> None:
    anonymous = _fold([_event("Product Viewed", T0, "a-0", user="", anonymous="anon-2")], S11, T0)
    assert "anon-2" in anonymous.profile.anonymous_ids  # it lists its own key
    known = _fold([_event("Signed Up", T0, "k-1", user="u-2")], S11, T0)
    assert "anon-2" not in known.profile.anonymous_ids

    merged = contact.absorb(known, "u-2", anonymous, S11, T0, "merge-2")

    assert merged.row is not None
    assert merged.row.profile.anonymous_ids.count("anon-2") == 1


_NAMES = ("Product Viewed", "Order Completed")


@st.composite
def _histories(draw: st.DrawFn) -> tuple[list[Event], list[Event]]:
    """Unique events within the last 6 days (the lateness bound inside the 7-day window), and
    the same events as delivered: shuffled, with some sent twice."""
    size = draw(st.integers(min_value=0, max_value=25))
    events = [
        _event(
            draw(st.sampled_from(_NAMES)),
            T0 - timedelta(minutes=draw(st.integers(min_value=0, max_value=6 * 24 * 60))),
            f"m-{i}",
            received=T0,
            total=draw(st.integers(min_value=0, max_value=90)),
        )
        for i in range(size)
    ]
    repeats = draw(st.lists(st.sampled_from(events), max_size=8)) if events else []
    delivered = draw(st.permutations(events + repeats))
    return events, list(delivered)


@settings(max_examples=150, deadline=None)
@given(_histories(), st.integers(min_value=0, max_value=8 * 24))
def test_incremental_state_equals_a_fold_from_scratch(
    histories: tuple[list[Event], list[Event]], hours_later: int
) -> None:
    events, delivered = histories
    if not events:
        return
    scratch = _fold(sorted(events, key=lambda e: e.timestamp), S11, T0)
    incremental = _fold(delivered, S11, T0)
    assert incremental.aggregates == scratch.aggregates
    assert incremental.profile.aggregates == scratch.profile.aggregates
    assert incremental.profile.segments == scratch.profile.segments
    assert incremental.next_tick == scratch.next_tick
    # And both slide identically with time alone.
    later = T0 + timedelta(hours=hours_later)
    a = contact.reevaluate(incremental, "tick", S11, later).row
    b = contact.reevaluate(scratch, "tick", S11, later).row
    assert a is not None
    assert b is not None
    assert a.profile.aggregates == b.profile.aggregates
    assert a.profile.segments == b.profile.segments


def test_a_row_round_trips_through_its_stored_json() -> None:
    row = _fold(
        [
            _event("Order Completed", T0 - 10 * DAY, "o-1", received=T0, total=150),
            _event("Product Viewed", T0, "v-1"),
        ],
        S11,
        T0,
    )
    assert ContactRow.model_validate_json(row.model_dump_json()) == row


# Definitions reading every kind of input: windows of minutes to days and all time, a sum, an
# instant with `ago`, traits, tags, the contact's own fields, and segments reading segments.
MIXED = Definitions.of(
    [
        _aggregate(id="views_1h", event="Product Viewed", window="1h"),
        _aggregate(id="views_7d", event="Product Viewed", window="7d"),
        _aggregate(id="orders", event="Order Completed"),
        _aggregate(
            id="revenue_30d",
            event="Order Completed",
            function="sum",
            property="total",
            window="30d",
        ),
        _aggregate(id="last_order_at", event="Order Completed", function="last_at"),
    ],
    [
        _segment("browsers", {"field": "aggregates.views_7d", "op": "gte", "value": 3}),
        _segment("hot", {"field": "aggregates.views_1h", "op": "gte", "value": 2}),
        _segment("buyers", {"field": "aggregates.orders", "op": "gte", "value": 1}),
        _segment("big", {"field": "aggregates.revenue_30d", "op": "gt", "value": 100}),
        _segment(
            "lapsed",
            {
                "all": [
                    {"segment": "buyers"},
                    {"field": "aggregates.last_order_at", "op": "before", "ago": "2d"},
                ]
            },
        ),
        _segment("french", {"field": "traits.country", "op": "eq", "value": "FR"}),
        _segment("vip", {"any": [{"tag": "vip"}, {"segment": "big"}]}),
        _segment("known", {"field": "contact.user_id", "op": "exists"}),
        _segment("recent", {"field": "contact.last_seen", "op": "after", "ago": "1d"}),
        _segment("in-two", {"field": "segments", "op": "contains", "value": "hot"}),
        _segment("quiet", {"not": {"any": [{"segment": "hot"}, {"segment": "browsers"}]}}),
    ],
)

_STEP = st.tuples(
    st.sampled_from(["view", "view", "view", "order", "identify", "tag", "untag", "tick"]),
    st.integers(min_value=0, max_value=3 * 24 * 60),  # minutes the clock moves first
    st.integers(min_value=0, max_value=7 * 24 * 60),  # how long before now the event happened
    st.integers(min_value=0, max_value=90),
)


def _step(
    row: ContactRow | None, step: tuple[str, int, int, int], n: int, now: datetime
) -> contact.Outcome:
    kind, _moved, before, amount = step
    if kind in ("tag", "untag"):
        change = ContactCommand(
            command_id=f"c-{n}",
            contact_key="u-1",
            kind="add_tag" if kind == "tag" else "remove_tag",
            tag="vip",
            at=now,
        )
        return contact.command(row, change, MIXED, now)
    if kind == "tick":
        assert row is not None
        return contact.reevaluate(row, f"t-{n}", MIXED, now)
    at = now - timedelta(minutes=before)
    if kind == "identify":
        event = Event(
            type="identify",
            user_id="u-1",
            message_id=f"m-{n}",
            timestamp=at,
            received_at=now,
            traits={"country": "FR" if amount % 2 else "DE"},
        )
    else:
        name = "Product Viewed" if kind == "view" else "Order Completed"
        event = _event(name, at, f"m-{n}", received=now, total=amount)
    return contact.apply(row, event, MIXED, now)


@settings(max_examples=200, deadline=None)
@given(st.lists(_STEP, min_size=1, max_size=30))
def test_re_checking_only_what_a_change_can_move_equals_re_checking_everything(
    steps: list[tuple[str, int, int, int]],
) -> None:
    """A change settles only the aggregates it folded into and re-checks only the segments
    reading what moved, while no bucket has left its window; the same change with everything
    settled again (the row's `stable_until` forgotten) gives the same row and announcements."""
    now = T0
    row: ContactRow | None = None
    for n, step in enumerate(steps):
        now += timedelta(minutes=step[1])
        if row is None and step[0] == "tick":
            continue
        quick = _step(row, step, n, now)
        forgotten = None if row is None else row.model_copy(update={"stable_until": 0})
        full = _step(forgotten, step, n, now)
        if full.row is forgotten and forgotten is not None:
            # A change that changed nothing (a tag already there) leaves the row as it was.
            assert quick.row is row
        else:
            assert quick.row == full.row
        assert quick.events == full.events
        assert quick.retime == full.retime
        row = quick.row
