"""Asking the SMS provider what became of a send that got no answer (pure: read and decide).

A Twilio-style API has no idempotency key, but it lists the messages sent to a number
(`GET …/Messages.json?To=`), and each listed message echoes its `body` and sender. A send whose
POST went unanswered, or that a worker died in, is looked up there: found, it was sent; proven
absent, it never reached the provider and may be sent; anything less stays `unknown`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

from services.dispatcher.domain.outcomes import ASKED_TOO_SOON, Outcome

# The provider's clock against ours, and its `date_created` rounded down to whole seconds: a
# message created this long before our try began still counts as possibly ours.
CLOCK_ALLOWANCE = timedelta(seconds=5)


@dataclass(frozen=True)
class ListedSms:
    """One message of the provider's listing, as far as reconciling needs it."""

    sid: str
    body: str
    sender: str | None
    messaging_service_sid: str | None
    created_at: datetime | None  # None: missing or unreadable, so it may be recent


@dataclass(frozen=True)
class SmsListing:
    """Messages to one number, newest first; `more` when the provider has further pages."""

    messages: tuple[ListedSms, ...]
    more: bool = False


@dataclass(frozen=True)
class SmsTry:
    """What one try posted (or would have), a time before it began, and the latest its request
    could have been written (None: when it began)."""

    to: str
    body: str
    sender: str | None
    messaging_service_sid: str | None
    began: datetime
    written_by: datetime | None = None


class SmsHistory(Protocol):
    """The provider's listing of messages sent to a number, or why it could not be had."""

    async def sent_to(self, to: str) -> SmsListing | str: ...


def parse_sms_listing(status: int, body: Mapping[str, Any] | None) -> SmsListing | str:
    """A Messages.json list answer, or the reason it is no answer."""
    if not 200 <= status < 300:
        detail = (body or {}).get("message") or f"HTTP {status}"
        return f"sms listing: HTTP {status}: {detail}"
    if body is None or not isinstance(body.get("messages"), list):
        return "sms listing: no messages list in the answer"
    listed: list[ListedSms] = []
    for item in body["messages"]:
        if not isinstance(item, Mapping) or not isinstance(item.get("sid"), str):
            return "sms listing: a message without a sid"
        listed.append(
            ListedSms(
                sid=item["sid"],
                body=str(item.get("body") or ""),
                sender=_text(item.get("from")),
                messaging_service_sid=_text(item.get("messaging_service_sid")),
                created_at=_rfc2822(item.get("date_created")),
            )
        )
    return SmsListing(tuple(listed), more=bool(body.get("next_page_uri")))


def reconcile_sms(
    listing: SmsListing | str, attempt: SmsTry, now: datetime, settle: timedelta
) -> Outcome:
    """What a send without an answer came to, by the provider's listing of its number.

    `sent` (with the provider's sid) when a message created since the try began carries our body
    from our sender. `retry` (it never reached the provider, sending it is safe) only when the
    listing is complete back to the try's start, holds nothing to the number since then, and
    its request was last writable (`written_by`, else its start) at least `settle` ago: a
    request still on its way, or not read by the provider yet, would not be listed.
    Anything else, including another message to the number in that time, is `unknown`.
    """
    if isinstance(listing, str):
        return Outcome("unknown", f"not reconciled: {listing}")
    since = attempt.began - CLOCK_ALLOWANCE
    recent = [m for m in listing.messages if m.created_at is None or m.created_at >= since]
    ours = [m for m in recent if m.body == attempt.body and _same_sender(m, attempt)]
    if ours:
        first = ours[-1]  # newest first: the earliest one since the try began
        return Outcome(
            "sent",
            f"reconciled: listed by the provider as {first.sid}",
            provider_id=first.sid,
        )
    if recent:
        return Outcome(
            "unknown",
            f"not reconciled: the provider lists {len(recent)} other message(s) to the number "
            "since the try began",
        )
    reaches_back = any(m.created_at is not None and m.created_at < since for m in listing.messages)
    if listing.more and not reaches_back:
        return Outcome("unknown", "not reconciled: the listing does not reach back to the try")
    if now - (attempt.written_by or attempt.began) < settle:
        return Outcome("unknown", ASKED_TOO_SOON)
    return Outcome("retry", "reconciled: the provider lists no such message; it never arrived")


def _same_sender(message: ListedSms, attempt: SmsTry) -> bool:
    if attempt.messaging_service_sid:
        return message.messaging_service_sid == attempt.messaging_service_sid
    return message.sender == attempt.sender


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _rfc2822(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return parsed if parsed.tzinfo is not None else None
