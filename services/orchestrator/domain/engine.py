"""The journey engine: `decide(state, stimulus, catalog, now) -> Decision`.

Pure: no I/O, no clock, no randomness. Ids derive from hashes of their inputs, so a replayed
stimulus yields the same commands and consumers can de-duplicate on them.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from services.orchestrator.domain.catalog import Catalog
from services.orchestrator.domain.state import (
    AppendLog,
    Command,
    ContactState,
    Decision,
    EventArrived,
    Instance,
    PendingTimer,
    RequestSend,
    ScheduleTimer,
    Stimulus,
    TimerDue,
)
from shared.contracts import Event, JourneyLogKind, JourneyLogRecord, SendRequest
from shared.ids import stable_id
from shared.journeys import EventTrigger, ExitStep, Journey, SendStep, WaitStep

# A stimulus may run at most this many steps of one instance before it must wait; definitions
# are checked for loops without waits, this is the engine's own backstop.
MAX_STEPS_PER_STIMULUS = 100
# How many ended instance ids a contact remembers, to ignore replays of their trigger events.
ENDED_REMEMBERED = 128
# Timers may fire a little early when clocks of workers disagree; beyond this they are ignored.
TIMER_EARLY_TOLERANCE = timedelta(seconds=2)


def decide(
    state: ContactState | None, stimulus: Stimulus, catalog: Catalog, now: datetime
) -> Decision:
    """Apply one stimulus to one contact's journeys."""
    if isinstance(stimulus, EventArrived):
        key = stimulus.contact_event.contact_key
        current = state or ContactState(contact_key=key)
        current = current.model_copy(update={"profile": stimulus.contact_event.profile})
        return _on_event(current, stimulus.contact_event.event, catalog, now)
    current = state or ContactState(contact_key=stimulus.timer.contact_key)
    return _on_timer(current, stimulus, catalog, now)


def trigger_matches(trigger: EventTrigger, event: Event) -> bool:
    """The event's name matches and every `where` property equals the given value."""
    if event.label != trigger.event:
        return False
    return all(event.properties.get(name) == value for name, value in trigger.where.items())


def _on_event(state: ContactState, event: Event, catalog: Catalog, now: datetime) -> Decision:
    commands: list[Command] = []
    for journey in sorted(catalog.open_for_entry(), key=lambda j: j.id):
        if not trigger_matches(journey.trigger, event):
            continue
        if not _may_enter(state, journey):
            continue
        instance_id = stable_id(journey.id, journey.version, state.contact_key, event.message_id)
        if instance_id in state.instances or instance_id in state.ended:
            continue
        instance = Instance(
            instance_id=instance_id,
            journey_id=journey.id,
            journey_version=journey.version,
            contact_key=state.contact_key,
            step_id=journey.steps[0].id,
            entered_at=now,
            context={"trigger": _event_context(event)},
        )
        entries = {**state.entries, journey.id: state.entries.get(journey.id, 0) + 1}
        state = state.model_copy(update={"entries": entries})
        commands.append(_log(instance, "entered", now))
        state, more = _run(state, instance, journey, now)
        commands.extend(more)
    return Decision(state, tuple(commands))


def _may_enter(state: ContactState, journey: Journey) -> bool:
    if journey.entry.reentry == "never":
        return state.entries.get(journey.id, 0) == 0
    return not any(i.journey_id == journey.id for i in state.instances.values())


def _on_timer(state: ContactState, stimulus: TimerDue, catalog: Catalog, now: datetime) -> Decision:
    fired = stimulus.timer
    instance = state.instances.get(fired.instance_id)
    if instance is None or instance.timer is None or instance.timer.timer_id != fired.timer_id:
        return Decision(state, ())  # already handled, or the instance moved on: a no-op
    if instance.timer.due_at - TIMER_EARLY_TOLERANCE > now:
        return Decision(state, ())
    journey = catalog.version(instance.journey_id, instance.journey_version)
    if journey is None:
        return Decision(state, ())
    following = journey.next_of(instance.timer.step_id)
    commands: list[Command] = [
        _log(instance, "step_completed", now, step_id=instance.timer.step_id)
    ]
    instance = instance.model_copy(update={"timer": None})
    if following is None:
        return _finish(state, instance, now, "completed", commands)
    instance = instance.model_copy(update={"step_id": following})
    state, more = _run(state, instance, journey, now)
    return Decision(state, tuple(commands + more))


