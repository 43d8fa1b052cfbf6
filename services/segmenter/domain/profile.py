"""Profile folding: apply one event to a contact's profile (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from shared.contracts import Event, Profile

# Message ids remembered per contact for de-duplication; bounded so a profile stays small.
RECENT_MESSAGE_IDS = 256


@dataclass(frozen=True)
class Applied:
    """The profile after an event, and whether the event was new (not a duplicate)."""

    profile: Profile
    accepted: bool


def apply_event(profile: Profile | None, event: Event, now: datetime) -> Applied:
    """Fold an event into the profile; a repeated `messageId` changes nothing."""
    if profile is not None and event.message_id in profile.recent_message_ids:
        return Applied(profile, accepted=False)
    if profile is None:
        profile = Profile(
            contact_key=event.contact_key,
            first_seen=event.timestamp,
            last_seen=event.timestamp,
            updated_at=now,
        )
    traits = profile.traits
    if event.traits and event.type in ("identify", "track", "page", "screen"):
        traits = {**traits, **event.traits}
    anonymous_ids = profile.anonymous_ids
    if event.anonymous_id and event.anonymous_id not in anonymous_ids:
        anonymous_ids = (*anonymous_ids, event.anonymous_id)
    counts = {**profile.event_counts, event.label: profile.event_counts.get(event.label, 0) + 1}
    recent = (*profile.recent_message_ids, event.message_id)[-RECENT_MESSAGE_IDS:]
    updated = profile.model_copy(
        update={
            "user_id": event.user_id or profile.user_id,
            "anonymous_ids": anonymous_ids,
            "traits": traits,
            "first_seen": min(profile.first_seen, event.timestamp),
            "last_seen": max(profile.last_seen, event.timestamp),
            "event_counts": counts,
            "recent_message_ids": recent,
            "updated_at": now,
        }
    )
    return Applied(updated, accepted=True)
