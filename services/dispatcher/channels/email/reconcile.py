"""Asking the email provider what became of a message that got no answer (pure: read, decide).

SMTP cannot be asked about a message after the fact, but the providers that relay it keep an
events log with an API: Mailgun's `GET /v3/{domain}/events?message-id=…&event=accepted` lists
the `accepted` events of the message with that Message-ID. Ours is deterministic per message
id (`message_id_header`), so an accepted event under it is our message: `sent`. None, once the
log has had time to show it (`settle`), proves the message never reached the provider: a new
try is safe. An answer that cannot be read, or one that was not filtered by our Message-ID,
proves nothing and the send stays `unknown`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from services.dispatcher.domain.outcomes import Outcome


def message_id_header(message_id: str, domain: str) -> str:
    """The Message-ID header of a message: the same for every try of one message id."""
    return f"<{message_id}@{domain}>"


@dataclass(frozen=True)
class EmailEvent:
    """One event of the provider's log, as far as reconciling needs it."""

    id: str
    event: str
    message_id: str  # the Message-ID header, without its angle brackets
    at: datetime | None


@dataclass(frozen=True)
class EmailEvents:
    """The provider's answer to a query by Message-ID."""

    events: tuple[EmailEvent, ...]


class EmailHistory(Protocol):
    """The provider's events of the message with Message-ID `message_id` (with its angle
    brackets), or why they could not be had."""

    async def events_of(self, message_id: str) -> EmailEvents | str: ...


@dataclass(frozen=True)
class Reconciled:
    """What the asking came to; `ask_at`: when asking again can tell (the log had not had
    time to show the message when it was asked)."""

    outcome: Outcome
    ask_at: datetime | None = None


def parse_email_events(status: int, body: Mapping[str, Any] | None) -> EmailEvents | str:
    """A Mailgun-style events answer (`{"items": [...], "paging": {...}}`), or the reason it
    is no answer."""
    if not 200 <= status < 300:
        detail = (body or {}).get("message") or f"HTTP {status}"
        return f"email events: HTTP {status}: {detail}"
    if body is None or not isinstance(body.get("items"), list):
        return "email events: no items list in the answer"
    events: list[EmailEvent] = []
    for item in body["items"]:
        if not isinstance(item, Mapping):
            return "email events: an item that is not an object"
        message = item.get("message")
        headers = message.get("headers") if isinstance(message, Mapping) else None
        found = headers.get("message-id") if isinstance(headers, Mapping) else None
        kind = item.get("event")
        if not isinstance(found, str) or not isinstance(kind, str):
            return "email events: an event without its kind or the message's Message-ID"
        events.append(
            EmailEvent(
                id=str(item.get("id") or ""),
                event=kind,
                message_id=bare(found),
                at=_epoch(item.get("timestamp")),
            )
        )
    return EmailEvents(tuple(events))


def reconcile_email(
    answer: EmailEvents | str,
    message_id: str,
    began: datetime,
    now: datetime,
    settle: timedelta,
) -> Reconciled:
    """What a message without an answer came to, by the provider's events of `message_id`
    (its Message-ID header).

    `sent` when the provider accepted a message under that Message-ID. `retry` (it never
    reached the provider) only when the answer lists events of that Message-ID alone, none of
    them `accepted`, and the try began at least `settle` ago (an events log shows a message
    some time after it took it); asked sooner, `unknown` with the time to ask again. Anything
    else is `unknown`.
    """
    if isinstance(answer, str):
        return Reconciled(Outcome("unknown", f"not reconciled: {answer}"))
    wanted = bare(message_id)
    others = [e for e in answer.events if e.message_id != wanted]
    if others:
        return Reconciled(
            Outcome(
                "unknown",
                f"not reconciled: the provider's events answer holds {len(others)} event(s) "
                "of other messages (not filtered by Message-ID)",
            )
        )
    accepted = [e for e in answer.events if e.event == "accepted"]
    if accepted:
        first = min(accepted, key=lambda e: e.at or now)
        return Reconciled(
            Outcome(
                "sent",
                f"reconciled: accepted by the provider (event {first.id or 'without id'})",
                provider_id=message_id,
            )
        )
    ready = began + settle
    if now < ready:
        return Reconciled(
            Outcome("unknown", "not reconciled: asked too soon after the try to rule it out"),
            ask_at=ready,
        )
    return Reconciled(
        Outcome("retry", "reconciled: the provider never accepted the message; it never arrived")
    )


def bare(message_id: str) -> str:
    """A Message-ID without its angle brackets, as events APIs show and filter it."""
    return message_id.strip().removeprefix("<").removesuffix(">")


def _epoch(value: object) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        return None
