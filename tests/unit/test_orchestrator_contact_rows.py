"""The orchestrator shell's own rows: the segmenter's clock (one timer per contact, answered with
a `reevaluate` command), forgetting a contact, and stray timer rows. Dicts stand in for the worker's
tables, a list for Kafka, a manual clock for time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from services.orchestrator.adapters.timers import TimerStore, timer_key
from services.orchestrator.adapters.webhooks import Webhooks
from services.orchestrator.app import Incoming, Journeys
from services.orchestrator.domain.destinations import DestinationPolicy
from services.orchestrator.domain.segment_clock import (
    SEGMENT_CLOCK,
    reevaluation,
    segment_timer,
    segment_timer_id,
)
from shared.clock import ManualClock
from shared.contracts import (
    ContactCommand,
    ContactEvent,
    Event,
    JourneyLogRecord,
    Profile,
    SegmentTimerRequest,
    TimerFired,
)
from shared.ids import stable_id
from shared.journey_engine.catalog import Catalog
from shared.journey_engine.state import (
    CancelTimer,
    ContactState,
    EventArrived,
    ScheduleTimer,
    TimerDue,
)
from shared.journeys import Journey, PublishedJourney
from shared.profiles import CONTACT_FORGOTTEN
from shared.system_events import WAYPOST_SOURCE, is_system_event
from shared.topics import CONTACT_COMMANDS, JOURNEY_LOG, SEND_REQUESTS

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
ADA = "ada"
WARSAW = ZoneInfo("Europe/Warsaw")
NEVER = timedelta(days=3650)  # a refire delay that never comes due within a test


class Outbox:
    """Records what the shell publishes, acknowledged at once."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str | None, bytes]] = []

    async def send_all(self, records: Any) -> None:
        self.records.extend(records)

    async def send(self, topic: str, key: str | None, value: bytes) -> None:
        self.records.append((topic, key, value))

    def on(self, topic: str) -> list[tuple[str | None, bytes]]:
        return [(key, value) for t, key, value in self.records if t == topic]

    def commands(self) -> list[ContactCommand]:
        return [ContactCommand.model_validate_json(v) for _k, v in self.on(CONTACT_COMMANDS.name)]


class FixedCatalog:
    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    def current(self) -> Catalog:
        return self._catalog


WELCOME = Journey.model_validate(
    {
        "id": "welcome",
        "name": "Welcome",
        "trigger": {"type": "event", "event": "Signed Up"},
        "steps": [
            {"id": "hello", "type": "send", "template": "hello"},
            {"id": "pause", "type": "wait", "duration": "1d"},
            {"id": "again", "type": "send", "template": "again"},
        ],
    }
)


class Shell:
    """A `Journeys` shell over dict tables, with what it published and stored."""

    def __init__(self) -> None:
        self.clock = ManualClock(T0)
        self.outbox = Outbox()
        self.contacts: dict[bytes, bytes] = {}
        self.table: dict[bytes, bytes] = {}
        self.timers = TimerStore(self.table, refire_after=NEVER, refire_max=NEVER)
        catalog = FixedCatalog(Catalog.of([PublishedJourney(journey=WELCOME, published_at=T0)]))
        self.journeys = Journeys(
            self.contacts,
            self.timers,
            catalog,
            self.outbox,
            self.clock,
            Webhooks(  # type: ignore[arg-type]
                self.outbox, self.clock, DestinationPolicy(), deadline_seconds=60, max_in_flight=4
            ),
            coupon_key=b"test-coupon-key",
        )

    async def handle(self, incoming: Incoming) -> None:
        await self.journeys.handle(incoming)

    async def fire_due(self) -> list[TimerFired]:
        """Pop what is due now and hand each firing back to the shell, as the worker does."""
        fired = self.timers.pop_due(self.clock.now())
        for timer in fired:
            await self.handle(TimerDue(timer))
        return fired

    def state(self, contact: str = ADA) -> ContactState | None:
        raw = self.contacts.get(contact.encode())
        return ContactState.model_validate_json(raw) if raw else None

    def segment_row(self, contact: str = ADA) -> bytes | None:
        return self.table.get(timer_key(contact, SEGMENT_CLOCK))


def asks(due_at: datetime | None, contact: str = ADA) -> SegmentTimerRequest:
    return SegmentTimerRequest(contact_key=contact, due_at=due_at, requested_at=T0)


