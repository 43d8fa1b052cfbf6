"""The orchestrator's pure journey engine, driven in virtual time with the welcome journey.

`decide(state, stimulus, catalog, now)` is called directly (with a test coupon key): no Kafka, no
clock, no sleeps. Time is a plain datetime that the tests move forward themselves.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.cli import load_journey_file
from shared.contracts import ContactEvent, Event, JourneyLogRecord, Profile, SendRequest, TimerFired
from shared.ids import stable_id
from shared.journey_engine import engine
from shared.journey_engine.catalog import Catalog
from shared.journey_engine.engine import (
    HANDLED_REMEMBERED,
    PAUSED_RECHECK,
    TIMER_EARLY_TOLERANCE,
)
from shared.journey_engine.state import (
    AppendLog,
    ContactState,
    Decision,
    EventArrived,
    RequestSend,
    ScheduleTimer,
    Stimulus,
    TimerDue,
)
from shared.journeys import EntryRules, EventTrigger, Journey, PublishedJourney, SendStep

WELCOME_FILE = Path(__file__).resolve().parents[2] / "examples" / "journeys" / "s02-welcome.yaml"
T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
CONTACT = "user-1"
SIX_DAYS = timedelta(days=6)


# --- builders -------------------------------------------------------------------------------

COUPON_KEY = b"unit-test-coupon-key"


def decide(
    state: ContactState | None, stimulus: Stimulus, catalog: Catalog, now: datetime
) -> Decision:
    """The engine's `decide`, with the tests' coupon key."""
    return engine.decide(state, stimulus, catalog, now, coupon_key=COUPON_KEY)


@cache
def _welcome_from_file() -> Journey:
    """The example welcome journey's first part: welcome, 6-day wait, reminder, exit."""
    journey = load_journey_file(WELCOME_FILE).journey
    kept = ("welcome-email", "wait-before-reminder", "trial-reminder", "done")
    steps = tuple(journey.step(step_id) for step_id in kept)
    return journey.model_copy(update={"steps": steps, "goals": ()})


def welcome(**changes: Any) -> Journey:
    """The welcome journey's first part, optionally with some fields replaced."""
    journey = _welcome_from_file()
    return journey.model_copy(update=changes) if changes else journey


def published(
    journey: Journey, status: Literal["active", "paused", "archived"] = "active"
) -> PublishedJourney:
    return PublishedJourney(journey=journey, status=status, published_at=T0)


def catalog_of(*journeys: Journey) -> Catalog:
    return Catalog.of(published(j) for j in journeys)


def registered(
    message_id: str,
    *,
    contact: str = CONTACT,
    at: datetime = T0,
    event: str = "Registered",
    properties: dict[str, Any] | None = None,
) -> EventArrived:
    """A `Registered` track event as the segmenter hands it over, with the contact's profile."""
    tracked = Event(
        type="track",
        event=event,
        user_id=contact,
        message_id=message_id,
        timestamp=at,
        received_at=at,
        properties=properties or {},
    )
    profile = Profile(
        contact_key=contact,
        user_id=contact,
        traits={"first_name": "Ada", "email": "ada@example.com"},
        first_seen=at,
        last_seen=at,
        event_counts={event: 1},
        recent_message_ids=(message_id,),
        updated_at=at,
    )
    return EventArrived(ContactEvent(contact_key=contact, event=tracked, profile=profile))


def fired(timer: ScheduleTimer, at: datetime | None = None) -> TimerDue:
    """The timer scheduled by `timer` coming back, by default exactly at its due time."""
    return TimerDue(
        TimerFired(
            contact_key=timer.contact_key,
            timer_id=timer.timer_id,
            instance_id=timer.instance_id,
            due_at=timer.due_at,
            fired_at=at or timer.due_at,
        )
    )


def sends(decision: Decision) -> list[SendRequest]:
    return [c.request for c in decision.commands if isinstance(c, RequestSend)]


def timers(decision: Decision) -> list[ScheduleTimer]:
    return [c for c in decision.commands if isinstance(c, ScheduleTimer)]


