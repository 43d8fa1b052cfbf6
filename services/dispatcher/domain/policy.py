"""Delivery policy (pure): whether a message may go now, and what follows an outcome.

Where it goes (a channel's address) and what consent means are `shared.channels`'s rules.

Time comes in as arguments and randomness from hashes of the message id, so a replayed request
is decided exactly like the first one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from shared.channels import address_of, consented
from shared.contracts import Channel, Profile, SendRequest
from shared.ids import stable_fraction, stable_id

# Skip reasons after which the next channel of a priority list is tried: the contact cannot be
# reached on this one, or this channel's message cannot be made for them (its template fails for
# this contact, or its content cannot be written as a provider request). A frequency cap or a
# template that is not ready does not move to another channel.
UNREACHABLE = ("unsubscribed", "no_address", "suppressed", "channel_not_configured")
UNSENDABLE = ("template_error", "unsendable")

# Retry topics, one per delay class: attempt 1 waits in "short", 2 in "medium", later in "long".
RETRY_CLASSES: tuple[str, ...] = ("short", "medium", "long")
JITTER = 0.25  # up to +25% on every delay, so retries of one burst spread out


@dataclass(frozen=True)
class ConsentRecord:
    """The dispatcher's own record of an (un)subscribe it saw, newer than some profiles."""

    given: bool
    at: datetime


def consent_refusal(
    channel: Channel, profile: Profile, recorded: ConsentRecord | None
) -> str | None:
    """`unsubscribed` when the freshest word on this channel is a withdrawal."""
    if recorded is not None and recorded.at >= profile.updated_at:
        given = recorded.given
    else:
        given = consented(channel, profile)
    return None if given else f"unsubscribed: {channel}"


def send_address(request: SendRequest) -> str | None:
    """Where the message goes: a test send's address (the marketer who asked for it), else the
    contact's address on the channel (`shared.channels`)."""
    if request.test is not None:
        return request.test.address.strip() or None
    return address_of(request.channel, request.profile)


def recipient_refusal(
    request: SendRequest, recorded: ConsentRecord | None, address: str | None
) -> str | None:
    """Why the message may not go to `address` before suppressions are asked: the contact's
    consent, then the address itself. A test send does not ask the contact's consent (the
    contact is not its recipient); its address is checked like any."""
    channel = request.channel
    if request.test is None:
        refusal = consent_refusal(channel, request.profile, recorded)
        if refusal:
            return refusal
    if address is None:
        return f"no_address: {channel}"
    return line_break_refusal(channel, address)


def suppression_refusal(suppressed: str | None) -> str | None:
    """`suppressed: <reason>` when the address is suppressed (a bounce, a complaint, a STOP);
    this holds for a test send too: its address is asked like any other."""
    return None if suppressed is None else f"suppressed: {suppressed}"


@dataclass(frozen=True)
class CapRule:
    per_day: int | None = None
    per_window: int | None = None
    window: timedelta | None = None


def cap_refusal(
    rule: CapRule, sends: Sequence[datetime], now: datetime, tz: ZoneInfo
) -> str | None:
    """`frequency_capped: …` when one more send would break the day or the rolling window."""
    if rule.per_day is not None:
        today = now.astimezone(tz).date()
        count = sum(1 for s in sends if s.astimezone(tz).date() == today)
        if count >= rule.per_day:
            return f"frequency_capped: {count} today (limit {rule.per_day} per day)"
    if rule.per_window is not None and rule.window is not None:
        since = now - rule.window
        count = sum(1 for s in sends if s > since)
        if count >= rule.per_window:
            return f"frequency_capped: {count} in {rule.window} (limit {rule.per_window})"
    return None


def kept_sends(rule: CapRule, sends: Iterable[datetime], now: datetime) -> list[datetime]:
    """The sends a cap can still count (the longest of a window and two calendar days)."""
    horizon = max(rule.window or timedelta(0), timedelta(days=2))
    return sorted(s for s in sends if s > now - horizon)


@dataclass(frozen=True)
class RetryPlan:
    delay_class: str
    due_at: datetime


def plan_retry(
    message_id: str,
    attempt: int,
    max_attempts: int,
    delays: Mapping[str, float],
    now: datetime,
    retry_after: float | None = None,
) -> RetryPlan | None:
    """When and through which retry topic attempt `attempt + 1` goes; None when exhausted.

    The class delay grows with the attempt; a provider's `Retry-After` is a floor. Jitter is a
    stable fraction of the message id and attempt.
    """
    if attempt >= max_attempts:
        return None
    delay_class = RETRY_CLASSES[min(attempt, len(RETRY_CLASSES)) - 1]
    delay = delays[delay_class]
    if retry_after is not None and retry_after > delay:
        delay = retry_after
        delay_class = class_for_delay(retry_after, delays)
    jitter = 1 + JITTER * stable_fraction(message_id, attempt)
    return RetryPlan(delay_class, now + timedelta(seconds=delay * jitter))


def class_for_delay(seconds: float, delays: Mapping[str, float]) -> str:
    """The shortest retry class whose delay, with jitter, covers `seconds` (a hold, a
    `Retry-After`)."""
    return next(
        (c for c in RETRY_CLASSES if delays[c] * (1 + JITTER) >= seconds), RETRY_CLASSES[-1]
    )


def fallback_of(request: SendRequest) -> SendRequest | None:
    """The same message on the next channel of the priority list, with its own ledger id."""
    if not request.fallbacks:
        return None
    following, *rest = request.fallbacks
    return request.model_copy(
        update={
            "message_id": stable_id(request.message_id, "fallback", following.channel),
            "channel": following.channel,
            "template_id": following.template_id,
            "fallbacks": tuple(rest),
        }
    )


def falls_back(reason: str | None) -> bool:
    """Whether a skip says the contact cannot be reached on the channel."""
    return reason is not None and reason.startswith(UNREACHABLE)


def tries_next_channel(reason: str | None) -> bool:
    """Whether a skip moves the message on to the next channel of the priority list."""
    return falls_back(reason) or (reason is not None and reason.startswith(UNSENDABLE))


def line_break_refusal(channel: Channel, address: str) -> str | None:
    """`no_address: …` for an address holding a line break: in a header or a request it would
    smuggle in lines of its own, so the contact has no usable address on the channel."""
    if address.splitlines() == [address]:
        return None
    return f"no_address: {channel}: the address holds a line break"


class TokenBucket:
    """A provider's rate limit: `rate` sends per second with a one-second burst."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next_free = 0.0

    def reserve(self, now: float) -> float:
        """Take one slot; returns how long to wait before using it (0 when unlimited)."""
        if self.rate <= 0:
            return 0.0
        interval = 1.0 / self.rate
        start = max(now - 1.0 + interval, self._next_free)  # allow a burst of one second's worth
        self._next_free = start + interval
        return max(0.0, start - now)
