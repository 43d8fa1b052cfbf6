"""One contact as the segmenter keeps it, and every change to it (pure).

A `ContactRow` holds the profile, the state of each live aggregate (bucketed windows), the
message ids seen in the last day, and the instant of the segment timer last asked for. Each
function takes a row and returns an `Outcome`: the new row, the events to announce (the event
itself, `Attribute Changed`, `Segment Entered` / `Segment Left`) and, when it moved, the next
instant at which time alone may change a membership.

Order does not matter for aggregates and memberships: folding the same events in any order, with
duplicates, ends in the same state (a property test holds this).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_serializer, field_validator

from services.segmenter.domain import aggregates
from services.segmenter.domain.definitions import Definitions, state_key
from shared.bodies import STRINGS_CACHED
from shared.channels import merged_consent
from shared.conditions import Facts, facts_of
from shared.contracts import ContactCommand, Event, Profile, replaced
from shared.ids import stable_id
from shared.journeys import SEGMENT_ENTERED, SEGMENT_LEFT
from shared.profiles import (
    DEFAULT_LIMITS,
    ProfileLimits,
    announce,
    apply_command,
    apply_event,
    capped_traits,
    first_profile,
    merged_counts,
    with_anonymous_id,
)

# Message ids are remembered for at least this long (grouped by the hour they were seen), and
# the newest this many whatever their age (for a contact quieter than that over the window).
DEDUPE_WINDOW = timedelta(hours=24)
OLDER_IDS = 256
_HOUR = 3600
# `ContactRow.seen`: a message id's digest (hex), and the key of the digests older than the
# window (the epoch hour 0, older than any other).
_DIGEST = 16
OLDER = "0"
# `ContactRow.stable_until` and `timed_until` when no stored bucket ever leaves its window.
NEVER = 2**63 - 1


class ContactRow(BaseModel):
    """The segmenter's row for one contact (JSON in the `contacts` table)."""

    model_config = ConfigDict(frozen=True, cache_strings=STRINGS_CACHED)

    profile: Profile
    # Aggregate states by `state_key` (id@digest), as `services.segmenter.domain.aggregates` keeps.
    aggregates: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # The digests of the message ids folded, by the epoch hour (as a decimal string) they were
    # first seen, each hour's in one string, space-separated (a row carries one string an hour,
    # not one per event); under `OLDER`, of those seen before the de-duplication window, the
    # newest as many as make `OLDER_IDS` with the window's own.
    seen: dict[str, str] = Field(default_factory=dict)
    # The segment timer last asked of the orchestrator.
    next_tick: AwareDatetime | None = None
    # The definitions digest the memberships were last evaluated against.
    evaluated: str = ""
    # Anonymous contacts whose history was merged in (so a repeated merge adds nothing).
    absorbed: tuple[str, ...] = ()
    # Objects of the fan-out index this contact is related to (object key -> epoch ms of the
    # latest relation), so that forgetting the contact takes it out of each.
    related: dict[str, int] = Field(default_factory=dict)
    # Epoch microseconds before which time alone changes no aggregate value (no stored bucket
    # leaves its window), as settled against `evaluated`; `timed_until` the same for the
    # aggregates segments read. 0: not known (a row written before they were kept), so the next
    # change re-checks everything.
    stable_until: int = 0
    timed_until: int = 0

    @field_validator("seen", mode="before")
    @classmethod
    def _joined(cls, seen: Any) -> Any:
        """Each hour is stored as a list (see `_listed`): its items joined. Rows written before
        the digests were joined hold a digest an item."""
        if isinstance(seen, dict):
            return {h: " ".join(ids) if isinstance(ids, list) else ids for h, ids in seen.items()}
        return seen

    @field_serializer("seen")
    def _listed(self, seen: dict[str, str]) -> dict[str, list[str]]:
        """Each hour's string as a list of one: the shape segmenters of earlier versions read
        (a rolling upgrade, a rollback). They find none of its digests, and so let a duplicate
        through for a while; they neither fail on the row nor lose it (a digest they add to the
        hour's list joins it here)."""
        return {hour: [ids] for hour, ids in seen.items()}


