"""Profile folding (pure): apply an event or a contact command to a contact's profile.

The segmenter is the only writer of profiles in production; the journey simulator folds the same
way, so a simulated contact evolves exactly like a real one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic_core import to_json

from shared.channels import with_consent, without_dead_address
from shared.contracts import ContactCommand, Event, Profile, replaced
from shared.ids import stable_id
from shared.system_events import (
    ATTRIBUTE_CHANGED,
    CONTACT_FORGOTTEN,
    TAG_ADDED,
    TAG_REMOVED,
    WAYPOST_SOURCE,
)

# Labels of the events that announce contact changes (journey triggers match on them), and the
# one emitted when a contact is erased (readers drop every row they keep for the contact).
__all__ = ["ATTRIBUTE_CHANGED", "CONTACT_FORGOTTEN", "TAG_ADDED", "TAG_REMOVED"]

# The profile view's field beside a stored profile's own (the `profiles` collection): the offset
# of the record of `waypost.profiles.v1` it was written from.
STORED_OFFSET = "topic_offset"


@dataclass(frozen=True)
class ProfileLimits:
    """Bounds that keep every profile (and the contact event carrying it) well under the
    broker's message size (docs/segments.md, "Profile limits"): at most `max_traits` traits,
    each at most `max_trait_bytes` as JSON (name and value), at most `max_event_names`
    distinct event names counted, and at most `max_anonymous_ids` anonymous ids linked. Ingest
    refuses a call that alone passes them; the segmenter drops what would take a profile past
    them."""

    max_traits: int = 256
    max_trait_bytes: int = 1024
    max_event_names: int = 512
    max_anonymous_ids: int = 64


DEFAULT_LIMITS = ProfileLimits()


def trait_size(name: str, value: Any) -> int:
    """A trait's size as JSON: its name and its value (`"name":value` without the quotes)."""
    return len(name.encode("utf-8", "surrogatepass")) + len(to_json(value, inf_nan_mode="null"))


def oversized_traits(traits: dict[str, Any], limits: ProfileLimits) -> list[str]:
    """The names of `traits` whose size passes the limit."""
    if len(to_json(traits, inf_nan_mode="null")) <= limits.max_trait_bytes:
        return []  # all of them together fit: each one does
    limit = limits.max_trait_bytes
    return [name for name, value in traits.items() if trait_size(name, value) > limit]


