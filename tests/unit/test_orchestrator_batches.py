"""The orchestrator shell folds batches: any batch boundaries give what one stimulus at a time
gives (outputs, contact rows, timer rows), including a segment clock fired in the same batch as
the request that replaced it. Dicts stand in for the worker's tables, a list for Kafka."""

from __future__ import annotations

import asyncio
import itertools
from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from services.orchestrator.adapters.timers import TimerStore
from services.orchestrator.adapters.webhooks import Webhooks
from services.orchestrator.app import Journeys
from services.orchestrator.domain.destinations import DestinationPolicy
from services.orchestrator.domain.segment_clock import SEGMENT_CLOCK, segment_timer_id
from shared.clock import ManualClock
from shared.contracts import SegmentTimerRequest, TimerFired
from shared.deadletter import DeadLetters
from shared.journey_engine.catalog import Catalog
from shared.journeys import PublishedJourney
from shared.kafka import Record
from shared.profiles import CONTACT_FORGOTTEN
from shared.topics import CONTACT_EVENTS, DEAD_LETTER, SEGMENT_TIMERS, TIMERS
from tests.unit.test_orchestrator_contact_rows import (
    NEVER,
    T0,
    WELCOME,
    FixedCatalog,
    Outbox,
    tracked,
)

KEYS = ("ada", "bob")
HOUR = timedelta(hours=1)


def record(n: int, step: tuple[str, str, int]) -> Record:
    key, kind, k = step
    if kind == "sign-up":
        value = tracked("Signed Up", f"m-{k}", contact=key).contact_event.to_wire()
        return Record(CONTACT_EVENTS.name, 0, n, key, value)
    if kind == "forget":
        value = tracked(CONTACT_FORGOTTEN, f"f-{n}", contact=key).contact_event.to_wire()
        return Record(CONTACT_EVENTS.name, 0, n, key, value)
    if kind == "poison":
        return Record(CONTACT_EVENTS.name, 0, n, key, b"{}")
    due = T0 + k * HOUR
    if kind == "ask":
        request = SegmentTimerRequest(contact_key=key, due_at=due, requested_at=T0)
        return Record(SEGMENT_TIMERS.name, 0, n, key, request.to_wire())
    fired = TimerFired(
        contact_key=key,
        timer_id=segment_timer_id(key, due),
        instance_id=SEGMENT_CLOCK,
        due_at=due,
        fired_at=due,
    )
    return Record(TIMERS.name, 0, n, key, fired.to_wire())


STEP = st.tuples(
    st.sampled_from(KEYS),
    st.sampled_from(["sign-up", "sign-up", "ask", "ask", "fire", "fire", "forget", "poison"]),
    st.integers(0, 3),
)


def run(batches: list[list[Record]]) -> tuple[dict[bytes, bytes], dict[bytes, bytes], list[object]]:
    clock = ManualClock(T0 + 10 * HOUR)
    outbox = Outbox()
    contacts: dict[bytes, bytes] = {}
    table: dict[bytes, bytes] = {}
    journeys = Journeys(
        contacts,
        TimerStore(table, refire_after=NEVER, refire_max=NEVER),
        FixedCatalog(Catalog.of([PublishedJourney(journey=WELCOME, published_at=T0)])),
        outbox,
        clock,
        Webhooks(outbox, clock, DestinationPolicy(), deadline_seconds=60, max_in_flight=4),  # type: ignore[arg-type]
        DeadLetters(outbox, "orchestrator", clock),  # type: ignore[arg-type]
        coupon_key=b"test-coupon-key",
    )
    for batch in batches:
        asyncio.run(journeys.process(batch))
    outputs = [(t, k, v if t != DEAD_LETTER.name else b"letter") for t, k, v in outbox.records]
    return contacts, table, outputs


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(STEP, min_size=1, max_size=20), cuts=st.lists(st.integers(0, 25)))
def test_any_batch_boundaries_give_what_one_stimulus_at_a_time_gives(
    steps: list[tuple[str, str, int]], cuts: list[int]
) -> None:
    records = [record(n, step) for n, step in enumerate(steps)]
    bounds = sorted({c % (len(records) + 1) for c in cuts} | {0, len(records)})
    batches = [records[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    assert run(batches) == run([[r] for r in records])


def test_a_change_announcing_several_events_is_one_stimulus_per_event_in_order() -> None:
    """A contact event holds a change and what it announced, with one profile: the shell takes
    each event as if it had come in a record of its own."""
    viewed = tracked("Product Viewed", "m-1").contact_event
    signed_up = tracked("Signed Up", "m-2").contact_event
    together = viewed.model_copy(update={"announcements": (signed_up.event,)})
    one = [Record(CONTACT_EVENTS.name, 0, 0, "ada", together.to_wire())]
    apart = [
        Record(CONTACT_EVENTS.name, 0, n, "ada", c.to_wire())
        for n, c in enumerate((viewed, signed_up))
    ]

    contacts, timers, outputs = run([one])

    assert (contacts, timers, outputs) == run([apart])
    sends = [value for topic, _key, value in outputs if topic == "waypost.send-requests.v1"]
    assert len(sends) == 1
    assert b'"template_id":"hello"' in sends[0]


def test_a_forged_erasure_or_announcement_is_skipped_with_a_warning() -> None:
    """Names only Waypost emits, from another source, in a record that reached the contact
    events by another route than the segmenter: the orchestrator acts on none of them."""
    signed_up = Record(
        CONTACT_EVENTS.name, 0, 0, "ada", tracked("Signed Up", "m-1").contact_event.to_wire()
    )
    entered = tracked("Segment Entered", "f-2").contact_event
    forged = [
        tracked(CONTACT_FORGOTTEN, "f-1", source="web").contact_event,
        entered.model_copy(update={"event": entered.event.model_copy(update={"source": None})}),
    ]
    records = [
        Record(CONTACT_EVENTS.name, 0, n, "ada", c.to_wire()) for n, c in enumerate(forged, 1)
    ]

    with capture_logs() as logs:
        contacts, timers, outputs = run([[signed_up], records])

    # As if the forged records never came: the welcome journey still waits, nothing erased.
    assert (contacts, timers, outputs) == run([[signed_up]])
    assert contacts
    assert [(line["event"], line["name"], line["source"]) for line in logs] == [
        ("orchestrator.forged_event", CONTACT_FORGOTTEN, "web"),
        ("orchestrator.forged_event", "Segment Entered", None),
    ]
    # The same erasure from Waypost is acted on.
    waypost = tracked(CONTACT_FORGOTTEN, "f-3").contact_event.to_wire()
    erased, _timers, _outputs = run(
        [[signed_up], [Record(CONTACT_EVENTS.name, 0, 3, "ada", waypost)]]
    )
    assert erased == {}
