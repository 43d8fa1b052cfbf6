"""The segmenter on the real stack: S11 and S9 segments with live exact counts that follow
posted events and slide with time alone (short windows), the anonymous-to-known merge, and
SIGKILL of the segmenter mid-stream ending with exact counts and memberships."""

from __future__ import annotations

import signal
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

from shared.contracts import ContactEvent, ObjectRelation, Profile, SegmentCount
from shared.deadletter import read_dead_letters
from shared.journeys import SEGMENT_ENTERED, SEGMENT_LEFT
from shared.segments import (
    AggregateDefinition,
    PublishedAggregate,
    PublishedSegment,
    SegmentDefinition,
)
from shared.topics import (
    ALL_TOPICS,
    CONTACT_EVENTS,
    DEFINITIONS,
    OBJECT_RELATIONS,
    PROFILES,
    SEGMENT_COUNTS,
)
from tests.e2e.helpers import (
    outbox,
    post,
    publish_inline,
    read_topic,
    shopper,
    unique,
    wait_drained,
    wait_for,
)

pytestmark = pytest.mark.e2e
ADMIN = {"Authorization": "Bearer wp_dev_admin_key"}


def publish_segments(
    stack: Any, aggregates: list[dict[str, Any]], segments: list[dict[str, Any]]
) -> None:
    """Put aggregate and segment definitions on the definitions topic, as publishing does."""
    now = datetime.now(UTC)
    producer = Producer({"bootstrap.servers": stack.bootstrap})
    records: list[PublishedAggregate | PublishedSegment] = [
        PublishedAggregate(aggregate=AggregateDefinition.model_validate(a), published_at=now)
        for a in aggregates
    ]
    records += [
        PublishedSegment(segment=SegmentDefinition.model_validate(s), published_at=now)
        for s in segments
    ]
    for record in records:
        producer.produce(DEFINITIONS.name, key=record.key, value=record.model_dump_json())
    assert producer.flush(10) == 0


def counts(stack: Any) -> dict[str, int]:
    """The live member count of every segment: the latest count of each partition, summed."""
    latest: dict[str, SegmentCount] = {}
    for key, value in read_topic(stack.bootstrap, SEGMENT_COUNTS.name):
        if key is not None and value is not None:
            latest[key] = SegmentCount.model_validate_json(value)
    totals: dict[str, int] = {}
    for count in latest.values():
        totals[count.segment_id] = totals.get(count.segment_id, 0) + count.members
    return totals


def wait_count(stack: Any, segment: str, expected: int, timeout: float = 90.0) -> None:
    last: list[int | None] = [None]

    def reached() -> bool:
        last[0] = counts(stack).get(segment)
        return last[0] == expected

    try:
        wait_for(reached, timeout=timeout, what=f"{segment} to count {expected}")
    except AssertionError as exc:
        raise AssertionError(f"{exc} (it counts {last[0]})") from None


def only(tag: str) -> dict[str, str]:
    """An aggregate's `where` that takes only the events of one test (`properties.run` = tag):
    other tests, running beside it, post the same event names for contacts of their own."""
    return {"run": tag}


def profiles(stack: Any) -> dict[str, Profile | None]:
    """The latest profile of every contact (None once erased or merged away)."""
    found: dict[str, Profile | None] = {}
    for key, value in read_topic(stack.bootstrap, PROFILES.name):
        if key is not None:
            found[key] = Profile.model_validate_json(value) if value is not None else None
    return found


def profile(stack: Any, key: str) -> Profile | None:
    return profiles(stack).get(key)


def all_membership_events(stack: Any, tag: str) -> dict[str, list[tuple[str, str]]]:
    """Per contact, (label, segment) of every distinct change of membership in the segments
    named `tag-…` (a test's own: other tests' segments, published beside it, match its
    contacts too)."""
    seen: dict[str, dict[str, tuple[str, str]]] = {}
    for key, value in read_topic(stack.bootstrap, CONTACT_EVENTS.name):
        if key is None or value is None:
            continue
        for event in ContactEvent.model_validate_json(value).events:
            segment = str(event.properties.get("segment"))
            if event.event in (SEGMENT_ENTERED, SEGMENT_LEFT) and segment.startswith(f"{tag}-"):
                seen.setdefault(key, {})[event.message_id] = (str(event.event), segment)
    return {key: list(changes.values()) for key, changes in seen.items()}


def membership_events(stack: Any, key: str, tag: str) -> list[tuple[str, str]]:
    return all_membership_events(stack, tag).get(key, [])


def track(stack: Any, body: dict[str, Any]) -> None:
    answer = post(stack, "track", body)
    assert answer.status_code == 200, answer.text