def capped_traits(
    traits: dict[str, Any], incoming: dict[str, Any], limits: ProfileLimits
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """`traits` updated with `incoming` within the limits, and why anything was left out: an
    oversized value is dropped, and so is a new trait once the profile holds `max_traits`."""
    too_big = set(oversized_traits(incoming, limits))
    fits = not too_big and len(traits) + len(incoming) <= limits.max_traits
    if fits:
        return {**traits, **incoming}, ()
    merged = dict(traits)
    dropped: list[str] = []
    for name, value in incoming.items():
        if name in too_big:
            dropped.append(
                f"trait '{name}': {trait_size(name, value)} bytes as JSON, over the limit of "
                f"{limits.max_trait_bytes}"
            )
        elif name not in merged and len(merged) >= limits.max_traits:
            dropped.append(f"trait '{name}': the profile already holds {limits.max_traits} traits")
        else:
            merged[name] = value
    return merged, tuple(dropped)


def merged_counts(
    mine: dict[str, int], theirs: dict[str, int], limits: ProfileLimits
) -> tuple[dict[str, int], tuple[str, ...]]:
    """Two contacts' event counts added up; names new to `mine` only up to `max_event_names`."""
    merged = dict(mine)
    left_out = 0
    for name, count in theirs.items():
        if name in merged:
            merged[name] += count
        elif len(merged) < limits.max_event_names:
            merged[name] = count
        else:
            left_out += 1
    if not left_out:
        return merged, ()
    return merged, (
        f"{left_out} event names of the merged contact not counted: the profile already counts "
        f"{limits.max_event_names} distinct event names",
    )


def counted(
    counts: dict[str, int], label: str, limits: ProfileLimits
) -> tuple[dict[str, int], tuple[str, ...]]:
    """`counts` with one more `label`, unless it is a new name past `max_event_names`."""
    if label not in counts and len(counts) >= limits.max_event_names:
        return counts, (
            f"event '{label}' not counted: the profile already counts "
            f"{limits.max_event_names} distinct event names",
        )
    return {**counts, label: counts.get(label, 0) + 1}, ()


def with_anonymous_id(
    ids: tuple[str, ...], anonymous_id: str, limits: ProfileLimits
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`ids` with `anonymous_id` linked, unless it is new past `max_anonymous_ids` (then not
    linked, with the reason; the reason names no id, which is a contact's key)."""
    if anonymous_id in ids:
        return ids, ()
    if len(ids) >= limits.max_anonymous_ids:
        return ids, (
            f"anonymous id not linked: the profile already links {limits.max_anonymous_ids} "
            "anonymous ids",
        )
    return (*ids, anonymous_id), ()


@dataclass(frozen=True)
class Applied:
    """The profile after an event, the `Attribute Changed` events announcing traits the event
    changed, and what the profile's limits left out (one reason each)."""

    profile: Profile
    announcements: tuple[Event, ...] = ()
    dropped: tuple[str, ...] = ()


def apply_event(
    profile: Profile | None, event: Event, now: datetime, limits: ProfileLimits = DEFAULT_LIMITS
) -> Applied:
    """Fold an event into the profile (traits, identities, counts, consent, dead push tokens).
    Traits, event names and anonymous ids past `limits` are left out (`Applied.dropped` says
    which); the event itself still counts for everything else. The caller de-duplicates: an
    event folded twice counts twice (the segmenter remembers the message ids it folded in its
    row, `services.segmenter.domain.contact`)."""
    if profile is None:
        profile = first_profile(event.contact_key, event.timestamp, now)
    traits = profile.traits
    dropped: tuple[str, ...] = ()
    if event.traits and event.type in ("identify", "track", "page", "screen"):
        traits, dropped = capped_traits(traits, event.traits, limits)
    anonymous_ids = profile.anonymous_ids
    unlinked: tuple[str, ...] = ()
    if event.anonymous_id:
        anonymous_ids, unlinked = with_anonymous_id(anonymous_ids, event.anonymous_id, limits)
    counts, uncounted = counted(profile.event_counts, event.label, limits)
    updated = replaced(
        profile,
        {
            "user_id": event.user_id or profile.user_id,
            "anonymous_ids": anonymous_ids,
            "traits": traits,
            "first_seen": min(profile.first_seen, event.timestamp),
            "last_seen": max(profile.last_seen, event.timestamp),
            "event_counts": counts,
            "updated_at": now,
        },
    )
    announcements = tuple(
        announce(
            updated,
            ATTRIBUTE_CHANGED,
            {"attribute": name, "value": value, "previous": profile.traits.get(name)},
            stable_id(event.message_id, "attribute", name),
            event.timestamp,
            now,
        )
        for name, value in traits.items()
        if name not in profile.traits or profile.traits[name] != value
    )
    # Consent events and dead push tokens change the profile by the channels' own rules.
    updated = without_dead_address(with_consent(updated, event), event)
    return Applied(
        updated,
        announcements=announcements,
        dropped=dropped + uncounted + unlinked,
    )


@dataclass(frozen=True)
class Changed:
    """The profile after a contact command, the events that announce the change, and what the
    profile's limits left out."""

    profile: Profile
    events: tuple[Event, ...]
    dropped: tuple[str, ...] = ()


def apply_command(
    profile: Profile | None,
    command: ContactCommand,
    now: datetime,
    limits: ProfileLimits = DEFAULT_LIMITS,
) -> Changed:
    """Apply a tag, attribute or coupon change; a repeated command changes nothing, and so does
    an attribute past the profile's `limits` (`Changed.dropped` says why).

    Each real change yields an event (`Tag Added`, `Tag Removed`, `Attribute Changed`) with an id
    derived from the command's, so journeys can trigger on it and replays stay idempotent.
    """
    if profile is None:
        profile = first_profile(command.contact_key, command.at, now)
    update: dict[str, Any] = {}
    label: str | None = None
    properties: dict[str, Any] = {}
    if command.kind == "add_tag" and command.tag and command.tag not in profile.tags:
        update["tags"] = (*profile.tags, command.tag)
        label, properties = TAG_ADDED, {"tag": command.tag}
    elif command.kind == "remove_tag" and command.tag in profile.tags:
        update["tags"] = tuple(t for t in profile.tags if t != command.tag)
        label, properties = TAG_REMOVED, {"tag": command.tag}
    elif command.kind == "set_attribute" and command.attribute:
        previous = profile.traits.get(command.attribute)
        if previous != command.value or command.attribute not in profile.traits:
            traits, dropped = capped_traits(
                profile.traits, {command.attribute: command.value}, limits
            )
            if dropped:
                return Changed(profile, (), dropped)
            update["traits"] = traits
            label = ATTRIBUTE_CHANGED
            properties = {
                "attribute": command.attribute,
                "value": command.value,
                "previous": previous,
            }
    elif (
        command.kind == "store_coupon"
        and command.coupon is not None
        and all(c.code != command.coupon.code for c in profile.coupons)
    ):
        update["coupons"] = (*profile.coupons, command.coupon)
    if not update:
        return Changed(profile, ())
    changed = profile.model_copy(update={**update, "updated_at": now})
    if label is None:
        return Changed(changed, ())
    origin = {"journey_id": command.journey_id, "instance_id": command.instance_id}
    event = announce(
        changed,
        label,
        {**properties, **origin},
        stable_id(command.command_id, "event"),
        command.at,
        now,
    )
    return Changed(changed, (event,))


def first_profile(contact_key: str, seen: datetime, now: datetime) -> Profile:
    return Profile(contact_key=contact_key, first_seen=seen, last_seen=seen, updated_at=now)


def announce(
    profile: Profile,
    label: str,
    properties: dict[str, Any],
    message_id: str,
    at: datetime,
    now: datetime,
) -> Event:
    """An event about a change to the contact, from Waypost itself (journeys trigger on it).

    Made as a copy of a validated template with these fields set (`replaced`), not validated
    again: every field comes from Waypost's own validated models and clock, and the segmenter
    announces most events it folds (a validated `Event` cost twice as much). The result equals
    the validated `Event` of the same fields (tests/unit/test_profile.py)."""
    return replaced(
        _ANNOUNCEMENT,
        {
            "event": label,
            "user_id": profile.user_id,
            "anonymous_id": None if profile.user_id else profile.contact_key,
            "message_id": message_id,
            "timestamp": at,
            "received_at": now,
            # Dicts of its own, as validation would make them: none shared with the caller or
            # another announcement.
            "properties": dict(properties),
            "traits": {},
            "context": {},
        },
    )


# What every announcement shares; `announce` sets the rest.
_ANNOUNCEMENT = Event(
    type="track",
    event="",
    message_id="",
    timestamp=datetime.fromtimestamp(0, UTC),
    received_at=datetime.fromtimestamp(0, UTC),
    source=WAYPOST_SOURCE,
)