def logs(decision: Decision) -> list[JourneyLogRecord]:
    return [c.record for c in decision.commands if isinstance(c, AppendLog)]


def only_refusal(decision: Decision) -> str:
    """The why of the one `not_entered` record the decision holds, and nothing else."""
    (command,) = decision.commands
    assert isinstance(command, AppendLog)
    assert command.record.kind == "not_entered"
    assert command.record.instance_id == ""
    assert command.record.why is not None
    return command.record.why


def only_timer(decision: Decision) -> ScheduleTimer:
    (timer,) = timers(decision)
    return timer


def enter(catalog: Catalog, message_id: str = "m-1", at: datetime = T0) -> Decision:
    """A fresh contact registers once."""
    return decide(None, registered(message_id, at=at), catalog, at)


def enter_and_finish(catalog: Catalog) -> Decision:
    """A fresh contact registers and its instance runs to the end on the reminder timer."""
    entered = enter(catalog)
    timer = only_timer(entered)
    return decide(entered.state, fired(timer), catalog, timer.due_at)


# --- entering -------------------------------------------------------------------------------


def test_registered_event_sends_exactly_one_welcome_email() -> None:
    decision = enter(catalog_of(welcome()))

    (request,) = sends(decision)
    assert request.template_id == "welcome"
    assert request.channel == "email"
    assert request.step_id == "welcome-email"
    assert (request.journey_id, request.journey_version) == ("welcome", 1)
    assert request.contact_key == CONTACT


def test_registered_event_schedules_the_reminder_timer_six_days_later() -> None:
    decision = enter(catalog_of(welcome()))

    timer = only_timer(decision)
    assert timer.due_at == T0 + SIX_DAYS
    assert timer.contact_key == CONTACT
    assert timer.instance_id == sends(decision)[0].instance_id


def test_entering_logs_entered_then_step_completed_then_waiting() -> None:
    decision = enter(catalog_of(welcome()))

    assert [(r.kind, r.step_id) for r in logs(decision)] == [
        ("entered", None),
        ("step_completed", "welcome-email"),
        ("waiting", "wait-before-reminder"),
    ]
    assert {r.at for r in logs(decision)} == {T0}


def test_entering_leaves_one_instance_waiting_on_the_scheduled_timer() -> None:
    decision = enter(catalog_of(welcome()))

    (instance,) = decision.state.instances.values()
    assert instance.step_id == "wait-before-reminder"
    assert instance.timer is not None
    assert instance.timer.timer_id == only_timer(decision).timer_id
    assert decision.state.entries == {"welcome": 1}


def test_send_request_carries_the_profile_and_the_trigger_event() -> None:
    stimulus = registered("m-1", properties={"plan": "pro"})

    (request,) = sends(decide(None, stimulus, catalog_of(welcome()), T0))

    assert request.profile.traits["first_name"] == "Ada"
    assert request.context["trigger"]["properties"] == {"plan": "pro"}
    assert request.context["trigger"]["message_id"] == "m-1"
    assert request.requested_at == T0


def test_event_with_another_name_does_nothing() -> None:
    decision = decide(None, registered("m-1", event="Logged In"), catalog_of(welcome()), T0)

    assert decision.commands == ()
    assert decision.state.instances == {}
    assert decision.state.entries == {}


def test_where_filter_admits_an_event_with_equal_properties() -> None:
    journey = welcome(trigger=EventTrigger(event="Registered", where={"plan": "pro"}))
    stimulus = registered("m-1", properties={"plan": "pro", "source": "ads"})

    decision = decide(None, stimulus, catalog_of(journey), T0)

    assert len(sends(decision)) == 1


@pytest.mark.parametrize("properties", [{"plan": "free"}, {}], ids=["other-value", "missing"])
def test_where_filter_rejects_an_event_without_the_property_value(
    properties: dict[str, Any],
) -> None:
    journey = welcome(trigger=EventTrigger(event="Registered", where={"plan": "pro"}))

    decision = decide(None, registered("m-1", properties=properties), catalog_of(journey), T0)

    read = "event.properties.plan = free" if properties else "event.properties.plan is absent"
    assert only_refusal(decision) == (
        f"not entered: trigger event Registered, but where event.properties.plan = pro failed"
        f" ({read})"
    )
    assert decision.state.instances == {}