@dataclass(frozen=True)
class Outcome:
    """A row after a change, what to announce, and the segment timer when it moved."""

    row: ContactRow | None
    events: tuple[Event, ...] = ()
    # True when `next_tick` changed and the orchestrator's timer must follow.
    retime: bool = False
    duplicate: bool = False
    # An anonymous key this event linked to the contact for the first time (to merge in).
    linked: str | None = None
    # What the profile's limits left out of the change, one reason each (logged, counted).
    dropped: tuple[str, ...] = ()

    @property
    def entered(self) -> frozenset[str]:
        return _changed(self.events, SEGMENT_ENTERED)

    @property
    def left(self) -> frozenset[str]:
        return _changed(self.events, SEGMENT_LEFT)


def apply(
    row: ContactRow | None,
    event: Event,
    defs: Definitions,
    now: datetime,
    limits: ProfileLimits = DEFAULT_LIMITS,
) -> Outcome:
    """Fold a behavioural event: de-duplicate, profile (with consent), aggregates, memberships."""
    digest = _message_digest(event.message_id)
    if row is not None and row.profile.recent_message_ids:
        row = _ids_moved(row)
    recent = _unless_seen(row.seen, digest, now) if row is not None else {}
    if recent is None:
        return Outcome(row, duplicate=True)
    before = row.profile if row is not None else None
    applied = apply_event(before, event, now, limits)
    profile = applied.profile
    dropped = applied.dropped
    link = event.previous_id if event.type == "alias" else event.anonymous_id
    known = before.anonymous_ids if before is not None else ()
    linked = None
    if event.user_id and link and link != event.user_id and link not in known:
        ids, unlinked = with_anonymous_id(profile.anonymous_ids, link, limits)
        if unlinked:
            # Past the limit: no merge, so the anonymous id stays a contact of its own (and
            # every id merged in stays listed, which erasure forwards to).
            dropped = tuple(dict.fromkeys((*dropped, *unlinked)))
        else:
            linked = link
            profile = profile.model_copy(update={"anonymous_ids": ids})
    states = dict(row.aggregates) if row is not None else {}
    counting = defs.compiled.by_event.get(event.label, ())
    facts: Facts | None = None
    touched: list[str] = []
    at = aggregates.clamp_event_time(event.timestamp, event.received_at) if counting else None
    now_micros = aggregates.epoch_micros(now)
    for definition, where in counting:
        if where is not None:
            if facts is None:
                facts = facts_of(None, event=event)
            if not where(facts, now):
                continue
        key = definition.state_key
        state = states.get(key)
        folded = aggregates.fold_matching(
            state, definition, event, now, at=at, now_micros=now_micros
        )
        if folded is state:
            continue
        touched.append(key)
        if folded is None:
            states.pop(key, None)
        else:
            states[key] = folded
    base = row or ContactRow(profile=profile)
    settled = _settle(
        base,
        (event, *applied.announcements),
        event.message_id,
        defs,
        now,
        profile=profile,
        states=states,
        seen=_remember(recent, digest, now),
        linked=linked,
        touched=touched,
    )
    return _with_dropped(settled, dropped)


def command(
    row: ContactRow | None,
    change: ContactCommand,
    defs: Definitions,
    now: datetime,
    limits: ProfileLimits = DEFAULT_LIMITS,
) -> Outcome:
    """Apply a journey's tag / attribute / coupon change, then re-check memberships."""
    before = row.profile if row is not None else None
    changed = apply_command(before, change, now, limits)
    if row is not None and changed.profile == before:
        return Outcome(row, dropped=changed.dropped)
    base = row or ContactRow(profile=changed.profile)
    settled = _settle(
        base, changed.events, change.command_id, defs, now, profile=changed.profile, touched=()
    )
    return _with_dropped(settled, changed.dropped)


def reevaluate(row: ContactRow, origin: str, defs: Definitions, now: datetime) -> Outcome:
    """Re-check memberships now: time passed (a window slid) or the definitions changed."""
    return _settle(row, (), origin, defs, now)


