"""The journey engine: `decide(state, stimulus, catalog, now, coupon_key=...) -> Decision`.

Pure: no I/O, no clock, no randomness. Ids, coupon codes, splits, owners and holdouts derive from
hashes of their inputs, so a replayed stimulus yields the same commands and consumers can
de-duplicate on them. Coupon codes are keyed with a server secret the caller passes in, so
knowing a contact's key and the journey is not enough to work out their code.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from shared.channels import address_of, consented, reachable
from shared.conditions import (
    Compare,
    Condition,
    as_datetime,
    evaluate,
    event_facts,
    facts_of,
)
from shared.contracts import (
    ChannelTemplate,
    ContactCommand,
    ContactCommandKind,
    Coupon,
    Event,
    JourneyLogKind,
    JourneyLogRecord,
    Profile,
    SendRequest,
    WebhookCall,
)
from shared.durations import (
    contact_zone,
    end_of_local_day,
    in_window,
    local_day,
    next_time_of_day,
    parse_duration,
    parse_time_of_day,
)
from shared.ids import keyed_digest, stable_fraction, stable_id
from shared.journey_engine.catalog import Catalog
from shared.journey_engine.state import (
    AppendLog,
    CallWebhook,
    CancelTimer,
    ChangeContact,
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
    TimerPurpose,
    WebhookAnswered,
)
from shared.journey_engine.why import day, minute, values_read
from shared.journey_engine.why import rule as written
from shared.journeys import (
    ATTRIBUTE_CHANGED,
    AUDIENCE_SELECTED,
    SEGMENT_ENTERED,
    SEGMENT_LEFT,
    TAG_ADDED,
    AnyStep,
    AssignOwnerStep,
    AttributeChangedTrigger,
    AudienceTrigger,
    BranchStep,
    CaptureStep,
    ChannelChoice,
    CouponStep,
    EventTrigger,
    ExitStep,
    GotoStep,
    Journey,
    ObjectEventTrigger,
    SegmentTrigger,
    SendStep,
    SplitStep,
    TagAddedTrigger,
    UpdateContactStep,
    ValueFrom,
    WaitForEventStep,
    WaitStep,
    WebhookStep,
)

# A stimulus may run at most this many steps of one instance before it must wait; definitions
# are checked for unbounded loops, this is the engine's own backstop.
MAX_STEPS_PER_STIMULUS = 100
# How many ended instance ids a contact remembers, to ignore replays of their trigger events.
ENDED_REMEMBERED = 128
# How many handled event ids a contact remembers: a redelivered event must not act twice (it
# would otherwise restart a wait, or satisfy the next wait-for-event a second time). Redelivery
# only replays what was not committed yet (about a second of traffic), so a short memory of
# 16-character digests (about 0.6 KB a contact) is enough; the segmenter de-duplicates the rest.
HANDLED_REMEMBERED = 32
# Timers may fire a little early when clocks of workers disagree; beyond this they are ignored.
TIMER_EARLY_TOLERANCE = timedelta(seconds=2)
# A paused journey's instances look again this often (resuming needs no other signal).
PAUSED_RECHECK = timedelta(minutes=1)
# A wait for an event records why an event of its name did not end it (its `where` failed) for
# this many such events per wait; later ones only count, so the log does not grow with traffic.
MISSES_RECORDED = 3
# Beyond a webhook's own attempts, how long the instance waits before it calls the call failed.
WEBHOOK_GRACE = timedelta(seconds=30)
_COUPON_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


class _Waits:
    """Marker: the instance stopped at a step that resumes later."""


_WAIT = _Waits()
_END = None


def decide(
    state: ContactState | None,
    stimulus: Stimulus,
    catalog: Catalog,
    now: datetime,
    *,
    coupon_key: bytes,
) -> Decision:
    """Apply one stimulus to one contact's journeys; `coupon_key` keys the coupon codes issued
    (the orchestrator's `WAYPOST_COUPON_SECRET`)."""
    if isinstance(stimulus, EventArrived):
        contact_event = stimulus.contact_event
        current = state or ContactState(contact_key=contact_event.contact_key)
        digest = stable_id(contact_event.event.message_id, length=16)
        if digest in current.handled:
            return Decision(current, ())
        handled = (*current.handled, digest)[-HANDLED_REMEMBERED:]
        current = current.model_copy(update={"profile": contact_event.profile, "handled": handled})
        turn = _Turn(current, catalog, now, coupon_key, contact_event.event)
        turn.on_event(contact_event.event)
    elif isinstance(stimulus, TimerDue):
        turn = _Turn(
            state or ContactState(contact_key=stimulus.timer.contact_key), catalog, now, coupon_key
        )
        turn.on_timer(stimulus)
    else:
        result = stimulus.result
        turn = _Turn(
            state or ContactState(contact_key=result.contact_key), catalog, now, coupon_key
        )
        turn.on_webhook(stimulus)
    return turn.decision(state)


def trigger_matches(journey: Journey, event: Event, profile: Profile | None, now: datetime) -> bool:
    """Whether this event (for this contact, now) enters the journey's trigger."""
    return trigger_verdict(journey, event, profile, now)[0]


def trigger_verdict(
    journey: Journey, event: Event, profile: Profile | None, now: datetime
) -> tuple[bool, str | None]:
    """Whether the event enters the trigger, and why (not). The why is None for an event the
    trigger does not name at all (most events): only near misses are worth explaining."""
    trigger = journey.trigger
    props = event.properties
    label = event.label
    where: Condition | None = None
    if isinstance(trigger, EventTrigger | ObjectEventTrigger):
        if label != trigger.event:
            return False, None
        what, where = f"event {trigger.event}", trigger.where
    elif isinstance(trigger, SegmentTrigger):
        wanted = SEGMENT_ENTERED if trigger.on == "entered" else SEGMENT_LEFT
        if label != wanted or props.get("segment") != trigger.segment:
            return False, None
        what = f"{trigger.on} segment {trigger.segment}"
    elif isinstance(trigger, TagAddedTrigger):
        if label != TAG_ADDED or props.get("tag") != trigger.tag:
            return False, None
        what = f"tag {trigger.tag} added"
    elif isinstance(trigger, AttributeChangedTrigger):
        if label != ATTRIBUTE_CHANGED or props.get("attribute") != trigger.attribute:
            return False, None
        what = f"attribute {trigger.attribute} changed"
        if trigger.to is not None:
            where = Compare(field="event.properties.value", op="eq", value=trigger.to)
    else:
        verdict = _audience_verdict(journey.id, trigger, event, now)
        if isinstance(verdict, tuple):
            return verdict
        what = verdict
    facts = facts_of(profile, event=event)
    whys = [f"trigger {what}"]
    for name, condition in (("where", where), ("condition", trigger.condition)):
        if condition is None:
            continue
        read = values_read(condition, facts, now)
        if not evaluate(condition, facts, now):
            return (
                False,
                f"not entered: trigger {what}, but {name} {written(condition)} failed ({read})",
            )
        whys.append(f"{name} {written(condition)} held ({read})")
    return True, "; ".join(whys)


def _audience_verdict(
    journey_id: str, trigger: AudienceTrigger, event: Event, now: datetime
) -> str | tuple[bool, str | None]:
    """What entered an audience journey, or (False, why not)."""
    props = event.properties
    if event.label == AUDIENCE_SELECTED:
        if props.get("journey_id") != journey_id:
            return False, None
        return f"audience run {props.get('run_id')}"
    if trigger.mode != "ongoing" or event.label != SEGMENT_ENTERED:
        return False, None
    segment = props.get("segment")
    if segment not in trigger.segments:
        return False, None
    if trigger.start_at is None or now < trigger.start_at:
        start = (
            "has no start time"
            if trigger.start_at is None
            else f"starts {minute(trigger.start_at)}"
        )
        return False, f"not entered: entered segment {segment}, but the audience {start}"
    return f"entered segment {segment}"


def reachable_channels(
    profile: Profile | None, choices: tuple[ChannelChoice, ...]
) -> list[ChannelChoice]:
    """The choices the contact can receive, by the rules the dispatcher sends with
    (`shared.channels.reachable`): consent not withdrawn and an address it can send to."""
    if profile is None:
        return []
    return [choice for choice in choices if reachable(choice.channel, profile)]


def _holds(
    condition: Condition | None,
    profile: Profile | None,
    event: Event | None,
    context: dict[str, Any] | None,
    now: datetime,
) -> bool:
    if condition is None:
        return True
    return evaluate(condition, facts_of(profile, event=event, context=context), now)


class _Turn:
    """One decision in progress: the contact's state and the commands so far (local, pure)."""

    def __init__(
        self,
        state: ContactState,
        catalog: Catalog,
        now: datetime,
        coupon_key: bytes,
        event: Event | None = None,
    ) -> None:
        self.state = state
        self.catalog = catalog
        self.now = now
        self.coupon_key = coupon_key
        self.event = event
        self.commands: list[Command] = []
        self.scheduled: set[str] = set()

    # --- stimuli ---------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        for instance in sorted(self.state.instances.values(), key=lambda i: i.instance_id):
            journey = self.catalog.version(instance.journey_id, instance.journey_version)
            if journey is not None:
                self._running_sees(instance, journey, event)
        for journey in self.catalog.open_for_entry(event.label):
            matched, why = trigger_verdict(journey, event, self.state.profile, self.now)
            if matched:
                self._enter(journey, event, why)
            elif why is not None:
                self._refuse(journey, event, "trigger", why)

    def on_timer(self, stimulus: TimerDue) -> None:
        fired = stimulus.timer
        instance = self.state.instances.get(fired.instance_id)
        if instance is None or instance.timer is None or instance.timer.timer_id != fired.timer_id:
            return  # already handled, or the instance moved on: a no-op
        if instance.timer.due_at - TIMER_EARLY_TOLERANCE > self.now:
            return
        journey = self.catalog.version(instance.journey_id, instance.journey_version)
        if journey is None:
            return
        timer = instance.timer
        due = timer.due_at
        instance = instance.model_copy(update={"timer": None})
        step = journey.step(timer.step_id)
        if timer.purpose in ("quiet_hours", "paused"):
            self._run(instance, journey)  # run the held step again
        elif timer.purpose == "wait":
            self._log(instance, "step_completed", step.id, why=f"waited until {minute(due)}")
            self._advance(instance, journey, journey.next_of(step.id))
        elif timer.purpose == "timeout" and isinstance(step, WaitForEventStep):
            why = f"timeout: no {step.event} by {minute(due)}"
            self._log(instance, "step_completed", step.id, detail="timeout", why=why)
            self._advance(instance, journey, step.on_timeout or journey.next_of(step.id))
        elif isinstance(step, WebhookStep):
            answer = {"ok": False, "status": None, "body": None, "error": "no answer in time"}
            self._webhook_done(instance, journey, step, answer)

    def on_webhook(self, stimulus: WebhookAnswered) -> None:
        result = stimulus.result
        instance = self.state.instances.get(result.instance_id)
        if instance is None or instance.timer is None or instance.timer.purpose != "webhook":
            return
        journey = self.catalog.version(instance.journey_id, instance.journey_version)
        if journey is None:
            return
        step = journey.step(instance.timer.step_id)
        visit = instance.visits.get(step.id, 1) - 1
        if not isinstance(step, WebhookStep) or result.call_id != _call_id(instance, step, visit):
            return  # an answer to an earlier call of this step
        answer = {"ok": result.ok, "status": result.status, "body": result.body}
        if result.error:
            answer["error"] = result.error
        self._webhook_done(instance.model_copy(update={"timer": None}), journey, step, answer)

    # --- entering --------------------------------------------------------------------------

    def _enter(self, journey: Journey, event: Event, why: str | None) -> None:
        rules = journey.entry
        key_value: str | None = None
        if rules.key is not None:
            value = event.properties.get(rules.key)
            if value is None:
                refusal = f"not entered: the event has no {rules.key}, the journey's entry key"
                self._refuse(journey, event, "no_entry_key", refusal)
                return
            key_value = str(value)
        entry_key = journey.id if key_value is None else f"{journey.id}|{key_value}"
        running = [
            i
            for i in self.state.instances.values()
            if i.journey_id == journey.id and i.key == key_value
        ]
        entries = self.state.entries.get(entry_key, 0)
        last = self.state.last_entered.get(entry_key)
        entered = f", entered {day(last)}" if last is not None else ""
        if rules.max_entries is not None and entries >= rules.max_entries:
            refusal = f"not entered: at most {rules.max_entries} entries, {entries} so far{entered}"
            self._refuse(journey, event, "max_entries", refusal)
            return
        if rules.reentry == "never" and entries > 0:
            self._refuse(journey, event, "reentry", f"not entered: re-entry never{entered}")
            return
        if running:
            since = min(i.entered_at for i in running)
            refusal = f"not entered: re-entry {rules.reentry}, still in it since {day(since)}"
            self._refuse(journey, event, "running", refusal)
            return
        if rules.reentry == "cooldown" and last is not None and not self._cooled(journey, last):
            refusal = f"not entered: re-entry after a cooldown of {rules.cooldown}{entered}"
            self._refuse(journey, event, "cooldown", refusal)
            return
        key = self.state.contact_key
        instance_id = stable_id(journey.id, journey.version, key, event.message_id)
        if instance_id in self.state.instances or instance_id in self.state.ended:
            return
        holdout = (
            rules.holdout > 0 and stable_fraction(journey.id, "holdout", key) * 100 < rules.holdout
        )
        instance = Instance(
            instance_id=instance_id,
            journey_id=journey.id,
            journey_version=journey.version,
            contact_key=key,
            step_id=journey.steps[0].id,
            entered_at=self.now,
            key=key_value,
            holdout=holdout,
            context={"trigger": event_facts(event), "entered_at": self.now.isoformat()},
        )
        self.state = self.state.model_copy(
            update={
                "entries": {**self.state.entries, entry_key: entries + 1},
                "last_entered": {**self.state.last_entered, entry_key: self.now},
                "refused": {j: d for j, d in self.state.refused.items() if j != journey.id},
            }
        )
        self._log(instance, "entered", None, detail=key_value, why=why)
        if holdout:
            why = f"holdout: {rules.holdout:g}% of contacts receive nothing, this one among them"
            self._log(instance, "holdout", None, why=why)
        self._run(instance, journey)

    def _refuse(self, journey: Journey, event: Event, reason: str, why: str) -> None:
        """A `not_entered` record: the event matched the trigger, an entry rule said no. Only
        when it says something new for this contact and journey: a contact in a browse journey
        views products all session, and each view was a record saying "still in it since"
        (a fifth of the journey log in the pipeline benchmark)."""
        said = stable_id(reason, why, length=16)
        if self.state.refused.get(journey.id) == said:
            return
        self.state = self.state.model_copy(
            update={"refused": {**self.state.refused, journey.id: said}}
        )
        key = self.state.contact_key
        record = JourneyLogRecord(
            record_id=stable_id(journey.id, journey.version, key, event.message_id, "not_entered"),
            kind="not_entered",
            journey_id=journey.id,
            journey_version=journey.version,
            instance_id="",
            contact_key=key,
            reason=reason,
            at=self.now,
            why=why,
        )
        self.commands.append(AppendLog(record))

    def _cooled(self, journey: Journey, last: datetime) -> bool:
        cooldown = journey.entry.cooldown
        if cooldown == "local_day":
            tz = self._zone(journey)
            return local_day(last, tz) != local_day(self.now, tz)
        return self.now - last >= parse_duration(cooldown or "0s")

    # --- running instances -----------------------------------------------------------------

    def _running_sees(self, instance: Instance, journey: Journey, event: Event) -> None:
        """Exit rules, goals, and a wait-for-event, checked on every event at every step."""
        profile = self.state.profile
        for goal in journey.goals:
            if goal.id in instance.converted or event.label != goal.event:
                continue
            if goal.within is not None and self.now - instance.entered_at > parse_duration(
                goal.within
            ):
                continue
            if not _holds(goal.where, profile, event, instance.context, self.now):
                continue
            goals = {**instance.context.get("goals", {}), goal.id: event_facts(event)}
            instance = instance.model_copy(
                update={
                    "converted": (*instance.converted, goal.id),
                    "context": {**instance.context, "goals": goals},
                }
            )
            within = f" within {goal.within}" if goal.within is not None else ""
            why = f"goal {goal.id}: {goal.event}{within}"
            if goal.where is not None:
                facts = facts_of(profile, event=event, context=instance.context)
                why += f" ({values_read(goal.where, facts, self.now)})"
            self._log(instance, "converted", None, detail=goal.id, why=why)
            if goal.exit:
                self._finish(instance, f"goal:{goal.id}", f"goal {goal.id} reached: exit")
                return
            self._store(instance)
        for rule in journey.exit_rules:
            if event.label == rule.event and _holds(
                rule.where, profile, event, instance.context, self.now
            ):
                self._finish(
                    instance, f"exit_rule:{rule.reason or rule.event}", f"exit rule: {rule.event}"
                )
                return
        timer = instance.timer
        if timer is None or timer.purpose != "timeout":
            return
        step = journey.step(timer.step_id)
        if not isinstance(step, WaitForEventStep) or event.label != step.event:
            return
        if not _holds(step.where, profile, event, instance.context, self.now):
            self._missed(instance, step, timer, event)
            return
        context = {**instance.context, step.context_name: event_facts(event)}
        instance = instance.model_copy(update={"timer": None, "context": context})
        why = f"{step.event} arrived"
        if step.where is not None:
            facts = facts_of(profile, event=event, context=instance.context)
            why += f" ({values_read(step.where, facts, self.now)})"
        self._log(instance, "step_completed", step.id, detail="event", why=why)
        self._advance(instance, journey, step.on_event or journey.next_of(step.id))

    def _missed(
        self, instance: Instance, step: WaitForEventStep, timer: PendingTimer, event: Event
    ) -> None:
        """The event the wait names came, but its `where` failed: a `waiting` record with the
        values read, for the first MISSES_RECORDED such events of this wait."""
        if timer.misses >= MISSES_RECORDED or step.where is None:
            return
        misses = timer.misses + 1
        timer = timer.model_copy(update={"misses": misses})
        instance = instance.model_copy(update={"timer": timer})
        self._store(instance)
        facts = facts_of(self.state.profile, event=event, context=instance.context)
        why = (
            f"not moved on: {step.event} arrived, but where {written(step.where)} failed"
            f" ({values_read(step.where, facts, self.now)}); still waiting until"
            f" {minute(timer.due_at)}"
        )
        if misses == MISSES_RECORDED:
            why += f"; later {step.event} that fail it are not recorded"
        reason = "where_failed"
        self._log(instance, "waiting", step.id, reason=reason, detail=str(misses), why=why)

    def _advance(self, instance: Instance, journey: Journey, following: str | None) -> None:
        if following is None:
            self._finish(instance, "completed", "end of the journey")
            return
        self._run(instance.model_copy(update={"step_id": following}), journey)

    def _run(self, instance: Instance, journey: Journey) -> None:
        """Execute steps from the instance's current step until it waits or ends."""
        for _ in range(MAX_STEPS_PER_STIMULUS):
            status = self.catalog.status(journey.id)
            if status == "archived":
                self._finish(instance, "journey_archived", "the journey was archived")
                return
            if status == "paused":
                due = self.now + PAUSED_RECHECK
                self._hold(instance, instance.step_id, due, "paused", "the journey is paused")
                return
            step = journey.step(instance.step_id)
            visit = instance.visits.get(step.id, 0)
            instance = instance.model_copy(
                update={"visits": {**instance.visits, step.id: visit + 1}}
            )
            outcome = self._execute(instance, journey, step, visit)
            if isinstance(outcome, _Waits):
                return
            instance, following = outcome
            if following is _END:
                if isinstance(step, ExitStep):
                    self._finish(instance, "exit_step", f"exit step {step.id}")
                else:
                    self._finish(instance, "completed", "end of the journey")
                return
            instance = instance.model_copy(update={"step_id": following})
        self._finish(instance, "step_limit", f"more than {MAX_STEPS_PER_STIMULUS} steps at once")

    def _execute(
        self, instance: Instance, journey: Journey, step: AnyStep, visit: int
    ) -> tuple[Instance, str | None] | _Waits:
        """Run one step: where to go next (None ends the instance), or `_WAIT`."""
        following = journey.next_of(step.id)
        if isinstance(step, ExitStep):
            return instance, _END
        if isinstance(step, SendStep):
            return self._send(instance, journey, step, visit)
        if isinstance(step, WaitStep):
            due = self._wait_until(instance, journey, step)
            if due is None or due <= self.now:
                why = "nothing to wait for" if due is None else f"{minute(due)} already passed"
                self._log(instance, "step_completed", step.id, detail="due", why=why)
                return instance, following
            self._hold(instance, step.id, due, "wait", f"wait until {minute(due)}")
            return _WAIT
        if isinstance(step, WaitForEventStep):
            due = self.now + parse_duration(step.timeout)
            why = f"wait for {step.event} until {minute(due)}"
            self._hold(instance, step.id, due, "timeout", why)
            return _WAIT
        if isinstance(step, BranchStep):
            chosen, detail = step.otherwise or following, "else"
            facts = facts_of(self.state.profile, event=self.event, context=instance.context)
            read: list[str] = []
            for index, arm in enumerate(step.arms):
                read.append(values_read(arm.condition, facts, self.now))
                if evaluate(arm.condition, facts, self.now):
                    chosen, detail, read = arm.next, f"arm {index + 1}", read[-1:]
                    break
            why = f"branch {detail}: {', '.join(dict.fromkeys(', '.join(read).split(', ')))}"
            self._log(instance, "step_completed", step.id, detail=detail, why=why)
            return instance, chosen
        if isinstance(step, SplitStep):
            variant = _pick_variant(
                step, stable_fraction(journey.id, step.id, instance.contact_key)
            )
            variants = {**instance.context.get("variant", {}), step.id: variant.name}
            instance = instance.model_copy(
                update={"context": {**instance.context, "variant": variants}}
            )
            weights = ", ".join(f"{v.name} {v.weight:g}" for v in step.variants)
            why = f"split: variant {variant.name} (weights {weights})"
            self._log(instance, "step_completed", step.id, detail=variant.name, why=why)
            return instance, variant.next or following
        if isinstance(step, UpdateContactStep):
            self._update_contact(instance, step, visit)
            return instance, following
        if isinstance(step, AssignOwnerStep):
            index = int(
                stable_fraction(journey.id, step.id, instance.contact_key) * len(step.group)
            )
            owner = step.group[index]
            instance = self._with_context(instance, step.attribute, owner)
            self._change(
                instance, step.id, visit, "set_attribute", attribute=step.attribute, value=owner
            )
            why = f"owner {owner}, one of {len(step.group)}"
            self._log(instance, "step_completed", step.id, detail=owner, why=why)
            return instance, following
        if isinstance(step, CouponStep):
            return self._coupon(instance, journey, step, visit), following
        if isinstance(step, CaptureStep):
            facts = facts_of(self.state.profile, event=self.event, context=instance.context)
            for name, path in step.values.items():
                instance = self._with_context(instance, name, facts.read(path)[1])
            why = "captured " + ", ".join(step.values)
            self._log(instance, "step_completed", step.id, why=why)
            return instance, following
        if isinstance(step, WebhookStep):
            self._call_webhook(instance, step, visit)
            return _WAIT
        # A goto: jump while under its bound, then carry on.
        assert isinstance(step, GotoStep)
        jump = visit < step.max_times
        why = (
            f"go to {step.to}: jump {visit + 1} of {step.max_times}"
            if jump
            else f"go to {step.to}: all {step.max_times} jumps made, carry on"
        )
        detail = "jump" if jump else "bound reached"
        self._log(instance, "step_completed", step.id, detail=detail, why=why)
        return instance, step.to if jump else following

    # --- steps -----------------------------------------------------------------------------

    def _send(
        self, instance: Instance, journey: Journey, step: SendStep, visit: int
    ) -> tuple[Instance, str | None] | _Waits:
        following = journey.next_of(step.id)
        if instance.holdout:
            why = "skipped: holdout, this contact receives nothing from the journey"
            self._log(instance, "skipped", step.id, reason="holdout", why=why)
            return instance, following
        quiet = journey.settings.quiet_hours
        if quiet is not None and step.quiet_hours == "journey" and not journey.transactional:
            tz = self._zone(journey)
            start, end = parse_time_of_day(quiet.start), parse_time_of_day(quiet.end)
            if in_window(self.now, start, end, tz):
                window = f"quiet hours {quiet.start}-{quiet.end} ({tz})"
                if quiet.action == "drop":
                    why = f"skipped: {window}, the message is dropped"
                    self._log(instance, "skipped", step.id, reason="quiet_hours", why=why)
                    return instance, following
                # Not a visit: the message goes out when the window ends, with the same id.
                held = instance.model_copy(update={"visits": {**instance.visits, step.id: visit}})
                due = next_time_of_day(self.now, end, tz)
                self._hold(held, step.id, due, "quiet_hours", f"{window}: held until {minute(due)}")
                return _WAIT
        choices = reachable_channels(self.state.profile, step.choices)
        if not choices:
            why = "skipped: no channel reachable (" + self._unreachable(step.choices) + ")"
            self._log(instance, "skipped", step.id, reason="unreachable", why=why)
            return instance, following
        first, *rest = choices
        assert self.state.profile is not None
        request = SendRequest(
            message_id=stable_id(instance.instance_id, step.id, visit),
            contact_key=self.state.contact_key,
            channel=first.channel,
            template_id=first.template,
            journey_id=journey.id,
            journey_version=journey.version,
            instance_id=instance.instance_id,
            step_id=step.id,
            transactional=journey.transactional,
            requested_at=self.now,
            profile=self.state.profile,
            context=instance.context,
            fallbacks=tuple(
                ChannelTemplate(channel=c.channel, template_id=c.template) for c in rest
            ),
        )
        self.commands.append(RequestSend(request))
        why = f"send {first.template} on {first.channel}"
        passed = step.choices[: step.choices.index(first)]
        if passed:
            why += f"; passed over {self._unreachable(passed)}"
        self._log(instance, "step_completed", step.id, detail=first.channel, why=why)
        return instance, following

    def _unreachable(self, choices: tuple[ChannelChoice, ...]) -> str:
        """Why each channel can't reach the contact: consent withdrawn, or no address."""
        profile = self.state.profile
        reasons = []
        for choice in choices:
            if profile is not None and not consented(choice.channel, profile):
                reasons.append(f"{choice.channel}: consent withdrawn")
            elif profile is None or address_of(choice.channel, profile) is None:
                reasons.append(f"{choice.channel}: no address")
        return ", ".join(reasons)

    def _wait_until(self, instance: Instance, journey: Journey, step: WaitStep) -> datetime | None:
        if step.duration is not None:
            return self.now + step.delta
        if step.until is not None:
            return step.until
        if step.until_time is not None:
            return next_time_of_day(
                self.now, parse_time_of_day(step.until_time), self._zone(journey)
            )
        traits = self.state.profile.traits if self.state.profile else {}
        moment = as_datetime(traits.get(step.until_attribute or ""))
        if moment is None:
            attribute = step.until_attribute
            why = f"skipped: traits.{attribute} holds no date"
            self._log(instance, "skipped", step.id, reason=f"no date in '{attribute}'", why=why)
            return None
        return moment + step.offset_delta

    def _coupon(
        self, instance: Instance, journey: Journey, step: CouponStep, visit: int
    ) -> Instance:
        code = coupon_code(self.coupon_key, instance.instance_id, step.id, visit, step)
        expires: datetime | None = None
        if step.expires == "end_of_local_day":
            expires = end_of_local_day(self.now, self._zone(journey))
        elif step.expires is not None:
            expires = self.now + parse_duration(step.expires)
        coupon = Coupon(
            code=code,
            journey_id=journey.id,
            instance_id=instance.instance_id,
            issued_at=self.now,
            expires_at=expires,
        )
        value = {"code": code, "expires_at": expires.isoformat() if expires else None}
        instance = self._with_context(instance, step.save_as, value)
        self._change(instance, step.id, visit, "store_coupon", coupon=coupon)
        until = f", valid until {minute(expires)}" if expires is not None else ""
        why = f"coupon issued as context.{step.save_as}{until}"
        self._log(instance, "step_completed", step.id, detail=code, why=why)
        return instance

    def _update_contact(self, instance: Instance, step: UpdateContactStep, visit: int) -> None:
        for tag in step.add_tags:
            self._change(instance, step.id, visit, "add_tag", tag=tag)
        for tag in step.remove_tags:
            self._change(instance, step.id, visit, "remove_tag", tag=tag)
        facts = facts_of(self.state.profile, event=self.event, context=instance.context)
        for name, value in step.set_attributes.items():
            resolved = facts.read(value.from_)[1] if isinstance(value, ValueFrom) else value
            self._change(instance, step.id, visit, "set_attribute", attribute=name, value=resolved)
        changes = [f"add tag {t}" for t in step.add_tags]
        changes += [f"remove tag {t}" for t in step.remove_tags]
        changes += [f"set traits.{name}" for name in step.set_attributes]
        self._log(instance, "step_completed", step.id, why="update contact: " + ", ".join(changes))

    def _call_webhook(self, instance: Instance, step: WebhookStep, visit: int) -> None:
        facts = facts_of(self.state.profile, event=self.event, context=instance.context)
        body = {
            name: facts.read(value.from_)[1] if isinstance(value, ValueFrom) else value
            for name, value in step.body.items()
        }
        timeout = parse_duration(step.timeout)
        call = WebhookCall(
            call_id=_call_id(instance, step, visit),
            contact_key=instance.contact_key,
            instance_id=instance.instance_id,
            step_id=step.id,
            method=step.method,
            url=step.url,
            headers=step.headers,
            body=body,
            timeout_seconds=timeout.total_seconds(),
            retries=step.retries,
        )
        self.commands.append(CallWebhook(call))
        backstop = self.now + timeout * (step.retries + 1) + WEBHOOK_GRACE
        self._hold(instance, step.id, backstop, "webhook", f"call {step.method} {step.url}")

    def _webhook_done(
        self, instance: Instance, journey: Journey, step: WebhookStep, answer: dict[str, Any]
    ) -> None:
        instance = self._with_context(instance, step.context_name, answer)
        why = f"webhook answered {answer['status']}"
        if not answer["ok"]:
            why = f"webhook failed: {answer.get('error') or answer['status']}"
        detail = "ok" if answer["ok"] else "failed"
        self._log(instance, "step_completed", step.id, detail=detail, why=why)
        following = journey.next_of(step.id)
        self._advance(
            instance, journey, following if answer["ok"] else step.on_failure or following
        )

    # --- bookkeeping -----------------------------------------------------------------------

    def _hold(
        self,
        instance: Instance,
        step_id: str,
        due: datetime,
        purpose: TimerPurpose,
        why: str | None = None,
    ) -> None:
        visit = instance.visits.get(step_id, 0)
        timer_id = stable_id(instance.instance_id, step_id, visit, purpose, due.isoformat())
        timer = PendingTimer(timer_id=timer_id, step_id=step_id, due_at=due, purpose=purpose)
        instance = instance.model_copy(update={"timer": timer, "step_id": step_id})
        self.commands.append(
            ScheduleTimer(instance.contact_key, instance.instance_id, timer_id, due)
        )
        self.scheduled.add(instance.instance_id)
        self._log(instance, "waiting", step_id, detail=purpose, why=why)
        self._store(instance)

    def _store(self, instance: Instance) -> None:
        self.state = self.state.model_copy(
            update={"instances": {**self.state.instances, instance.instance_id: instance}}
        )

    def _finish(self, instance: Instance, reason: str, why: str | None = None) -> None:
        instances = {k: v for k, v in self.state.instances.items() if k != instance.instance_id}
        ended = (*self.state.ended, instance.instance_id)[-ENDED_REMEMBERED:]
        self.state = self.state.model_copy(update={"instances": instances, "ended": ended})
        self._log(instance, "exited", instance.step_id, reason=reason, why=why)

    def _with_context(self, instance: Instance, name: str, value: Any) -> Instance:
        return instance.model_copy(update={"context": {**instance.context, name: value}})

    def _zone(self, journey: Journey) -> Any:
        traits = self.state.profile.traits if self.state.profile else {}
        return contact_zone(traits.get("timezone"), journey.settings.timezone)

    def _change(
        self,
        instance: Instance,
        step_id: str,
        visit: int,
        kind: ContactCommandKind,
        *,
        tag: str | None = None,
        attribute: str | None = None,
        value: Any = None,
        coupon: Coupon | None = None,
    ) -> None:
        command = ContactCommand(
            command_id=stable_id(instance.instance_id, step_id, visit, kind, tag, attribute),
            contact_key=instance.contact_key,
            kind=kind,
            tag=tag,
            attribute=attribute,
            value=value,
            coupon=coupon,
            journey_id=instance.journey_id,
            instance_id=instance.instance_id,
            step_id=step_id,
            at=self.now,
        )
        self.commands.append(ChangeContact(command))

    def _log(
        self,
        instance: Instance,
        kind: JourneyLogKind,
        step_id: str | None,
        *,
        reason: str | None = None,
        detail: str | None = None,
        why: str | None = None,
    ) -> None:
        visit = instance.visits.get(step_id or "", 0)
        record = JourneyLogRecord(
            record_id=stable_id(instance.instance_id, kind, step_id, visit, reason, detail),
            kind=kind,
            journey_id=instance.journey_id,
            journey_version=instance.journey_version,
            instance_id=instance.instance_id,
            contact_key=instance.contact_key,
            step_id=step_id,
            reason=reason,
            at=self.now,
            holdout=instance.holdout,
            detail=detail,
            why=why,
        )
        self.commands.append(AppendLog(record))

    def decision(self, before: ContactState | None) -> Decision:
        """The final state, plus CancelTimer for every instance that stopped waiting."""
        had_timer = {i.instance_id for i, _t in before.timers()} if before else set()
        for instance_id in sorted(had_timer | self.scheduled):
            after = self.state.instances.get(instance_id)
            if after is None or after.timer is None:
                self.commands.append(CancelTimer(self.state.contact_key, instance_id))
        return Decision(self.state, tuple(self.commands))


def coupon_code(key: bytes, instance_id: str, step_id: str, visit: int, step: CouponStep) -> str:
    """The code a coupon step issues on this visit of this instance: the step's prefix, then
    `step.length` characters of an HMAC under the server's coupon key. The same inputs and key
    give the same code (a replay issues the same coupon); without the key it can't be derived."""
    digest = keyed_digest(key, "coupon", instance_id, step_id, visit)
    # 32 digest bytes cover the longest code; 256 is a multiple of 32, so characters are uniform.
    return step.prefix + "".join(_COUPON_ALPHABET[b % 32] for b in digest[: step.length])


def _pick_variant(step: SplitStep, fraction: float) -> Any:
    total = sum(v.weight for v in step.variants)
    point = fraction * total
    for variant in step.variants:
        if point < variant.weight:
            return variant
        point -= variant.weight
    return step.variants[-1]


def _call_id(instance: Instance, step: WebhookStep, visit: int) -> str:
    return stable_id(instance.instance_id, step.id, visit, "webhook")