# --- re-entry and replays -------------------------------------------------------------------


def test_reentry_never_refuses_a_second_registration_while_running() -> None:
    catalog = catalog_of(welcome())
    first = enter(catalog)

    second = decide(first.state, registered("m-2"), catalog, T0 + timedelta(hours=1))

    assert only_refusal(second) == "not entered: re-entry never, entered 2025-03-03"
    assert second.state.instances == first.state.instances
    assert second.state.entries == {"welcome": 1}


def test_reentry_never_refuses_a_second_registration_after_exit() -> None:
    catalog = catalog_of(welcome())
    finished = enter_and_finish(catalog)
    later = T0 + timedelta(days=30)

    again = decide(finished.state, registered("m-2", at=later), catalog, later)

    assert only_refusal(again) == "not entered: re-entry never, entered 2025-03-03"


def test_reentry_after_exit_refuses_a_registration_while_the_first_instance_runs() -> None:
    catalog = catalog_of(welcome(entry=EntryRules(reentry="after_exit")))
    first = enter(catalog)

    second = decide(first.state, registered("m-2"), catalog, T0 + timedelta(hours=1))

    assert only_refusal(second) == "not entered: re-entry after_exit, still in it since 2025-03-03"


def test_reentry_after_exit_admits_a_registration_once_the_first_instance_exited() -> None:
    catalog = catalog_of(welcome(entry=EntryRules(reentry="after_exit")))
    finished = enter_and_finish(catalog)
    later = T0 + timedelta(days=30)

    again = decide(finished.state, registered("m-2", at=later), catalog, later)

    (request,) = sends(again)
    assert request.template_id == "welcome"
    assert request.instance_id != sends(enter(catalog))[0].instance_id
    assert again.state.entries == {"welcome": 2}


def test_replayed_event_starts_no_second_instance() -> None:
    catalog = catalog_of(welcome())
    first = enter(catalog)

    replay = decide(first.state, registered("m-1"), catalog, T0 + timedelta(minutes=5))

    assert replay.commands == ()
    assert replay.state.instances == first.state.instances
    assert replay.state.entries == {"welcome": 1}


def test_replayed_event_under_after_exit_starts_no_second_instance_while_running() -> None:
    catalog = catalog_of(welcome(entry=EntryRules(reentry="after_exit")))
    first = enter(catalog)

    replay = decide(first.state, registered("m-1"), catalog, T0 + timedelta(minutes=5))

    assert replay.commands == ()


def test_replayed_event_under_after_exit_starts_no_new_instance_after_exit() -> None:
    catalog = catalog_of(welcome(entry=EntryRules(reentry="after_exit")))
    finished = enter_and_finish(catalog)
    later = T0 + SIX_DAYS + timedelta(hours=1)

    replay = decide(finished.state, registered("m-1"), catalog, later)

    assert replay.commands == ()
    assert replay.state.instances == {}


# --- timers ---------------------------------------------------------------------------------


def test_timer_due_sends_the_reminder() -> None:
    catalog = catalog_of(welcome())
    entered = enter(catalog)
    timer = only_timer(entered)

    decision = decide(entered.state, fired(timer), catalog, timer.due_at)

    (request,) = sends(decision)
    assert request.template_id == "trial-reminder"
    assert request.step_id == "trial-reminder"
    assert request.instance_id == timer.instance_id


def test_timer_due_runs_the_welcome_journey_to_its_exit_step() -> None:
    finished = enter_and_finish(catalog_of(welcome()))

    assert [(r.kind, r.step_id, r.reason) for r in logs(finished)] == [
        ("step_completed", "wait-before-reminder", None),
        ("step_completed", "trial-reminder", None),
        ("exited", "done", "exit_step"),
    ]
    assert finished.state.instances == {}
    assert timers(finished) == []