def tracked(
    event: str, message_id: str, contact: str = ADA, at: datetime = T0, source: str | None = None
) -> EventArrived:
    """`event` as the segmenter passes it on: a name only Waypost emits comes from Waypost
    unless `source` says otherwise."""
    happened = Event(
        type="track",
        event=event,
        user_id=contact,
        message_id=message_id,
        timestamp=at,
        received_at=at,
        source=source or (WAYPOST_SOURCE if is_system_event(event) else None),
    )
    profile = Profile(
        contact_key=contact,
        user_id=contact,
        traits={"email": f"{contact}@example.com"},
        first_seen=at,
        last_seen=at,
        updated_at=at,
    )
    return EventArrived(ContactEvent(contact_key=contact, event=happened, profile=profile))


# --- the segment clock, pure ----------------------------------------------------------------


def test_a_request_schedules_one_row_per_contact_and_none_cancels_it() -> None:
    due = T0 + timedelta(days=90)

    assert segment_timer(asks(due)) == ScheduleTimer(
        ADA, SEGMENT_CLOCK, segment_timer_id(ADA, due), due
    )
    assert segment_timer(asks(None)) == CancelTimer(ADA, SEGMENT_CLOCK)


def test_the_timer_id_depends_on_the_contact_and_the_instant_only() -> None:
    due = T0 + timedelta(hours=1)
    assert segment_timer_id(ADA, due) == segment_timer_id(ADA, due.astimezone(WARSAW))
    assert segment_timer_id(ADA, due) != segment_timer_id("bob", due)
    assert segment_timer_id(ADA, due) != segment_timer_id(ADA, due + timedelta(seconds=1))


def test_a_firing_asks_for_reevaluation_only_while_its_row_is_current() -> None:
    due = T0 + timedelta(days=1)
    fired = TimerFired(
        contact_key=ADA,
        timer_id=segment_timer_id(ADA, due),
        instance_id=SEGMENT_CLOCK,
        due_at=due,
        fired_at=due,
    )

    command = reevaluation(fired, segment_timer_id(ADA, due))

    assert command == ContactCommand(
        command_id=stable_id(ADA, "segment-clock", due),
        contact_key=ADA,
        kind="reevaluate",
        reason="time",
        at=due,
    )
    assert reevaluation(fired, None) is None
    assert reevaluation(fired, segment_timer_id(ADA, due + timedelta(days=1))) is None


# --- the segment clock in the shell ---------------------------------------------------------


async def test_a_segment_timer_fires_once_as_a_reevaluate_command_keyed_by_the_contact() -> None:
    shell = Shell()
    due = T0 + timedelta(days=90)
    await shell.handle(asks(due))

    shell.clock.set(due - timedelta(milliseconds=1))
    assert await shell.fire_due() == []
    shell.clock.set(due)
    (fired,) = await shell.fire_due()

    assert fired.instance_id == SEGMENT_CLOCK
    assert [key for key, _value in shell.outbox.on(CONTACT_COMMANDS.name)] == [ADA]
    (command,) = shell.outbox.commands()
    assert (command.kind, command.reason, command.at) == ("reevaluate", "time", due)
    assert command.command_id == stable_id(ADA, "segment-clock", due)
    assert shell.segment_row() is None  # answered: never refired
    assert shell.contacts == {}  # the engine never saw it
    shell.clock.set(due + timedelta(days=365))
    assert await shell.fire_due() == []


async def test_a_later_request_replaces_the_row_and_its_earlier_firing_is_stale() -> None:
    shell = Shell()
    first, second = T0 + timedelta(hours=1), T0 + timedelta(hours=5)
    await shell.handle(asks(first))
    shell.clock.set(first)
    (early,) = shell.timers.pop_due(shell.clock.now())  # fired, not yet handed back
    await shell.handle(asks(second))

    await shell.handle(TimerDue(early))

    assert shell.outbox.records == []
    assert shell.segment_row() is not None
    shell.clock.set(second)
    (late,) = await shell.fire_due()
    assert late.due_at == second
    assert [c.at for c in shell.outbox.commands()] == [second]


async def test_a_cancelled_segment_timer_neither_fires_nor_answers_a_stale_firing() -> None:
    shell = Shell()
    due = T0 + timedelta(hours=1)
    await shell.handle(asks(due))
    shell.clock.set(due)
    (fired,) = shell.timers.pop_due(shell.clock.now())
    await shell.handle(asks(None))

    await shell.handle(TimerDue(fired))

    assert shell.segment_row() is None
    assert shell.outbox.records == []


async def test_a_repeated_request_writes_nothing_and_keeps_one_row() -> None:
    shell = Shell()
    due = T0 + timedelta(hours=1)
    await shell.handle(asks(due))
    row = shell.segment_row()

    await shell.handle(asks(due))
    await shell.handle(asks(due.astimezone(WARSAW)))

    assert shell.segment_row() == row
    assert len(shell.timers) == 1


