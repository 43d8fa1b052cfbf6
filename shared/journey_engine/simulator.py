"""Run journey definitions over a stream of events in virtual time, through the real `decide`.

Weeks of a journey play in milliseconds: timers sit in a heap and fire when virtual time passes
them; contact commands fold into the simulated profile exactly as the segmenter folds them, and
the events they announce (`Tag Added`, …) are fed back, so journeys can trigger each other.
Tests use it for every scenario; the admin's dry runs can use it the same way.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from shared.contracts import (
    ContactCommand,
    ContactCommandKind,
    ContactEvent,
    Event,
    EventType,
    JourneyLogRecord,
    Profile,
    SendRequest,
    TimerFired,
    WebhookCall,
    WebhookResult,
)
from shared.ids import stable_id
from shared.journey_engine.catalog import Catalog
from shared.journey_engine.engine import decide
from shared.journey_engine.state import (
    AppendLog,
    CallWebhook,
    CancelTimer,
    ChangeContact,
    Command,
    ContactState,
    EventArrived,
    RequestSend,
    ScheduleTimer,
    Stimulus,
    TimerDue,
    WebhookAnswered,
)
from shared.journeys import (
    AUDIENCE_SELECTED,
    SEGMENT_ENTERED,
    SEGMENT_LEFT,
    Journey,
    JourneyStatus,
    PublishedJourney,
)
from shared.profiles import apply_command, apply_event

# Simulated runs (dry runs, scenario tests) key coupon codes with this fixed, published key, never
# the orchestrator's secret: the codes they show are realistic in shape but are not the codes a
# real run issues, so a dry run reveals nothing about real coupons.
DRY_RUN_COUPON_KEY = b"waypost-dry-run-coupon-key"

# A webhook answer: (ok, HTTP status, JSON body).
WebhookAnswer = tuple[bool, int | None, Any]


def _always_ok(_call: WebhookCall) -> WebhookAnswer:
    return True, 200, {}


@dataclass(order=True)
class _Timer:
    due_at: datetime
    sequence: int
    contact_key: str = field(compare=False)
    instance_id: str = field(compare=False)
    timer_id: str = field(compare=False)


class Simulation:
    """A virtual world of contacts, journeys and a clock that only moves when told to."""

    def __init__(
        self,
        journeys: Iterable[Journey],
        start: datetime,
        *,
        webhooks: Callable[[WebhookCall], WebhookAnswer] = _always_ok,
        coupon_key: bytes = DRY_RUN_COUPON_KEY,
    ) -> None:
        self.now = start
        self.coupon_key = coupon_key
        self.published = {
            (j.id, j.version): PublishedJourney(journey=j, published_at=start) for j in journeys
        }
        self.catalog = Catalog.of(self.published.values())
        self.webhooks = webhooks
        self.profiles: dict[str, Profile] = {}
        # (contact, message id) of every event folded, so a repeated one is dropped as the
        # segmenter drops it.
        self._folded: set[tuple[str, str]] = set()
        self.states: dict[str, ContactState] = {}
        self.sends: list[SendRequest] = []
        self.log: list[JourneyLogRecord] = []
        self.changes: list[ContactCommand] = []
        self.calls: list[WebhookCall] = []
        # Every command of every decision, in order (a dry run shows them as its path).
        self.commands: list[Command] = []
        self._timers: list[_Timer] = []
        self._live: dict[tuple[str, str], str] = {}
        self._sequence = 0

    # --- what the world does -----------------------------------------------------------------

    def track(
        self,
        contact: str,
        name: str,
        properties: dict[str, Any] | None = None,
        *,
        traits: dict[str, Any] | None = None,
        message_id: str | None = None,
        kind: EventType = "track",
    ) -> Event:
        """The contact does something now."""
        self._sequence += 1
        event = Event(
            type=kind,
            event=name if kind == "track" else None,
            user_id=contact,
            message_id=message_id or stable_id(contact, name, self.now, self._sequence),
            timestamp=self.now,
            received_at=self.now,
            properties=properties or {},
            traits=traits or {},
        )
        self.deliver(event)
        return event

    def identify(self, contact: str, **traits: Any) -> Event:
        return self.track(contact, "identify", traits=traits, kind="identify")

    def deliver(self, event: Event) -> None:
        """An event through the segmenter's fold (duplicates dropped) into the engine."""
        folded = (event.contact_key, event.message_id)
        if folded in self._folded:
            return
        self._folded.add(folded)
        applied = apply_event(self.profiles.get(event.contact_key), event, self.now)
        self.profiles[event.contact_key] = applied.profile
        self._contact_event(event)
        for announcement in applied.announcements:
            self._contact_event(announcement)

    def segment_changed(self, contact: str, segment: str, *, entered: bool = True) -> None:
        """What the segmenter emits when the contact enters or leaves a segment."""
        profile = self._profile(contact)
        segments = tuple(s for s in profile.segments if s != segment)
        self.profiles[contact] = profile.model_copy(
            update={"segments": (*segments, segment) if entered else segments}
        )
        self._sequence += 1
        label = SEGMENT_ENTERED if entered else SEGMENT_LEFT
        change_id = stable_id(contact, label, segment, self.now, self._sequence)
        self._system_event(contact, label, change_id, segment=segment)

    def audience_run(self, journey_id: str, run_id: str, members: Iterable[str]) -> None:
        """An audience journey's scheduled run selects these segment members.

        One selection per run and contact: a run played again is a replay, not a second run.
        """
        for contact in members:
            selection_id = stable_id(contact, AUDIENCE_SELECTED, journey_id, run_id)
            self._system_event(
                contact, AUDIENCE_SELECTED, selection_id, journey_id=journey_id, run_id=run_id
            )

    def object_event(self, name: str, properties: dict[str, Any], related: Iterable[str]) -> None:
        """Fan-out: the segmenter hands one object event to every related contact."""
        origin = stable_id(name, properties, self.now)
        for contact in related:
            self.deliver(self._event(contact, name, stable_id(origin, contact), properties))

    def tag(self, contact: str, tag: str, *, added: bool = True) -> None:
        """Someone outside the journeys (an import, an operator) adds or removes a tag."""
        self._outside_change(contact, "add_tag" if added else "remove_tag", tag=tag)

    def set_attribute(self, contact: str, attribute: str, value: Any) -> None:
        """Someone outside the journeys sets an attribute (announced as `Attribute Changed`)."""
        self._outside_change(contact, "set_attribute", attribute=attribute, value=value)

    def set_status(self, journey_id: str, status: JourneyStatus) -> None:
        """Pause, resume (active) or archive every version of a journey."""
        for key, published in self.published.items():
            if key[0] == journey_id:
                self.published[key] = published.model_copy(update={"status": status})
        self.catalog = Catalog.of(self.published.values())

    def advance(self, by: timedelta) -> None:
        """Let virtual time pass, firing every timer that comes due, in due order."""
        until = self.now + by
        while self._timers and self._timers[0].due_at <= until:
            timer = heapq.heappop(self._timers)
            if self._live.get((timer.contact_key, timer.instance_id)) != timer.timer_id:
                continue  # cancelled or replaced
            self.now = max(self.now, timer.due_at)
            fired = TimerFired(
                contact_key=timer.contact_key,
                timer_id=timer.timer_id,
                instance_id=timer.instance_id,
                due_at=timer.due_at,
                fired_at=self.now,
            )
            self._stimulate(timer.contact_key, TimerDue(fired))
        self.now = until

    def next_due(self) -> datetime | None:
        """When the next live timer comes due, if any."""
        while self._timers:
            timer = self._timers[0]
            if self._live.get((timer.contact_key, timer.instance_id)) == timer.timer_id:
                return timer.due_at
            heapq.heappop(self._timers)  # cancelled or replaced
        return None

    # --- what came out -------------------------------------------------------------------------

    def sent(self, contact: str | None = None) -> list[SendRequest]:
        return [s for s in self.sends if contact is None or s.contact_key == contact]

    def templates_sent(self, contact: str) -> list[str]:
        return [s.template_id for s in self.sent(contact)]

    def profile(self, contact: str) -> Profile:
        return self._profile(contact)

    def exits(self, contact: str) -> list[str | None]:
        return [r.reason for r in self.log if r.contact_key == contact and r.kind == "exited"]

    def waiting(self, contact: str) -> int:
        return sum(1 for key in self._live if key[0] == contact)

    # --- plumbing ------------------------------------------------------------------------------

    def _profile(self, contact: str) -> Profile:
        existing = self.profiles.get(contact)
        if existing is not None:
            return existing
        return Profile(
            contact_key=contact,
            user_id=contact,
            first_seen=self.now,
            last_seen=self.now,
            updated_at=self.now,
        )

    def _system_event(self, contact: str, label: str, message_id: str, **properties: Any) -> None:
        self.profiles.setdefault(contact, self._profile(contact))
        self._contact_event(self._event(contact, label, message_id, properties, source="waypost"))

    def _event(
        self,
        contact: str,
        label: str,
        message_id: str,
        properties: dict[str, Any],
        source: str | None = None,
    ) -> Event:
        """A track event of this contact, now."""
        return Event(
            type="track",
            event=label,
            user_id=contact,
            message_id=message_id,
            timestamp=self.now,
            received_at=self.now,
            properties=properties,
            source=source,
        )

    def _contact_event(self, event: Event) -> None:
        profile = self.profiles[event.contact_key]
        contact_event = ContactEvent(contact_key=event.contact_key, event=event, profile=profile)
        self._stimulate(event.contact_key, EventArrived(contact_event))

    def _stimulate(self, contact: str, stimulus: Stimulus) -> None:
        decision = decide(
            self.states.get(contact), stimulus, self.catalog, self.now, coupon_key=self.coupon_key
        )
        self.states[contact] = decision.state
        self.commands.extend(decision.commands)
        changes: list[ContactCommand] = []
        calls: list[WebhookCall] = []
        for command in decision.commands:
            if isinstance(command, RequestSend):
                self.sends.append(command.request)
            elif isinstance(command, AppendLog):
                self.log.append(command.record)
            elif isinstance(command, ScheduleTimer):
                self._sequence += 1
                self._live[(command.contact_key, command.instance_id)] = command.timer_id
                heapq.heappush(
                    self._timers,
                    _Timer(
                        command.due_at,
                        self._sequence,
                        command.contact_key,
                        command.instance_id,
                        command.timer_id,
                    ),
                )
            elif isinstance(command, CancelTimer):
                self._live.pop((command.contact_key, command.instance_id), None)
            elif isinstance(command, ChangeContact):
                self.changes.append(command.command)
                changes.append(command.command)
            elif isinstance(command, CallWebhook):
                self.calls.append(command.call)
                calls.append(command.call)
        # Like the real pipeline: the changes and answers come back after this decision.
        for change in changes:
            self._apply_change(change)
        for call in calls:
            self._answer(call)

    def _apply_change(self, command: ContactCommand) -> None:
        changed = apply_command(self.profiles.get(command.contact_key), command, self.now)
        self.profiles[command.contact_key] = changed.profile
        for event in changed.events:
            self._contact_event(event)

    def _outside_change(self, contact: str, kind: ContactCommandKind, **change: Any) -> None:
        self._sequence += 1
        command = ContactCommand(
            command_id=stable_id(contact, kind, change, self.now, self._sequence),
            contact_key=contact,
            kind=kind,
            journey_id="",
            instance_id="",
            step_id="",
            at=self.now,
            **change,
        )
        self.profiles.setdefault(contact, self._profile(contact))
        self._apply_change(command)

    def _answer(self, call: WebhookCall) -> None:
        ok, status, body = self.webhooks(call)
        result = WebhookResult(
            call_id=call.call_id,
            contact_key=call.contact_key,
            instance_id=call.instance_id,
            ok=ok,
            status=status,
            body=body,
            at=self.now,
        )
        self._stimulate(call.contact_key, WebhookAnswered(result))
