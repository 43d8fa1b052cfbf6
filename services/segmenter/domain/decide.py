"""What the segmenter does with one record: `decide(view, incoming, defs, now) -> Decision`.

Pure: the shell reads the contact's rows through a `ContactView`, and applies the typed commands
of the `Decision`, in order, to its batch (outputs, rows, the member index, log lines). Fan-out,
suppression of forgotten contacts, forwarding of merged anonymous contacts, forget and merge are
decided here; the changes to one contact are `domain.contact`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal, Protocol

from services.segmenter.domain import contact
from services.segmenter.domain.contact import ContactRow, Outcome
from services.segmenter.domain.definitions import Definitions
from services.segmenter.domain.relations import (
    fan_out_requests,
    is_fan_out_copy,
    related_objects,
    relation_records,
    relations_of,
    unrelated,
)
from shared.bodies import MAX_JSON_DEPTH, too_deep
from shared.contracts import (
    ContactCommand,
    ContactEvent,
    Event,
    ObjectRelation,
    Profile,
    SegmentTimerRequest,
)
from shared.ids import stable_id
from shared.profiles import CONTACT_FORGOTTEN, DEFAULT_LIMITS, ProfileLimits, announce
from shared.system_events import DELIVERY_REPORTS, forged


class ContactView(Protocol):
    """What a decision reads of the contact the record is about, as the batch sees it; each
    read only when the decision needs it (an object event reads nothing)."""

    def row(self) -> ContactRow | None:
        """The contact's row (None: never seen, merged away or forgotten)."""
        ...

    def merged_into(self) -> str | None:
        """The known contact this anonymous contact was merged into, if any."""
        ...

    def forgotten(self) -> bool:
        """Whether the contact was forgotten (its key is suppressed)."""
        ...


# --- what goes out (on the contact's topics, keyed as each says) -------------------------------


@dataclass(frozen=True)
class Announce:
    """A contact event: one change with everything it announces (the event itself, segments
    entered, a tag added…) and the profile after it, or a contact forgotten."""

    contact_event: ContactEvent


@dataclass(frozen=True)
class PublishProfile:
    """The contact's profile; None is a tombstone (the profile view deletes its document)."""

    contact_key: str
    profile: Profile | None


@dataclass(frozen=True)
class RequestTimer:
    """Move (or, with no `due_at`, cancel) the contact's segment timer at the orchestrator."""

    request: SegmentTimerRequest


@dataclass(frozen=True)
class SendCommand:
    """A contact command for another contact's partition (merge, absorb, forget again)."""

    command: ContactCommand


@dataclass(frozen=True)
class Forward:
    """An event of a merged anonymous contact, re-sent as the known contact's."""

    contact_key: str
    event: Event


@dataclass(frozen=True)
class Report:
    """An accepted event the dispatcher acts on (a delivery report, an open or click, an
    (un)subscribe, an erasure), passed on to its own topic."""

    contact_key: str
    event: Event


@dataclass(frozen=True)
class IndexObject:
    """A record of the object index: a relation, a contact leaving an object's entry, or an
    object event to fan out."""

    relation: ObjectRelation


# --- what is stored (with the batch, once its outputs are acknowledged) ------------------------


@dataclass(frozen=True)
class StoreRow:
    contact_key: str
    row: ContactRow


@dataclass(frozen=True)
class DeleteRow:
    contact_key: str


@dataclass(frozen=True)
class StoreMembership:
    """The contact's memberships row: the definitions digest evaluated against, its segments."""

    contact_key: str
    evaluated: str
    segments: tuple[str, ...]


@dataclass(frozen=True)
class DeleteMembership:
    contact_key: str


@dataclass(frozen=True)
class LinkAlias:
    """Later events of the anonymous `contact_key` belong to `into`."""

    contact_key: str
    into: str


@dataclass(frozen=True)
class DeleteAlias:
    contact_key: str


@dataclass(frozen=True)
class Suppress:
    """Keep only a keyed digest of a forgotten contact's key, and when it was forgotten."""

    contact_key: str
    at: datetime


@dataclass(frozen=True)
class UpdateMembers:
    """The member index follows, once the rows are stored: `was` before, `now` after."""

    contact_key: str
    was: tuple[str, ...]
    now: tuple[str, ...]


@dataclass(frozen=True)
class Log:
    """A line for the operator's log."""

    level: Literal["debug", "info", "warning"]
    event: str
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LimitReached:
    """The profile's limits left something out of a change (logged with the reasons, counted)."""

    origin: str
    reasons: tuple[str, ...]


Output = Announce | PublishProfile | RequestTimer | SendCommand | Forward | IndexObject | Report
Write = (
    StoreRow | DeleteRow | StoreMembership | DeleteMembership | LinkAlias | DeleteAlias | Suppress
)
Command = Output | Write | UpdateMembers | Log | LimitReached


@dataclass(frozen=True)
class Decision:
    """The commands for one record, in the order the shell applies them (no commands: the
    record changes nothing)."""

    commands: tuple[Command, ...] = ()