async def test_segment_and_journey_timers_of_one_contact_live_side_by_side() -> None:
    shell = Shell()
    await shell.handle(tracked("Signed Up", "m-1"))
    await shell.handle(asks(T0 + timedelta(hours=1)))

    assert len(shell.timers) == 2
    shell.clock.set(T0 + timedelta(hours=1))
    await shell.fire_due()
    state = shell.state()
    assert state is not None
    (instance,) = state.instances.values()
    assert instance.timer is not None  # the journey's wait is untouched
    assert len(shell.timers) == 1


# --- forget ---------------------------------------------------------------------------------


async def test_forgetting_drops_the_contact_row_and_every_timer_row_without_deciding() -> None:
    shell = Shell()
    await shell.handle(tracked("Signed Up", "m-1"))
    await shell.handle(tracked("Signed Up", "m-1", contact="bob"))
    await shell.handle(asks(T0 + timedelta(days=30)))
    assert len(shell.timers) == 3
    published = len(shell.outbox.records)

    await shell.handle(tracked(CONTACT_FORGOTTEN, "m-forget"))

    assert shell.state() is None
    assert [k for k in shell.table if k.startswith(ADA.encode() + b"\x00")] == []
    assert len(shell.timers) == 1  # bob's wait
    assert shell.state("bob") is not None
    # Nothing decided: no sends, no commands; one journey-log record that erases the log.
    (marker,) = shell.outbox.records[published:]
    assert (marker[0], marker[1]) == (JOURNEY_LOG.name, ADA)
    record = JourneyLogRecord.model_validate_json(marker[2])
    assert (record.kind, record.contact_key, record.journey_id) == ("forgotten", ADA, "")
    shell.clock.set(T0 + timedelta(days=31))
    fired = await shell.fire_due()
    assert [t.contact_key for t in fired] == ["bob"]
    assert shell.outbox.commands() == []


async def test_after_forgetting_the_same_key_starts_from_nothing() -> None:
    shell = Shell()
    await shell.handle(tracked("Signed Up", "m-1"))
    await shell.handle(tracked(CONTACT_FORGOTTEN, "m-forget"))
    sends_before = len(shell.outbox.on(SEND_REQUESTS.name))

    # The same message id again: the forgotten contact's handled-event memory is gone too.
    await shell.handle(tracked("Signed Up", "m-1"))

    state = shell.state()
    assert state is not None
    assert list(state.entries.values()) == [1]
    assert len(shell.outbox.on(SEND_REQUESTS.name)) == sends_before + 1


async def test_forgetting_an_unknown_contact_changes_nothing() -> None:
    shell = Shell()

    await shell.handle(tracked(CONTACT_FORGOTTEN, "m-forget", contact="nobody"))

    assert shell.contacts == {}
    assert shell.table == {}
    # Only the marker: the admin's journey log may hold records the orchestrator has forgotten.
    assert [(t, k) for t, k, _v in shell.outbox.records] == [(JOURNEY_LOG.name, "nobody")]


async def test_a_forgotten_instance_timer_fired_before_the_forget_is_dropped_quietly() -> None:
    shell = Shell()
    await shell.handle(tracked("Signed Up", "m-1"))
    shell.clock.set(T0 + timedelta(days=1))
    (fired,) = shell.timers.pop_due(shell.clock.now())
    await shell.handle(tracked(CONTACT_FORGOTTEN, "m-forget"))
    logged = len(shell.outbox.on(JOURNEY_LOG.name))

    await shell.handle(TimerDue(fired))

    assert shell.contacts == {}
    assert shell.table == {}
    assert len(shell.outbox.on(JOURNEY_LOG.name)) == logged


# --- stray timer rows -----------------------------------------------------------------------


async def test_a_timer_row_without_its_instance_is_dropped_when_it_fires() -> None:
    # A crash between writing the timer row and the contact's row leaves such a row behind.
    shell = Shell()
    shell.timers.apply(ScheduleTimer(ADA, "0" * 32, "t-1", T0 + timedelta(hours=1)))
    shell.clock.set(T0 + timedelta(hours=1))

    (fired,) = await shell.fire_due()

    assert fired.instance_id == "0" * 32
    assert shell.table == {}
    assert shell.contacts == {}
    assert shell.outbox.records == []


async def test_a_stale_firing_of_a_waiting_instance_keeps_its_current_row() -> None:
    shell = Shell()
    await shell.handle(tracked("Signed Up", "m-1"))
    state = shell.state()
    assert state is not None
    ((instance, timer),) = state.timers()
    stale = TimerFired(
        contact_key=ADA,
        timer_id="an-older-timer",
        instance_id=instance.instance_id,
        due_at=T0,
        fired_at=T0,
    )

    await shell.handle(TimerDue(stale))

    assert shell.timers.timer_id(ADA, instance.instance_id) == timer.timer_id
