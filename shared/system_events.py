"""The events Waypost emits itself: one home for their names, and the rule that only Waypost's
own sources may emit them.

A write key ships inside every browser and app, so whatever it posts is a claim, not a fact. It
may report behaviour; it may not announce consent changes, erasures, segment, tag, attribute or
audience changes, or move a message's ledger. Ingest refuses these names on its public API, and
every consumer accepts them only from a Waypost source (`waypost` or `waypost-…`), which no
write key may be named after.
"""

from __future__ import annotations

from shared.contracts import Event

# Consent: from signed unsubscribe links, provider reports (an SMS STOP) or an admin call.
SUBSCRIBED = "Subscribed"
UNSUBSCRIBED = "Unsubscribed"
# Contact changes announced by the segmenter.
CONTACT_FORGOTTEN = "Contact Forgotten"
SEGMENT_ENTERED = "Segment Entered"
SEGMENT_LEFT = "Segment Left"
AUDIENCE_SELECTED = "Audience Selected"
TAG_ADDED = "Tag Added"
TAG_REMOVED = "Tag Removed"
ATTRIBUTE_CHANGED = "Attribute Changed"
# A message's life, from the dispatcher and from tracked links and provider callbacks.
MESSAGE_SENT = "Message Sent"
MESSAGE_FAILED = "Message Failed"
MESSAGE_SKIPPED = "Message Skipped"
MESSAGE_UNKNOWN = "Message Unknown"
MESSAGE_DELIVERED = "Message Delivered"
MESSAGE_UNDELIVERED = "Message Undelivered"
EMAIL_OPENED = "Email Opened"
EMAIL_LINK_CLICKED = "Email Link Clicked"

SYSTEM_EVENTS: frozenset[str] = frozenset(
    {
        SUBSCRIBED,
        UNSUBSCRIBED,
        CONTACT_FORGOTTEN,
        SEGMENT_ENTERED,
        SEGMENT_LEFT,
        AUDIENCE_SELECTED,
        TAG_ADDED,
        TAG_REMOVED,
        ATTRIBUTE_CHANGED,
        MESSAGE_SENT,
        MESSAGE_FAILED,
        MESSAGE_SKIPPED,
        MESSAGE_UNKNOWN,
        MESSAGE_DELIVERED,
        MESSAGE_UNDELIVERED,
        EMAIL_OPENED,
        EMAIL_LINK_CLICKED,
    }
)
# What the dispatcher acts on (its ledger, consent records and erasures). The segmenter passes
# each on to `waypost.delivery-reports.v1` once it accepted it (de-duplicated, from a Waypost
# source, of a contact not forgotten), so the dispatcher reads these alone, not every event.
DELIVERY_REPORTS: frozenset[str] = frozenset(
    {
        MESSAGE_DELIVERED,
        MESSAGE_UNDELIVERED,
        EMAIL_OPENED,
        EMAIL_LINK_CLICKED,
        SUBSCRIBED,
        UNSUBSCRIBED,
        CONTACT_FORGOTTEN,
    }
)
_FOLDED = frozenset(name.casefold() for name in SYSTEM_EVENTS)

WAYPOST_SOURCE = "waypost"


def is_system_event(name: str | None) -> bool:
    """Whether `name` is one Waypost emits itself, in any letter case or spacing at the ends."""
    return name is not None and name.strip().casefold() in _FOLDED


def is_waypost_source(source: str | None) -> bool:
    """Whether an event's `source` is one of Waypost's own (never a write key's name)."""
    return source is not None and (
        source == WAYPOST_SOURCE or source.startswith(f"{WAYPOST_SOURCE}-")
    )


def forged(event: Event) -> bool:
    """A system event that did not come from Waypost: consumers must not act on it."""
    return is_system_event(event.event) and not is_waypost_source(event.source)