def decide(
    view: ContactView,
    incoming: Event | ContactCommand,
    defs: Definitions,
    now: datetime,
    limits: ProfileLimits = DEFAULT_LIMITS,
) -> Decision:
    """Decide one event or contact command for the contact it is about; the profile stays
    within `limits` (what they leave out is reported with `LimitReached`).

    Raises `ValueError` for a record refused by a rule (an event only Waypost may emit, one
    nested deeper than ingest allows, a command missing what its kind needs); the shell
    dead-letters it."""
    if isinstance(incoming, ContactCommand):
        _refuse_deep({"value": incoming.value}, "command")
        return Decision(tuple(_on_command(view, incoming, defs, now, limits)))
    _refuse_deep(
        {"properties": incoming.properties, "traits": incoming.traits, "context": incoming.context},
        "event",
    )
    return Decision(tuple(_on_event(view, incoming, defs, now, limits)))


def _refuse_deep(fields: dict[str, Any], what: str) -> None:
    """Ingest refuses such nesting; one that reaches a topic by another route would make the
    contact's row unreadable once stored (the JSON parser stops at 200 levels)."""
    path = too_deep(fields, MAX_JSON_DEPTH)
    if path is not None:
        raise ValueError(
            f"{what}: {path[0]} is nested deeper than {MAX_JSON_DEPTH} levels of objects and arrays"
        )


def _on_event(
    view: ContactView, event: Event, defs: Definitions, now: datetime, limits: ProfileLimits
) -> list[Command]:
    key = event.contact_key  # raises when the event has no contact key
    if forged(event):
        raise ValueError(
            f"event: '{event.event}' from source '{event.source}' is an event only Waypost emits"
        )
    copy = is_fan_out_copy(event)
    if not copy:
        requests = fan_out_requests(event, defs.object_triggers, now)
        if requests:
            # An event about an object reaches the related contacts, not its poster.
            return [IndexObject(r) for r in requests]
    if view.forgotten():
        return [Log("info", "segmenter.suppressed_event", {"message_id": event.message_id})]
    target = view.merged_into()
    if target is not None and (not event.user_id or (copy and event.user_id == key)):
        # A merged anonymous contact: its events belong to the known contact now.
        return [Forward(target, event.model_copy(update={"user_id": target}))]
    row = view.row()
    if copy and row is not None and row.profile.user_id is None:
        # A copy fanned out to an anonymous contact stays that contact's.
        event = event.model_copy(update={"user_id": None, "anonymous_id": key})
    outcome = contact.apply(row, event, defs, now, limits)
    if outcome.duplicate:
        return [Log("debug", "segmenter.duplicate", {"message_id": event.message_id})]
    then: list[Command] = []
    if event.label in DELIVERY_REPORTS:
        then.append(Report(key, event))
    relations = [] if copy else relation_records(event, key, defs.object_triggers, now)
    outcome, indexed = _relate(key, outcome, relations, defs, now)
    then.extend(indexed)
    if outcome.linked is not None:
        # The known contact asks the anonymous one (on its own partition) to hand its row over.
        merge = ContactCommand(
            command_id=stable_id(event.message_id, "merge", outcome.linked),
            contact_key=outcome.linked,
            kind="merge_into",
            other_key=key,
            reason="identified",
            at=now,
        )
        then.append(SendCommand(merge))
    if outcome.dropped:
        then.append(LimitReached(event.message_id, outcome.dropped))
    return _changed(key, row, outcome, now, then)


def _on_command(
    view: ContactView,
    command: ContactCommand,
    defs: Definitions,
    now: datetime,
    limits: ProfileLimits,
) -> list[Command]:
    key = command.contact_key
    if command.kind == "forget":
        return _forget(view, key, command, now)
    if view.forgotten():
        return []
    if command.kind == "merge_into":
        return _hand_over(view, key, command, now)
    row = view.row()
    then: list[Command] = []
    if command.kind == "absorb":
        if command.state is None or command.other_key is None:
            raise ValueError("absorb needs `state` and `other_key`")
        other = ContactRow.model_validate(command.state)
        outcome = contact.absorb(row, key, other, defs, now, command.command_id, limits)
        if outcome.row is not row and other.related:
            # The anonymous history's relations are this contact's now (the anonymous key left
            # the index when it handed its row over).
            outcome, then = _relate(key, outcome, relations_of(key, other.related), defs, now)
    elif command.kind == "reevaluate":
        if row is None:
            return []
        outcome = contact.reevaluate(row, command.command_id, defs, now)
    else:
        outcome = contact.command(row, command, defs, now, limits)
    if outcome.dropped:
        then.append(LimitReached(command.command_id, outcome.dropped))
    if outcome.row is row:
        return then
    return _changed(key, row, outcome, now, then)