def test_journey_without_exit_step_exits_as_completed_after_its_last_step() -> None:
    catalog = catalog_of(welcome(steps=welcome().steps[:-1]))

    finished = enter_and_finish(catalog)

    assert [r.template_id for r in sends(finished)] == ["trial-reminder"]
    exited = logs(finished)[-1]
    assert (exited.kind, exited.reason, exited.step_id) == ("exited", "completed", "trial-reminder")


def test_duplicate_timer_due_after_it_was_handled_is_a_noop() -> None:
    catalog = catalog_of(welcome())
    entered = enter(catalog)
    timer = only_timer(entered)
    handled = decide(entered.state, fired(timer), catalog, timer.due_at)

    duplicate = decide(handled.state, fired(timer), catalog, timer.due_at + timedelta(seconds=1))

    assert duplicate.commands == ()
    assert duplicate.state == handled.state


def test_timer_due_with_a_stale_timer_id_is_a_noop() -> None:
    catalog = catalog_of(welcome())
    entered = enter(catalog)
    timer = only_timer(entered)
    stale = ScheduleTimer(
        timer.contact_key, timer.instance_id, "not-the-current-timer", timer.due_at
    )

    decision = decide(entered.state, fired(stale), catalog, timer.due_at)

    assert decision.commands == ()
    assert decision.state == entered.state


def test_timer_due_for_a_contact_without_state_is_a_noop() -> None:
    timer = ScheduleTimer(CONTACT, "no-such-instance", "no-such-timer", T0)

    decision = decide(None, fired(timer), catalog_of(welcome()), T0)

    assert decision.commands == ()
    assert decision.state == ContactState(contact_key=CONTACT)


def test_timer_arriving_earlier_than_the_tolerance_is_ignored() -> None:
    catalog = catalog_of(welcome())
    entered = enter(catalog)
    timer = only_timer(entered)
    too_early = timer.due_at - TIMER_EARLY_TOLERANCE - timedelta(microseconds=1)

    decision = decide(entered.state, fired(timer, at=too_early), catalog, too_early)

    assert decision.commands == ()
    assert decision.state == entered.state


def test_timer_arriving_early_within_the_tolerance_proceeds() -> None:
    catalog = catalog_of(welcome())
    entered = enter(catalog)
    timer = only_timer(entered)
    slightly_early = timer.due_at - TIMER_EARLY_TOLERANCE

    decision = decide(entered.state, fired(timer, at=slightly_early), catalog, slightly_early)

    assert [r.template_id for r in sends(decision)] == ["trial-reminder"]


def test_ignored_early_timer_still_works_when_fired_again_at_due_time() -> None:
    catalog = catalog_of(welcome())
    entered = enter(catalog)
    timer = only_timer(entered)
    early = decide(entered.state, fired(timer, at=T0), catalog, T0 + timedelta(days=1))

    decision = decide(early.state, fired(timer), catalog, timer.due_at)

    assert [r.template_id for r in sends(decision)] == ["trial-reminder"]


# --- deterministic ids ----------------------------------------------------------------------


def _run_welcome(state: ContactState | None, catalog: Catalog) -> list[Decision]:
    entered = decide(state, registered("m-1"), catalog, T0)
    timer = only_timer(entered)
    return [entered, decide(entered.state, fired(timer), catalog, timer.due_at)]


def test_same_stimuli_from_the_same_state_give_identical_commands() -> None:
    catalog = catalog_of(welcome())

    first_run = _run_welcome(None, catalog)
    second_run = _run_welcome(None, catalog)

    assert [d.commands for d in first_run] == [d.commands for d in second_run]
    assert first_run[-1].state == second_run[-1].state


def test_message_ids_differ_between_steps_of_one_instance() -> None:
    entered, finished = _run_welcome(None, catalog_of(welcome()))

    (welcome_send,) = sends(entered)
    (reminder_send,) = sends(finished)
    assert welcome_send.instance_id == reminder_send.instance_id
    assert welcome_send.message_id != reminder_send.message_id