def test_s11_count_follows_events_and_slides_with_time_alone(stack: Any) -> None:
    tag = unique("s11")
    views, orders, value, segment = f"{tag}-views", f"{tag}-orders", f"{tag}-ltv", f"{tag}-seg"
    publish_segments(
        stack,
        [
            # Windows long enough that a loaded machine still sees the buyer in the segment
            # before time takes them out.
            {"id": views, "event": "Product Viewed", "window": "45s", "where": only(tag)},
            {"id": orders, "event": "Order Completed", "window": "45s", "where": only(tag)},
            {
                "id": value,
                "event": "Order Completed",
                "function": "sum",
                "property": "total",
                "where": only(tag),
            },
        ],
        [
            {
                "id": segment,
                "condition": {
                    "all": [
                        {"field": f"aggregates.{views}", "op": "gte", "value": 2},
                        {"field": f"aggregates.{orders}", "op": "eq", "value": 0},
                        {"field": f"aggregates.{value}", "op": "gt", "value": 100},
                    ]
                },
            }
        ],
    )
    wait_count(stack, segment, 0)
    buyer, browser = unique("buyer"), unique("browser")
    long_ago = (datetime.now(UTC) - timedelta(minutes=2)).isoformat()
    track(
        stack,
        {
            "userId": buyer,
            "event": "Order Completed",
            "timestamp": long_ago,
            "properties": {"total": 150, "run": tag},
        },
    )
    for user in (buyer, buyer, browser, browser):
        track(
            stack,
            {"userId": user, "event": "Product Viewed", "properties": {"sku": "p-1", "run": tag}},
        )
    # The buyer: two views, no order in the window, lifetime value 150. The browser has no value.
    wait_count(stack, segment, 1)
    assert membership_events(stack, buyer, tag) == [(SEGMENT_ENTERED, segment)]
    assert membership_events(stack, browser, tag) == []
    # No new event: the views leave the 45-second window and the count drops by itself.
    wait_count(stack, segment, 0, timeout=120)
    wait_for(
        lambda: (
            membership_events(stack, buyer, tag)
            == [(SEGMENT_ENTERED, segment), (SEGMENT_LEFT, segment)]
        ),
        what="the time-driven Segment Left",
    )
    buyer_profile = profile(stack, buyer)
    assert buyer_profile is not None
    assert buyer_profile.aggregates[views] == 0
    assert buyer_profile.aggregates[value] == 150


def test_s9_a_last_order_older_than_the_threshold_enters_without_a_new_event(stack: Any) -> None:
    tag = unique("s9")
    total, last, segment = f"{tag}-orders", f"{tag}-last", f"{tag}-seg"
    publish_segments(
        stack,
        [
            {"id": total, "event": "Order Completed", "where": only(tag)},
            {"id": last, "event": "Order Completed", "function": "last_at", "where": only(tag)},
        ],
        [
            {
                "id": segment,
                "condition": {
                    "all": [
                        {"field": f"aggregates.{total}", "op": "gte", "value": 1},
                        # Long enough that the customer is seen out of the segment first,
                        # on a loaded machine too.
                        {"field": f"aggregates.{last}", "op": "before", "ago": "20s"},
                    ]
                },
            }
        ],
    )
    wait_count(stack, segment, 0)
    customer = unique("customer")
    track(
        stack,
        {"userId": customer, "event": "Order Completed", "properties": {"total": 40, "run": tag}},
    )
    wait_for(lambda: profile(stack, customer), what="the customer's profile")
    assert counts(stack).get(segment) == 0
    wait_count(stack, segment, 1, timeout=120)
    assert membership_events(stack, customer, tag) == [(SEGMENT_ENTERED, segment)]
    # A new order takes the customer out at once; time brings them back.
    track(
        stack,
        {"userId": customer, "event": "Order Completed", "properties": {"total": 10, "run": tag}},
    )
    wait_count(stack, segment, 0)
    wait_count(stack, segment, 1, timeout=120)


def test_anonymous_browsing_then_sign_up_is_one_contact_with_merged_counts(stack: Any) -> None:
    tag = unique("merge")
    views = f"{tag}-views"
    publish_segments(
        stack,
        [{"id": views, "event": "Product Viewed", "window": "1d", "where": only(tag)}],
        [
            {
                "id": f"{tag}-seg",
                "condition": {"field": f"aggregates.{views}", "op": "gte", "value": 3},
            }
        ],
    )
    wait_count(stack, f"{tag}-seg", 0)
    anonymous, user = unique("anon"), unique("user")
    for sku in ("a", "b"):
        track(
            stack,
            {
                "anonymousId": anonymous,
                "event": "Product Viewed",
                "properties": {"sku": sku, "run": tag},
            },
        )
    wait_for(lambda: profile(stack, anonymous), what="the anonymous profile")
    answer = post(
        stack,
        "identify",
        {"userId": user, "anonymousId": anonymous, "traits": {"email": f"{user}@example.com"}},
    )
    assert answer.status_code == 200, answer.text

    def merged() -> Profile | None:
        found = profile(stack, user)
        return found if found is not None and found.aggregates.get(views) == 2 else None

    known = wait_for(merged, what="the anonymous views merged into the known contact")
    assert anonymous in known.anonymous_ids
    assert known.event_counts["Product Viewed"] == 2
    wait_for(lambda: profile(stack, anonymous) is None, what="the anonymous profile's tombstone")
    # Later anonymous events (an old tab, a cached page) route to the known contact.
    track(
        stack,
        {
            "anonymousId": anonymous,
            "event": "Product Viewed",
            "properties": {"sku": "c", "run": tag},
        },
    )
    wait_count(stack, f"{tag}-seg", 1)
    final = profile(stack, user)
    assert final is not None
    assert final.aggregates[views] == 3
    assert final.event_counts["Product Viewed"] == 3