def absorb(
    row: ContactRow | None,
    contact_key: str,
    other: ContactRow,
    defs: Definitions,
    now: datetime,
    origin: str,
    limits: ProfileLimits = DEFAULT_LIMITS,
) -> Outcome:
    """Merge an anonymous contact's row into this (known) contact, once; the known contact's
    traits win, and the merged profile stays within `limits`."""
    other_key = other.profile.contact_key
    if row is not None and other_key in row.absorbed:
        return Outcome(row)
    if row is not None and row.profile.recent_message_ids:
        row = _ids_moved(row)
    if other.profile.recent_message_ids:
        other = _ids_moved(other)
    mine = row or ContactRow(profile=first_profile(contact_key, other.profile.first_seen, now))
    theirs = other.profile
    new_traits = {k: v for k, v in theirs.traits.items() if k not in mine.profile.traits}
    traits, dropped_traits = capped_traits(mine.profile.traits, new_traits, limits)
    counts, dropped_counts = merged_counts(mine.profile.event_counts, theirs.event_counts, limits)
    anonymous_ids, dropped_ids = _merged_ids(mine.profile.anonymous_ids, other_key, theirs, limits)
    profile = mine.profile.model_copy(
        update={
            "anonymous_ids": anonymous_ids,
            "traits": traits,
            "tags": _union(mine.profile.tags, theirs.tags),
            "consent": merged_consent(mine.profile.consent, theirs.consent),
            "coupons": (
                *mine.profile.coupons,
                *(c for c in theirs.coupons if c not in mine.profile.coupons),
            ),
            "event_counts": counts,
            "first_seen": min(mine.profile.first_seen, theirs.first_seen),
            "last_seen": max(mine.profile.last_seen, theirs.last_seen),
            "updated_at": now,
        }
    )
    states = dict(mine.aggregates)
    for definition in defs.aggregates:
        key = state_key(definition)
        merged = aggregates.merge(states.get(key), other.aggregates.get(key), definition)
        if merged is None:
            states.pop(key, None)
        else:
            states[key] = merged
    # The digests of both, each once; of the older ones, this contact's are taken for the newest
    # (`_pruned` keeps those at the end).
    seen = dict(mine.seen)
    held = _digests(seen)
    for hour, ids in other.seen.items():
        added = " ".join(d for d in ids.split() if d not in held)
        if not added:
            continue
        if hour not in seen:
            seen[hour] = added
        elif hour == OLDER:
            seen[hour] = f"{added} {seen[hour]}"
        else:
            seen[hour] = f"{seen[hour]} {added}"
    updated = mine.model_copy(
        update={
            "profile": profile,
            "aggregates": states,
            "seen": _pruned(seen, now),
            "absorbed": (*mine.absorbed, other_key),
        }
    )
    return _with_dropped(
        _settle(updated, (), origin, defs, now), dropped_traits + dropped_counts + dropped_ids
    )