def test_message_ids_differ_between_contacts() -> None:
    catalog = catalog_of(welcome())

    ada = sends(decide(None, registered("m-1", contact="ada"), catalog, T0))[0]
    bob = sends(decide(None, registered("m-1", contact="bob"), catalog, T0))[0]

    assert ada.message_id != bob.message_id
    assert ada.instance_id != bob.instance_id


def test_log_record_ids_are_distinct_within_a_run() -> None:
    decisions = _run_welcome(None, catalog_of(welcome()))

    record_ids = [r.record_id for d in decisions for r in logs(d)]
    assert len(record_ids) == len(set(record_ids))


# --- journey status and versions ------------------------------------------------------------


def test_paused_journey_admits_no_new_entries() -> None:
    catalog = Catalog.of([published(welcome(), status="paused")])

    decision = enter(catalog)

    assert decision.commands == ()
    assert decision.state.instances == {}


def test_paused_journey_holds_a_running_instance_and_sends_once_resumed() -> None:
    entered = enter(catalog_of(welcome()))
    paused = Catalog.of([published(welcome(), status="paused")])
    timer = only_timer(entered)

    held = decide(entered.state, fired(timer), paused, timer.due_at)

    assert sends(held) == []
    recheck = only_timer(held)
    assert recheck.due_at == timer.due_at + PAUSED_RECHECK
    resumed = decide(held.state, fired(recheck), catalog_of(welcome()), recheck.due_at)
    assert [r.template_id for r in sends(resumed)] == ["trial-reminder"]
    assert logs(resumed)[-1].kind == "exited"


def _welcome_v2() -> Journey:
    steps = tuple(
        SendStep(id=s.id, type="send", channel="email", template="last-call")
        if s.id == "trial-reminder"
        else s
        for s in welcome().steps
    )
    return welcome(version=2, steps=steps)


def test_instance_finishes_on_the_version_it_entered_after_a_new_version_is_published() -> None:
    entered = enter(catalog_of(welcome()))
    both_versions = catalog_of(welcome(), _welcome_v2())
    timer = only_timer(entered)

    decision = decide(entered.state, fired(timer), both_versions, timer.due_at)

    (request,) = sends(decision)
    assert (request.template_id, request.journey_version) == ("trial-reminder", 1)
    assert {r.journey_version for r in logs(decision)} == {1}


def test_new_entries_use_the_newest_published_version() -> None:
    both_versions = catalog_of(welcome(), _welcome_v2())

    decision = enter(both_versions)

    assert {r.journey_version for r in logs(decision)} == {2}


# --- redelivered events and goals -----------------------------------------------------------


def _second_registration_journey() -> Journey:
    """Enter on `Registered`, wait for the next `Registered`, then send."""
    return Journey.model_validate(
        {
            "id": "second-registration",
            "name": "Second registration",
            "trigger": {"event": "Registered"},
            "goals": [{"id": "ordered", "event": "Order Completed"}],
            "steps": [
                {
                    "id": "next-one",
                    "type": "wait_for_event",
                    "event": "Registered",
                    "timeout": "7d",
                },
                {"id": "tell", "type": "send", "template": "t"},
            ],
        }
    )


def test_a_redelivered_event_changes_nothing() -> None:
    catalog = catalog_of(welcome())
    first = enter(catalog)

    again = decide(first.state, registered("m-1"), catalog, T0 + timedelta(minutes=5))

    assert again.commands == ()
    assert again.state == first.state


def test_a_redelivered_trigger_does_not_satisfy_the_wait_that_follows_it() -> None:
    catalog = catalog_of(_second_registration_journey())
    first = enter(catalog)

    redelivered = decide(first.state, registered("m-1"), catalog, T0 + timedelta(minutes=5))
    assert sends(redelivered) == []
    following = decide(redelivered.state, registered("m-2"), catalog, T0 + timedelta(hours=1))

    assert [r.template_id for r in sends(following)] == ["t"]