@pytest.mark.serial
def test_sigkill_of_the_segmenter_mid_stream_ends_with_exact_counts(stack: Any) -> None:
    tag = unique("kill")
    pings, segment = f"{tag}-pings", f"{tag}-seg"
    name = f"Ping {tag}"
    publish_segments(
        stack,
        [{"id": pings, "event": name}],
        [{"id": segment, "condition": {"field": f"aggregates.{pings}", "op": "gte", "value": 3}}],
    )
    wait_count(stack, segment, 0)
    sent = {unique(f"k{n}"): (n * 7) % 6 for n in range(60)}
    expected_members = sorted(user for user, n in sent.items() if n >= 3)
    calls = [
        {"type": "track", "userId": user, "event": name, "messageId": f"{user}-{i}"}
        for i in range(max(sent.values()))
        for user, n in sent.items()
        if i < n
    ]

    def send_all() -> None:
        for start in range(0, len(calls), 10):
            answer = post(stack, "batch", {"batch": calls[start : start + 10]})
            assert answer.status_code == 200, answer.text

    sender = threading.Thread(target=send_all)
    sender.start()
    wait_for(lambda: counts(stack).get(segment, 0) > 0, what="the first members")
    stack.stop("segmenter", signal.SIGKILL)
    assert stack.pid("segmenter") is None
    sender.join(timeout=120)
    # Re-post a slice: the same message ids must not count twice.
    post(stack, "batch", {"batch": calls[:30]})
    stack.start_service("segmenter")
    stack.wait_service("segmenter")
    wait_count(stack, segment, len(expected_members), timeout=120)
    wait_drained(stack, timeout=120)
    assert counts(stack)[segment] == len(expected_members)
    latest, changes = profiles(stack), all_membership_events(stack, tag)
    for user, n in sent.items():
        found = latest.get(user)
        if n == 0:
            assert found is None  # no event, no contact
            continue
        assert found is not None, user
        assert found.event_counts.get(name) == n, (user, found.event_counts)
        assert found.aggregates[pings] == n
        assert (segment in found.segments) == (n >= 3)
        assert changes.get(user, []) == ([(SEGMENT_ENTERED, segment)] if n >= 3 else [])


def test_a_new_segment_is_backfilled_over_existing_contacts(stack: Any) -> None:
    tag = unique("backfill")
    name, visits = f"Visited {tag}", f"{tag}-visits"
    # A live segment reads the aggregate, so the segmenter keeps it from now on.
    publish_segments(
        stack,
        [{"id": visits, "event": name}],
        [
            {
                "id": f"{tag}-any",
                "condition": {"field": f"aggregates.{visits}", "op": "gte", "value": 1},
            }
        ],
    )
    wait_count(stack, f"{tag}-any", 0)
    people = [unique("early") for _ in range(6)]
    for n, user in enumerate(people):
        for i in range(n):
            track(stack, {"userId": user, "event": name, "messageId": f"{user}-{i}"})
        # Plan names of this test alone: other tests' contacts share the stack.
        plan = f"{tag}-pro" if n % 2 else f"{tag}-free"
        post(stack, "identify", {"userId": user, "traits": {"plan": plan}})
    wait_count(stack, f"{tag}-any", 5)
    # Two segments published after the contacts acted: the backfill evaluates every one of them.
    publish_segments(
        stack,
        [],
        [
            {
                "id": f"{tag}-4",
                "condition": {"field": f"aggregates.{visits}", "op": "gte", "value": 4},
            },
            {
                "id": f"{tag}-pro",
                "condition": {"field": "traits.plan", "op": "eq", "value": f"{tag}-pro"},
            },
        ],
    )
    wait_count(stack, f"{tag}-4", 2)
    wait_count(stack, f"{tag}-pro", 3)
    assert membership_events(stack, people[4], tag) == [
        (SEGMENT_ENTERED, f"{tag}-any"),
        (SEGMENT_ENTERED, f"{tag}-4"),
    ]