def _relate(
    key: str,
    outcome: Outcome,
    relations: list[ObjectRelation],
    defs: Definitions,
    now: datetime,
) -> tuple[Outcome, list[Command]]:
    """Index the contact's new `relations` and keep the row's list of related objects in step:
    an object that leaves the list (aged out, over the cap) takes the contact out of the index."""
    row = outcome.row
    assert row is not None
    if not relations and not row.related:
        return outcome, []
    keep = defs.relations_kept
    objects, gone = related_objects(row.related, relations, now, keep)
    commands: list[Command] = [IndexObject(r) for r in relations]
    commands += [IndexObject(r) for r in unrelated(key, gone, now)]
    if objects != row.related:
        outcome = replace(outcome, row=row.model_copy(update={"related": objects}))
    return outcome, commands


def _changed(
    key: str, before: ContactRow | None, outcome: Outcome, now: datetime, then: list[Command]
) -> list[Command]:
    """Announce the outcome, publish the profile (and the timer when it moved), then `then`;
    store the row, and the memberships row when it changed."""
    row = outcome.row
    assert row is not None
    profile = row.profile
    out: list[Command] = []
    if outcome.events:
        # One record for the whole change: its events share one snapshot of the profile.
        first, *rest = outcome.events
        out.append(
            Announce(
                ContactEvent(
                    contact_key=key, event=first, announcements=tuple(rest), profile=profile
                )
            )
        )
    out.append(PublishProfile(key, profile))
    if outcome.retime:
        out.append(
            RequestTimer(
                SegmentTimerRequest(contact_key=key, due_at=row.next_tick, requested_at=now)
            )
        )
    out.extend(then)
    out.append(StoreRow(key, row))
    if before is None or (before.evaluated, before.profile.segments) != (
        row.evaluated,
        profile.segments,
    ):
        out.append(StoreMembership(key, row.evaluated, profile.segments))
    was = before.profile.segments if before is not None else ()
    if set(was) != set(profile.segments):
        out.append(UpdateMembers(key, was, profile.segments))
    return out


def _forget(view: ContactView, key: str, command: ContactCommand, now: datetime) -> list[Command]:
    """Erase every row kept for the contact; keep only a suppression record under a keyed digest.
    Anonymous histories merged into the contact are erased on their own partitions too, and the
    contact leaves every object of the fan-out index it is related to (on the objects'
    partitions)."""
    row = view.row()
    blank = Profile(contact_key=key, first_seen=now, last_seen=now, updated_at=now)
    profile = row.profile if row is not None else blank
    forgotten = announce(
        profile, CONTACT_FORGOTTEN, {}, stable_id(command.command_id, "forgotten"), now, now
    )
    # The announcement carries no trace of the profile it erased.
    out: list[Command] = [
        Announce(ContactEvent(contact_key=key, event=forgotten, profile=blank)),
        PublishProfile(key, None),
        Report(key, forgotten),
    ]
    if row is not None:
        out.extend(IndexObject(r) for r in unrelated(key, row.related, now))
    if row is not None and row.next_tick is not None:
        out.append(
            RequestTimer(SegmentTimerRequest(contact_key=key, due_at=None, requested_at=now))
        )
    out.extend(
        SendCommand(
            command.model_copy(
                update={"command_id": stable_id(command.command_id, other), "contact_key": other}
            )
        )
        for other in profile.anonymous_ids
    )
    out += [
        Suppress(key, now),
        DeleteRow(key),
        DeleteMembership(key),
        DeleteAlias(key),
        UpdateMembers(key, profile.segments, ()),
        Log("info", "segmenter.contact_forgotten", {"reason": command.reason}),
    ]
    return out


def _hand_over(
    view: ContactView, key: str, command: ContactCommand, now: datetime
) -> list[Command]:
    """This anonymous contact merges into `other_key`: hand the row over, leave a link. The
    first link wins."""
    target = command.other_key
    if not target or target == key:
        raise ValueError("merge_into needs another contact in `other_key`")
    existing = view.merged_into()
    if existing is not None:
        if existing != target:
            return [Log("warning", "segmenter.already_merged", {"into": existing, "asked": target})]
        return []
    row = view.row()
    out: list[Command] = []
    if row is not None:
        absorb = ContactCommand(
            command_id=stable_id(command.command_id, "absorb"),
            contact_key=target,
            kind="absorb",
            other_key=key,
            state=row.model_dump(mode="json"),
            reason=command.reason,
            at=now,
        )
        out += [SendCommand(absorb), PublishProfile(key, None)]
        # The known contact relates itself to these objects when it absorbs the row.
        out.extend(IndexObject(r) for r in unrelated(key, row.related, now))
        if row.next_tick is not None:
            out.append(
                RequestTimer(SegmentTimerRequest(contact_key=key, due_at=None, requested_at=now))
            )
        out += [
            DeleteRow(key),
            DeleteMembership(key),
            UpdateMembers(key, row.profile.segments, ()),
        ]
    out += [
        LinkAlias(key, target),
        Log("info", "segmenter.merged", {"into": target, "had_history": row is not None}),
    ]
    return out