def memberships(
    profile: Profile, states: dict[str, dict[str, Any]], defs: Definitions, now: datetime
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The aggregate values and segment ids of a contact at `now` (segments in dependency order,
    so a segment that reads another sees its fresh membership)."""
    values = {d.id: aggregates.value(states.get(d.state_key), d, now) for d in defs.aggregates}
    return values, _members(profile, values, defs, now)


def next_tick(row: ContactRow, defs: Definitions, now: datetime) -> datetime | None:
    """The earliest instant after `now` at which time alone may change a membership."""
    instants: list[datetime] = []
    for definition in defs.aggregates:
        if definition.id not in defs.segment_aggregates:
            continue  # journeys read the value as of the contact's last change
        moment = aggregates.next_change(row.aggregates.get(state_key(definition)), definition, now)
        if moment is not None:
            instants.append(moment)
    return _earliest(instants, row.profile, defs, now)


def _earliest(
    instants: list[datetime], profile: Profile, defs: Definitions, now: datetime
) -> datetime | None:
    """The earliest of the aggregates' `instants` and the segments' relative-time flips (the
    first of equal instants, aggregates before segments)."""
    flips = defs.compiled.flips
    if flips:
        facts = facts_of(profile)
        for flip in flips:
            moment = flip(facts, now)
            if moment is not None:
                instants.append(moment)
    return min(instants, default=None)


def _settle(
    row: ContactRow,
    announcements: tuple[Event, ...],
    origin: str,
    defs: Definitions,
    now: datetime,
    *,
    profile: Profile | None = None,
    states: dict[str, dict[str, Any]] | None = None,
    seen: dict[str, str] | None = None,
    linked: str | None = None,
    touched: Sequence[str] | None = None,
) -> Outcome:
    """Prune, recompute aggregate values and memberships, and announce what changed.

    `profile`, `states` and `seen` (already pruned at `now`) stand in for the row's own: a change
    not yet in a row. `touched` names the state keys the change folded into; given, and with
    the row settled against these definitions and no stored bucket out of its window since
    (`stable_until`), only those aggregates are settled again and only the segments reading what
    changed are re-checked. Otherwise (None, time passed, new definitions) everything is: the
    same result (a property test holds it), at a cost that grows with the definitions.
    """
    profile = row.profile if profile is None else profile
    states = row.aggregates if states is None else states
    seen = _pruned(row.seen, now) if seen is None else seen
    now_micros = aggregates.epoch_micros(now)
    if touched is not None and row.evaluated == defs.digest and now_micros < row.stable_until:
        kept, values, stable, timed_until, moved = _settle_touched(
            row, states, touched, defs, now_micros
        )
        member = _members(profile, values, defs, now, row.profile, moved)
    else:
        kept, values, stable, timed_until = _settle_all(states, defs, now_micros)
        member = _members(profile, values, defs, now)
    before = set(profile.segments)
    # Segments no longer defined are dropped without an announcement.
    before &= defs.segment_ids
    profile = replaced(profile, {"aggregates": values, "segments": member})
    changes = tuple(
        announce(profile, label, {"segment": segment}, stable_id(origin, label, segment), now, now)
        for label, ids in (
            (SEGMENT_LEFT, before - set(member)),
            (SEGMENT_ENTERED, set(member) - before),
        )
        for segment in sorted(ids)
    )
    instants = [] if timed_until == NEVER else [aggregates.from_epoch_micros(timed_until)]
    tick = _earliest(instants, profile, defs, now)
    armed = row.next_tick
    if armed is not None and armed > now and (tick is None or tick >= armed):
        # The orchestrator's timer only ever moves earlier. One armed sooner than need be
        # fires, finds nothing to change, and the re-check it brings arms the next one; moved
        # later, it would follow every event (each moves `last_seen`, and with it every
        # "within the last ..." condition's flip).
        tick = armed
    update: dict[str, Any] = {
        "profile": profile,
        "aggregates": kept,
        "seen": seen,
        "evaluated": defs.digest,
        "stable_until": stable,
        "timed_until": timed_until,
    }
    retime = tick != row.next_tick
    if retime:
        update["next_tick"] = tick
    # Every announcement carries the profile after the whole change.
    settled = replaced(row, update)
    return Outcome(settled, (*announcements, *changes), retime=retime, linked=linked)


def _settle_all(
    states: dict[str, dict[str, Any]], defs: Definitions, now_micros: int
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], int, int]:
    """Every aggregate pruned and valued at `now`: the states kept, the values, and when the
    first stored bucket of any aggregate (of those segments read) leaves its window."""
    kept: dict[str, dict[str, Any]] = {}
    values: dict[str, Any] = {}
    stable = timed_until = NEVER
    timed = defs.segment_aggregates
    for definition in defs.aggregates:
        key = definition.state_key
        pruned, values[definition.id], expires = aggregates.settle(
            states.get(key), definition, now_micros
        )
        if pruned is not None:
            kept[key] = pruned
        if expires is not None:
            stable = min(stable, expires)
            # Journeys read other aggregates as of the contact's last change: no timer for them.
            if definition.id in timed:
                timed_until = min(timed_until, expires)
    return kept, values, stable, timed_until


def _settle_touched(
    row: ContactRow,
    states: dict[str, dict[str, Any]],
    touched: Sequence[str],
    defs: Definitions,
    now_micros: int,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], int, int, set[str]]:
    """`_settle_all` when only the `touched` states changed since the row was settled and no
    bucket has left its window since: the others keep their values and expiries. Also returns
    the ids of the aggregates whose value moved."""
    values = dict(row.profile.aggregates)
    stable, timed_until = row.stable_until, row.timed_until
    moved: set[str] = set()
    if not touched:
        return states, values, stable, timed_until, moved
    kept = dict(states)
    timed = defs.segment_aggregates
    by_key = defs.compiled.by_state_key
    for key in touched:
        definition = by_key[key]
        pruned, value, expires = aggregates.settle(states.get(key), definition, now_micros)
        if pruned is None:
            kept.pop(key, None)
        else:
            kept[key] = pruned
        old = values.get(definition.id)
        # 1 and 1.0 are equal but print apart: a change of type is a change.
        if value != old or type(value) is not type(old):
            values[definition.id] = value
            moved.add(definition.id)
        if expires is not None:
            # A fold only adds a bucket, so an aggregate's expiry can only come sooner.
            stable = min(stable, expires)
            if definition.id in timed:
                timed_until = min(timed_until, expires)
    return kept, values, stable, timed_until, moved


def _members(
    profile: Profile,
    values: dict[str, Any],
    defs: Definitions,
    now: datetime,
    before: Profile | None = None,
    moved: set[str] | None = None,
) -> tuple[str, ...]:
    """The segments the contact is a member of, in dependency order (the facts read `member` as
    it grows). Given the profile `before` the change and the aggregates whose value `moved`,
    a segment none of whose inputs changed keeps its membership in `before` unchecked."""
    member: list[str] = []
    compiled = defs.compiled
    if before is None or moved is None:
        facts = facts_of(profile, aggregates=values, segments=member)
        for segment_id, holds in compiled.segments:
            if holds(facts, now):
                member.append(segment_id)
        return tuple(sorted(member))
    recheck = set(compiled.unconditional)
    by_aggregate = compiled.aggregate_readers
    for aggregate in moved:
        found = by_aggregate.get(aggregate)
        if found:
            recheck |= found
    readers = compiled.readers
    for root in _changed_roots(before, profile):
        found = readers.get(root)
        if found:
            recheck |= found
    if not recheck:
        return before.segments
    facts = facts_of(profile, aggregates=values, segments=member)
    was = set(before.segments)
    membership_readers = compiled.membership_readers
    flipped = False
    for index, (segment_id, holds) in enumerate(compiled.segments):
        if index in recheck or (flipped and membership_readers[index]):
            now_member = holds(facts, now)
            flipped = flipped or now_member != (segment_id in was)
        else:
            now_member = segment_id in was
        if now_member:
            member.append(segment_id)
    return tuple(sorted(member))


def _changed_roots(before: Profile, after: Profile) -> list[str]:
    """The profile roots (other than aggregates and segments) a condition reads differently."""
    # Most changes keep most roots' very objects (`replaced` shares them): compared by
    # identity first, by value only when a new object came in.
    changed = []
    if before.traits is not after.traits and before.traits != after.traits:
        changed.append("traits")
    if before.tags is not after.tags and before.tags != after.tags:
        changed.append("tags")
    if before.consent is not after.consent and before.consent != after.consent:
        changed.append("consent")
    if (
        before.last_seen != after.last_seen
        or before.event_counts != after.event_counts
        or before.first_seen != after.first_seen
        or before.user_id != after.user_id
        or before.contact_key != after.contact_key
    ):
        changed.append("contact")
    return changed


def _with_dropped(outcome: Outcome, dropped: tuple[str, ...]) -> Outcome:
    return replace(outcome, dropped=dropped) if dropped else outcome


def _message_digest(message_id: str) -> str:
    return stable_id(message_id, length=16)


def _remember(kept: dict[str, str], digest: str, now: datetime) -> dict[str, str]:
    """The hours `_unless_seen` kept, with the digest added to the current hour's."""
    hour = str(int(now.timestamp()) // _HOUR * _HOUR)
    ids = kept.get(hour)
    kept[hour] = digest if ids is None else f"{ids} {digest}"
    return kept


def _pruned(seen: dict[str, str], now: datetime) -> dict[str, str]:
    """Hours older than the de-duplication window plus the current hour join the `OLDER`
    digests, of which stay the newest as many as make `OLDER_IDS` with the window's."""
    kept = _unless_seen(seen, None, now)
    assert kept is not None
    return kept


def _unless_seen(seen: dict[str, str], digest: str | None, now: datetime) -> dict[str, str] | None:
    """What `_pruned` keeps (its strings shared with the row's), or None when `digest` is among
    the row's: one pass for the check and the pruning.

    The check is exact: every digest is `_DIGEST` hex characters and they are separated by
    spaces, so a match of one in an hour's string is one of its digests, never a span across
    two."""
    horizon = _horizon(now)
    kept: dict[str, str] = {}
    aged: list[tuple[int, str]] = []
    width = 0  # of the window's strings, each digest and its separator
    for hour, ids in seen.items():
        if digest is not None and digest in ids:
            return None
        start = int(hour)
        if start >= horizon:
            kept[hour] = ids
            width += len(ids) + 1
        else:
            aged.append((start, ids))
    # A digest checked is remembered next (`_remember`): it takes one place of the window's.
    room = OLDER_IDS - width // (_DIGEST + 1) - (digest is not None)
    if aged and room > 0:
        older = aged[0][1] if len(aged) == 1 else " ".join(ids for _, ids in sorted(aged))
        kept[OLDER] = _newest(older, room)
    return kept


def _newest(ids: str, count: int = OLDER_IDS) -> str:
    """The last `count` digests of a space-separated string of them."""
    width = count * (_DIGEST + 1) - 1
    return ids[-width:] if len(ids) > width else ids


def _ids_moved(row: ContactRow) -> ContactRow:
    """A row written when the profile kept its last message ids itself: the digests of those its
    hours do not hold join the `OLDER` ones, as the oldest (a duplicate among them is still
    found), and the profile keeps none."""
    held = _digests(row.seen)
    digests = dict.fromkeys(map(_message_digest, row.profile.recent_message_ids))
    moved = " ".join(d for d in digests if d not in held)
    older = " ".join(ids for ids in (moved, row.seen.get(OLDER)) if ids)
    seen = {**row.seen, OLDER: _newest(older)} if older else dict(row.seen)
    profile = replaced(row.profile, {"recent_message_ids": ()})
    return replaced(row, {"profile": profile, "seen": seen})


def _digests(seen: dict[str, str]) -> set[str]:
    """Every digest of a row's `seen`."""
    return {digest for ids in seen.values() for digest in ids.split()}


def _horizon(now: datetime) -> float:
    return now.timestamp() - DEDUPE_WINDOW.total_seconds() - _HOUR


def _merged_ids(
    mine: tuple[str, ...], other_key: str, theirs: Profile, limits: ProfileLimits
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The anonymous ids after merging `other_key`'s history: `other_key` always (its history
    is here now, and erasure is forwarded to every listed id; it was linked within the limit),
    then the other ids it had, up to `max_anonymous_ids`."""
    ids = _union(mine, (other_key,))
    extra = [i for i in theirs.anonymous_ids if i not in ids]
    room = max(0, limits.max_anonymous_ids - len(ids))
    if len(extra) <= room:
        return (*ids, *extra), ()
    return (*ids, *extra[:room]), (
        f"{len(extra) - room} anonymous ids of the merged contact not linked: the profile "
        f"already links {limits.max_anonymous_ids} anonymous ids",
    )


def _union(first: tuple[str, ...], second: tuple[str, ...]) -> tuple[str, ...]:
    """Each item once, in the order first seen (`second` may repeat an item of its own)."""
    return tuple(dict.fromkeys((*first, *second)))


def _changed(events: tuple[Event, ...], label: str) -> frozenset[str]:
    return frozenset(str(e.properties["segment"]) for e in events if e.event == label)
