"""Asking the email provider what became of a message that got no answer (pure: read, decide).

SMTP cannot be asked about a message after the fact, but the providers that relay it keep an
events log with an API: Mailgun's `GET /v3/{domain}/events?message-id=…&event=accepted` lists
the `accepted` events of the message with that Message-ID. Ours is deterministic per message
id (`message_id_header`), so an accepted event under it is our message: `sent`.

None proves the message never reached the provider only when the log is known to show our
mail: the try is old enough for the log to show it (`settle` after the server could last have
taken it), young enough for the log to still hold it (`RETAINED`), and the same log shows a
message this worker saw accepted, or found the receipt of, sent by its own route (`vouches`):
an events URL of another domain or region
answers every query with nothing. Then a new try is safe. Anything less proves nothing, and
the send stays `unknown`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from services.dispatcher.domain.outcomes import ASKED_TOO_SOON, Outcome

# Events older than this may be gone from the provider's log (Mailgun keeps them from one to
# thirty days by plan): a try this old found absent proves nothing.
RETAINED = timedelta(days=1)


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
    taken_by: datetime | None,
    now: datetime,
    settle: timedelta,
) -> Reconciled:
    """What a message without an answer came to, by the provider's events of `message_id`
    (its Message-ID header). `taken_by`: the latest the server could have taken the message
    (the try's start plus its SMTP timeout; None: the try's start is not known).

    `sent` when the provider accepted a message under that Message-ID. `retry` (it never
    reached the provider, once the log is vouched for: `vouches`) only when the answer lists
    events of that Message-ID alone, none of them `accepted`, at least `settle` after
    `taken_by` (an events log shows a message some time after it took it) and within
    `RETAINED` of it; asked sooner, `unknown` with the time to ask again. Anything else is
    `unknown`.
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
    if taken_by is None:
        return Reconciled(
            Outcome("unknown", "not reconciled: when the try began is not known to rule it out")
        )
    ready = taken_by + settle
    if now < ready:
        return Reconciled(
            Outcome("unknown", ASKED_TOO_SOON),
            ask_at=ready,
        )
    if now - taken_by > RETAINED:
        return Reconciled(
            Outcome(
                "unknown",
                "not reconciled: the try is older than the events log may keep its events",
            )
        )
    return Reconciled(
        Outcome("retry", "reconciled: the provider never accepted the message; it never arrived")
    )


def vouches(answer: EmailEvents | str, message_id: str) -> str | None:
    """None when the log shows `message_id` (a message the server was seen to accept, long
    enough ago for the log to show it) accepted; otherwise why the log cannot be trusted to
    show our mail."""
    if isinstance(answer, str):
        return answer
    wanted = bare(message_id)
    if any(e.event == "accepted" and e.message_id == wanted for e in answer.events):
        return None
    return (
        f"the events log does not show {message_id}, which the server accepted: is the events "
        "URL that of the sending domain and region?"
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