def test_forget_erases_the_contact_and_later_events_do_not_bring_it_back(stack: Any) -> None:
    tag = unique("forget")
    seen, segment = f"{tag}-seen", f"{tag}-seg"
    publish_segments(
        stack,
        [{"id": seen, "event": f"Seen {tag}"}],
        [{"id": segment, "condition": {"field": f"aggregates.{seen}", "op": "gte", "value": 1}}],
    )
    wait_count(stack, segment, 0)
    user = unique("leaver")
    track(stack, {"userId": user, "event": f"Seen {tag}"})
    wait_count(stack, segment, 1)
    answer = httpx.delete(f"{stack.admin_url}/v1/contacts/{user}", headers=ADMIN, timeout=10)
    assert answer.status_code == 202, answer.text
    wait_count(stack, segment, 0)
    wait_for(lambda: user in profiles(stack) and profile(stack, user) is None, what="tombstone")
    wait_for(
        lambda: (
            httpx.get(
                f"{stack.admin_url}/v1/contacts/{user}", headers=ADMIN, timeout=10
            ).status_code
            == 404
        ),
        what="the stored view erased",
    )
    # The suppression record keeps a returning event from rebuilding the profile.
    track(stack, {"userId": user, "event": f"Seen {tag}"})
    wait_drained(stack)
    assert profile(stack, user) is None
    assert counts(stack)[segment] == 0


@pytest.mark.first_start
def test_s8_a_price_drop_reaches_everyone_who_viewed_the_product(
    stack: Any, tmp_path: Path
) -> None:
    journey_id = unique("price-drop")
    publish_inline(
        stack,
        tmp_path,
        journey_id,
        {
            "type": "object_event",
            "event": "Price Dropped",
            "object_property": "product_id",
            "related_by": {"event": "Product Viewed", "property": "product_id", "within": "30d"},
        },
        [{"id": "tell", "type": "send", "template": f"{journey_id}-mail"}],
        {
            f"{journey_id}-mail": {
                "subject": "{{ event.properties.name }} now {{ event.new_price }}",
                "text": "Was {{ event.old_price }}, now {{ event.new_price }}.",
            }
        },
    )
    product, other = unique("sku"), unique("sku")
    viewers = [shopper(stack, "viewer") for _ in range(3)]
    bystander = shopper(stack, "bystander")

    def indexed(user: str, sku: str) -> bool:
        """View the product until the index holds the relation (the journey may still be on
        its way to the segmenter's definitions)."""
        track(stack, {"userId": user, "event": "Product Viewed", "properties": {"product_id": sku}})
        return any(
            value is not None and ObjectRelation.model_validate_json(value).contact_key == user
            for key, value in read_topic(stack.bootstrap, OBJECT_RELATIONS.name)
            if key == f"Product Viewed|product_id|{sku}"
        )

    for user, _email in viewers:
        wait_for(lambda u=user: indexed(u, product), what="the view in the object index")
    wait_for(lambda: indexed(bystander[0], other), what="the other product's view")
    drop = {
        "anonymousId": "catalog",
        "event": "Price Dropped",
        "messageId": unique("drop"),
        "properties": {"product_id": product, "name": "Lamp", "old_price": 80, "new_price": 60},
    }
    track(stack, drop)
    for _user, email in viewers:
        wait_for(lambda e=email: outbox(stack, to=e), what="every viewer's message")
    # The same drop again (a client retry) reaches nobody twice.
    track(stack, drop)
    wait_drained(stack)
    for _user, email in viewers:
        [message] = outbox(stack, to=email)
        assert message["subject"] == "Lamp now 60"
    assert outbox(stack, to=bystander[1]) == []
    assert profile(stack, "catalog") is None


@pytest.mark.first_start
def test_a_new_stack_had_every_topic_before_its_first_record(stack: Any) -> None:
    """Runs right after the price drop above, on the session's brand-new stack: every topic of
    the registry and every table's changelog existed with the stack's partitions, so nothing
    (the object index's first records above included) went to the dead-letter topic."""
    admin = AdminClient({"bootstrap.servers": stack.bootstrap})
    listed = admin.list_topics(timeout=10).topics
    changelogs = {
        f"waypost-{service}-{table}-changelog"
        for service, tables in (
            ("segmenter", ("contacts", "memberships", "links", "relations")),
            ("orchestrator", ("contacts", "timers")),
        )
        for table in tables
    }
    for name in changelogs:
        assert len(listed[name].partitions) == stack.partitions, name
    for topic in ALL_TOPICS:
        assert len(listed[topic.name].partitions) == (
            1 if topic.single_partition else stack.partitions
        ), topic.name
    assert [stored.letter for stored in read_dead_letters(stack.bootstrap)] == []
