"""Events from signed links and SMS status callbacks: unsubscribes, opens, clicks, deliveries.

Pure builders over the link's claims; message ids derive from the message, so a repeated
open, click or callback is de-duplicated downstream.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from shared.contracts import Event
from shared.links import LinkClaims
from shared.system_events import (
    EMAIL_LINK_CLICKED,
    EMAIL_OPENED,
    MESSAGE_DELIVERED,
    MESSAGE_UNDELIVERED,
    UNSUBSCRIBED,
)

LINKS_SOURCE = "waypost-links"
SMS_SOURCE = "waypost-sms"


# Twilio's message statuses: the final ones become events, the interim ones are acknowledged.
SMS_DELIVERED = frozenset({"delivered"})
SMS_UNDELIVERED = frozenset({"undelivered", "failed"})
SMS_INTERIM = frozenset({"queued", "accepted", "sending", "sent", "scheduled"})


class UnknownSmsStatus(ValueError):
    """A `MessageStatus` that is neither final nor interim."""


def unsubscribed(claims: LinkClaims, now: datetime, method: str = "one_click") -> Event:
    """`Unsubscribed` from the channel the message came on (the segmenter withdraws consent)."""
    return _event(
        claims,
        now,
        UNSUBSCRIBED,
        f"unsubscribed:{claims.message_id}:{claims.channel}",
        LINKS_SOURCE,
        {"method": method},
    )


def email_opened(claims: LinkClaims, now: datetime, user_agent: str | None = None) -> Event:
    return _event(
        claims,
        now,
        EMAIL_OPENED,
        f"opened:{claims.message_id}",
        LINKS_SOURCE,
        {},
        _client(user_agent),
    )


def email_link_clicked(claims: LinkClaims, now: datetime, user_agent: str | None = None) -> Event:
    link_id = claims.link_id or ""
    return _event(
        claims,
        now,
        EMAIL_LINK_CLICKED,
        f"clicked:{claims.message_id}:{link_id}",
        LINKS_SOURCE,
        {"link_id": link_id, "url": claims.url},
        _client(user_agent),
    )


def sms_status_changed(
    claims: LinkClaims,
    now: datetime,
    *,
    status: str,
    provider_id: str | None,
    error_code: str | None,
) -> Event | None:
    """The event a status callback reports: None while the message is on its way.

    Raises `UnknownSmsStatus` for a status Twilio does not document.
    """
    if status in SMS_INTERIM:
        return None
    if status in SMS_DELIVERED:
        name, prefix = MESSAGE_DELIVERED, "delivered"
    elif status in SMS_UNDELIVERED:
        name, prefix = MESSAGE_UNDELIVERED, "undelivered"
    else:
        raise UnknownSmsStatus(f"unknown message status {status!r}")
    return _event(
        claims,
        now,
        name,
        f"{prefix}:{claims.message_id}",
        SMS_SOURCE,
        {"provider_id": provider_id, "status": status, "error_code": error_code or None},
    )


def _event(
    claims: LinkClaims,
    now: datetime,
    name: str,
    message_id: str,
    source: str,
    extra: dict[str, Any],
    context: dict[str, Any] | None = None,
) -> Event:
    known = {
        "template_id": claims.template_id,
        "journey_id": claims.journey_id,
        "step_id": claims.step_id,
    }
    properties: dict[str, Any] = {
        "message_id": claims.message_id,
        "channel": claims.channel,
        **{key: value for key, value in known.items() if value is not None},
        **extra,
    }
    return Event(
        type="track",
        event=name,
        user_id=claims.contact_key if claims.is_user else None,
        anonymous_id=None if claims.is_user else claims.contact_key,
        message_id=message_id,
        timestamp=now,
        received_at=now,
        properties=properties,
        context=context or {},
        source=source,
    )


def _client(user_agent: str | None) -> dict[str, Any]:
    # The user agent tells a person's mail client from a link scanner or an image proxy.
    return {"userAgent": user_agent} if user_agent else {}