def test_a_contact_remembers_a_bounded_number_of_handled_events() -> None:
    catalog = catalog_of(welcome())
    state = enter(catalog).state
    for n in range(HANDLED_REMEMBERED + 10):
        event = registered(f"other-{n}", event="Page Viewed")
        state = decide(state, event, catalog, T0).state

    assert len(state.handled) == HANDLED_REMEMBERED
    assert state.handled[-1] == stable_id(f"other-{HANDLED_REMEMBERED + 9}", length=16)


def test_a_reached_goal_is_kept_in_the_context_under_its_id() -> None:
    catalog = catalog_of(_second_registration_journey())
    first = enter(catalog)

    ordered = decide(
        first.state,
        registered("o-1", event="Order Completed", properties={"order_id": "o-1"}),
        catalog,
        T0 + timedelta(days=1),
    )

    (instance,) = ordered.state.instances.values()
    assert instance.converted == ("ordered",)
    assert instance.context["goals"]["ordered"]["properties"] == {"order_id": "o-1"}
    assert [r.kind for r in logs(ordered)] == ["converted"]


# --- properties -----------------------------------------------------------------------------

_MESSAGE_IDS = st.sampled_from(["m-1", "m-2", "m-3"]) | st.text("0123456789abcdef", min_size=1)
_ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("register"), _MESSAGE_IDS),
        st.tuples(st.just("advance_hours"), st.integers(min_value=0, max_value=8 * 24)),
        st.tuples(st.just("fire_now"), st.integers(min_value=0, max_value=20)),
        st.tuples(st.just("fire_when_due"), st.integers(min_value=0, max_value=20)),
    ),
    max_size=40,
)


def _simulate(catalog: Catalog, actions: Sequence[tuple[str, Any]]) -> list[SendRequest]:
    """Play registrations and timer firings (including stale and early ones) in virtual time."""
    state: ContactState | None = None
    now = T0
    scheduled: list[ScheduleTimer] = []  # every timer ever scheduled, so stale ones get refired
    sent: list[SendRequest] = []
    for action, argument in actions:
        stimulus: Stimulus
        if action == "register":
            stimulus = registered(argument, at=now)
        elif action == "advance_hours":
            now += timedelta(hours=argument)
            continue
        elif not scheduled:
            continue
        else:
            timer = scheduled[argument % len(scheduled)]
            if action == "fire_when_due":
                now = max(now, timer.due_at)
            stimulus = fired(timer, at=now)
        decision = decide(state, stimulus, catalog, now)
        state = decision.state
        scheduled.extend(timers(decision))
        sent.extend(sends(decision))
    return sent


def _message_ids_by_step(sent: list[SendRequest]) -> dict[tuple[str, str], set[str]]:
    ids: dict[tuple[str, str], set[str]] = defaultdict(set)
    for request in sent:
        ids[(request.instance_id, request.step_id)].add(request.message_id)
    return ids


@settings(max_examples=300, deadline=None)
@given(actions=_ACTIONS)
def test_welcome_never_sends_one_step_twice_under_any_stimuli(
    actions: list[tuple[str, Any]],
) -> None:
    sent = _simulate(catalog_of(welcome()), actions)

    assert all(len(ids) == 1 for ids in _message_ids_by_step(sent).values())
    sends_per_instance = Counter(r.instance_id for r in sent)
    assert all(count <= 2 for count in sends_per_instance.values())
    assert len(sends_per_instance) <= 1  # reentry: never


@settings(max_examples=300, deadline=None)
@given(actions=_ACTIONS)
def test_after_exit_journey_gives_each_step_of_an_instance_one_message_id(
    actions: list[tuple[str, Any]],
) -> None:
    sent = _simulate(catalog_of(welcome(entry=EntryRules(reentry="after_exit"))), actions)

    ids_by_step = _message_ids_by_step(sent)
    assert all(len(ids) == 1 for ids in ids_by_step.values())
    distinct_per_instance = Counter(instance for instance, _step in ids_by_step)
    assert all(count <= 2 for count in distinct_per_instance.values())
