"""A dry run of a journey draft: the real engine in virtual time, for one contact, with no effects.

Sends become "would send", contact changes "would …", webhooks are answered by the dry run
itself (never called). Waits move the virtual clock; pasted events arrive at their virtual
times, so a wait for an event consumes them. Pure: the start time and profile come in.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.contracts import ContactCommand, Profile, WebhookCall
from shared.durations import parse_duration
from shared.journey_engine.simulator import Simulation, WebhookAnswer
from shared.journey_engine.state import (
    AppendLog,
    CallWebhook,
    ChangeContact,
    Command,
    RequestSend,
)
from shared.journey_engine.why import minute, shown
from shared.journeys import (
    AttributeChangedTrigger,
    AudienceTrigger,
    EventTrigger,
    Journey,
    ObjectEventTrigger,
    SegmentTrigger,
    TagAddedTrigger,
)

# After the last pasted event, the dry run lets virtual time run this long for waits to end.
HORIZON = timedelta(days=400)
MAX_EVENTS = 200
WEBHOOK_NOTE = "webhooks are not called in a dry run: each call is taken as answered 200, no body"
SEND_NOTE = "nothing is sent or changed: sends and contact changes show as 'would …'"
ALONE_NOTE = "only this draft runs: other journeys the contact is in are left out"


class PastedEvent(BaseModel):
    """One event of a dry run: what the contact does, `after` the previous one (or `at`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event: str | None = Field(default=None, min_length=1, max_length=200)
    type: Literal["track", "identify"] = "track"
    properties: dict[str, Any] = Field(default_factory=dict)
    traits: dict[str, Any] = Field(default_factory=dict)
    after: str | None = None
    at: AwareDatetime | None = None

    @field_validator("after")
    @classmethod
    def _after_shape(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @model_validator(mode="after")
    def _named(self) -> PastedEvent:
        if self.type == "track" and self.event is None:
            raise ValueError("a track event needs 'event', its name")
        return self


class DryRunLine(BaseModel):
    """One line of the path: at a virtual time, what happened, at which step, and why."""

    at: datetime
    kind: str
    step_id: str | None = None
    text: str


class DryRunResult(BaseModel):
    journey_id: str
    version: int
    contact_key: str
    start: datetime
    lines: list[DryRunLine]
    outcome: str
    notes: list[str]


def dry_run(
    journey: Journey,
    start: datetime,
    *,
    contact_key: str,
    profile: Profile | None = None,
    events: tuple[PastedEvent, ...] = (),
) -> DryRunResult:
    """Play the draft for one contact from `start`: the pasted events, or else the trigger
    itself, then virtual time until the instance ends (or `HORIZON` passes)."""
    calls: list[WebhookCall] = []

    def answer(call: WebhookCall) -> WebhookAnswer:
        calls.append(call)
        return True, 200, {}

    sim = Simulation([journey], start, webhooks=answer)
    if profile is not None:
        sim.profiles[contact_key] = profile.model_copy(update={"contact_key": contact_key})
    lines: list[DryRunLine] = []
    seen = 0

    def collect() -> None:
        nonlocal seen
        for command in sim.commands[seen:]:
            line = _line(command, sim.now)
            if line is None:
                continue
            last = lines[-1] if lines else None
            if last is not None and last.kind == "would_send" and last.step_id == line.step_id:
                # The send's own record says the same as its "would send", but for what it
                # passed over.
                if "; " in line.text:
                    last.text += "; " + line.text.split("; ", 1)[1]
                continue
            lines.append(line)
        seen = len(sim.commands)

    notes = [SEND_NOTE, ALONE_NOTE]
    if events:
        for event in events:
            if event.at is not None and event.at > sim.now:
                _run_until(sim, event.at, collect)
            elif event.after is not None:
                _run_until(sim, sim.now + parse_duration(event.after), collect)
            name = event.event if event.type == "track" else "identify"
            lines.append(DryRunLine(at=sim.now, kind="event", text=_event_text(event)))
            sim.track(
                contact_key,
                name or "identify",
                event.properties,
                traits=event.traits,
                kind=event.type,
            )
            collect()
    else:
        lines.append(DryRunLine(at=sim.now, kind="event", text=_trigger(sim, journey, contact_key)))
        collect()
    deadline = sim.now + HORIZON
    while (due := sim.next_due()) is not None and due <= deadline:
        _run_until(sim, due, collect)
    if calls:
        notes.append(WEBHOOK_NOTE)
    return DryRunResult(
        journey_id=journey.id,
        version=journey.version,
        contact_key=contact_key,
        start=start,
        lines=lines,
        outcome=_outcome(sim, contact_key),
        notes=notes,
    )


def _run_until(sim: Simulation, until: datetime, collect: Any) -> None:
    """Advance timer by timer, collecting the lines of each, so every line has its own time."""
    while (due := sim.next_due()) is not None and due <= until:
        sim.advance(due - sim.now)
        collect()
    sim.advance(until - sim.now)
    collect()


def _trigger(sim: Simulation, journey: Journey, contact: str) -> str:
    """With no pasted events, the dry run plays the trigger itself, as plainly as it can."""
    trigger = journey.trigger
    if isinstance(trigger, EventTrigger | ObjectEventTrigger):
        sim.track(contact, trigger.event)
        return f"{trigger.event} (the trigger, with no properties)"
    if isinstance(trigger, SegmentTrigger):
        sim.segment_changed(contact, trigger.segment, entered=trigger.on == "entered")
        return f"{trigger.on} segment {trigger.segment} (the trigger)"
    if isinstance(trigger, TagAddedTrigger):
        sim.tag(contact, trigger.tag)
        return f"tag {trigger.tag} added (the trigger)"
    if isinstance(trigger, AttributeChangedTrigger):
        sim.set_attribute(contact, trigger.attribute, trigger.to)
        return f"attribute {trigger.attribute} set to {shown(trigger.to)} (the trigger)"
    assert isinstance(trigger, AudienceTrigger)
    sim.audience_run(journey.id, "dry-run", [contact])
    return "selected by an audience run (the trigger)"


def _event_text(event: PastedEvent) -> str:
    if event.type == "identify":
        return "identify " + ", ".join(f"{k} = {shown(v)}" for k, v in event.traits.items())
    properties = ", ".join(f"{k} = {shown(v)}" for k, v in event.properties.items())
    return f"{event.event}" + (f" ({properties})" if properties else "")


def _line(command: Command, now: datetime) -> DryRunLine | None:
    if isinstance(command, AppendLog):
        record = command.record
        text = record.why or " ".join(p for p in (record.kind, record.reason, record.detail) if p)
        return DryRunLine(at=record.at, kind=record.kind, step_id=record.step_id, text=text)
    if isinstance(command, RequestSend):
        request = command.request
        text = f"would send template {request.template_id} on channel {request.channel}"
        if request.fallbacks:
            others = ", ".join(f"{f.template_id} on {f.channel}" for f in request.fallbacks)
            text += f" (falling back to {others})"
        return DryRunLine(at=now, kind="would_send", step_id=request.step_id, text=text)
    if isinstance(command, ChangeContact):
        return DryRunLine(
            at=now,
            kind="would_change",
            step_id=command.command.step_id,
            text=_change(command.command),
        )
    if isinstance(command, CallWebhook):
        call = command.call
        text = f"would call {call.method} {call.url} (not called: taken as answered 200)"
        return DryRunLine(at=now, kind="would_call", step_id=call.step_id, text=text)
    return None


def _change(command: ContactCommand) -> str:
    if command.kind == "add_tag":
        return f"would add tag {command.tag}"
    if command.kind == "remove_tag":
        return f"would remove tag {command.tag}"
    if command.kind == "set_attribute":
        return f"would set traits.{command.attribute} = {shown(command.value)}"
    code = command.coupon.code if command.coupon is not None else ""
    return f"would issue coupon {code} (a dry-run code, not a real one)"


def _outcome(sim: Simulation, contact: str) -> str:
    state = sim.states.get(contact)
    if state is not None:
        for instance in state.instances.values():
            if instance.timer is not None:
                until = minute(instance.timer.due_at)
                return f"still at step {instance.step_id} at the end of the dry run (until {until})"
    ended = [r for r in sim.log if r.contact_key == contact and r.kind == "exited"]
    if ended:
        return f"ended: {ended[-1].reason}"
    refused = [r for r in sim.log if r.contact_key == contact and r.kind == "not_entered"]
    if refused:
        return refused[-1].why or "not entered"
    return "not entered: no event matched the trigger"