def _run(
    state: ContactState, instance: Instance, journey: Journey, now: datetime
) -> tuple[ContactState, list[Command]]:
    """Execute steps from the instance's current step until it waits or ends."""
    commands: list[Command] = []
    for _ in range(MAX_STEPS_PER_STIMULUS):
        step = journey.step(instance.step_id)
        visit = instance.visits.get(step.id, 0)
        instance = instance.model_copy(update={"visits": {**instance.visits, step.id: visit + 1}})
        if isinstance(step, ExitStep):
            decision = _finish(state, instance, now, "exit_step", commands)
            return decision.state, list(decision.commands)
        if isinstance(step, SendStep):
            commands.append(RequestSend(_send_request(state, instance, journey, step, visit, now)))
            commands.append(_log(instance, "step_completed", now, step_id=step.id))
        elif isinstance(step, WaitStep):
            timer_id = stable_id(instance.instance_id, step.id, visit, "timer")
            due = now + step.delta
            instance = instance.model_copy(
                update={"timer": PendingTimer(timer_id=timer_id, step_id=step.id, due_at=due)}
            )
            commands.append(ScheduleTimer(state.contact_key, instance.instance_id, timer_id, due))
            commands.append(_log(instance, "waiting", now, step_id=step.id))
            instances = {**state.instances, instance.instance_id: instance}
            return state.model_copy(update={"instances": instances}), commands
        following = journey.next_of(step.id)
        if following is None:
            decision = _finish(state, instance, now, "completed", commands)
            return decision.state, list(decision.commands)
        instance = instance.model_copy(update={"step_id": following})
    decision = _finish(state, instance, now, "step_limit", commands)
    return decision.state, list(decision.commands)


def _finish(
    state: ContactState, instance: Instance, now: datetime, reason: str, commands: list[Command]
) -> Decision:
    instances = {k: v for k, v in state.instances.items() if k != instance.instance_id}
    ended = (*state.ended, instance.instance_id)[-ENDED_REMEMBERED:]
    log = _log(instance, "exited", now, step_id=instance.step_id, reason=reason)
    return Decision(
        state.model_copy(update={"instances": instances, "ended": ended}), (*commands, log)
    )


def _send_request(
    state: ContactState,
    instance: Instance,
    journey: Journey,
    step: SendStep,
    visit: int,
    now: datetime,
) -> SendRequest:
    if state.profile is None:
        raise ValueError(f"contact {state.contact_key} has no profile to send to")
    return SendRequest(
        message_id=stable_id(instance.instance_id, step.id, visit),
        contact_key=state.contact_key,
        channel=step.channel,
        template_id=step.template,
        journey_id=journey.id,
        journey_version=journey.version,
        instance_id=instance.instance_id,
        step_id=step.id,
        transactional=journey.transactional,
        requested_at=now,
        profile=state.profile,
        context=instance.context,
    )


def _log(
    instance: Instance,
    kind: JourneyLogKind,
    now: datetime,
    *,
    step_id: str | None = None,
    reason: str | None = None,
) -> AppendLog:
    visit = instance.visits.get(step_id or "", 0)
    return AppendLog(
        JourneyLogRecord(
            record_id=stable_id(instance.instance_id, kind, step_id, visit),
            kind=kind,
            journey_id=instance.journey_id,
            journey_version=instance.journey_version,
            instance_id=instance.instance_id,
            contact_key=instance.contact_key,
            step_id=step_id,
            reason=reason,
            at=now,
        )
    )


def _event_context(event: Event) -> dict[str, Any]:
    return {
        "event": event.label,
        "message_id": event.message_id,
        "timestamp": event.timestamp.isoformat(),
        "properties": dict(event.properties),
    }
