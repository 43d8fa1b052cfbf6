"""What a try's outcome comes to (pure): a retry, a hold while the channel is paused, or a final
state, and what follows a final state. The shell (`services/dispatcher/handlers.py`) carries the
plan out: it records the final state in the ledger, and only the caller whose record was the
first one does what follows (a replayed request changes nothing twice).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.dispatcher.domain.outcomes import Outcome
from services.dispatcher.domain.policy import CapRule, fallback_of, plan_retry, tries_next_channel
from shared.channels import FORGETS_DEAD_ADDRESS
from shared.contracts import SendRequest

# The ledger's final state for each outcome kind that ends a try for good.
_FINAL_STATES = {"recipient": "failed", "sent": "sent", "skipped": "skipped"}


@dataclass(frozen=True)
class ConcludePolicy:
    """The settings a conclusion reads."""

    attempts: int
    delays: Mapping[str, float]
    pause_seconds: float
    caps: Mapping[str, CapRule]


# --- what the shell does ------------------------------------------------------------------------


@dataclass(frozen=True)
class Wait:
    """The request waits on a retry topic until `due` for attempt `attempt` (a retry spends an
    attempt; a hold while the channel is paused does not)."""

    attempt: int
    due: datetime
    reason: str
    delay_class: str | None = None


@dataclass(frozen=True)
class PauseChannel:
    """A configuration error: no send on the channel until `until`."""

    until: datetime
    reason: str | None


@dataclass(frozen=True)
class DeadLetter:
    """Retries are exhausted: the request goes to the dead-letter topic with the reason."""

    reason: str


@dataclass(frozen=True)
class CountSend:
    """A marketing send the provider accepted counts against the channel's frequency cap."""

    rule: CapRule


@dataclass(frozen=True)
class WithdrawConsent:
    """The provider says the recipient opted out (an SMS STOP): record it and announce it."""


@dataclass(frozen=True)
class SuppressAddress:
    """The provider calls the address bad for good: no channel send goes to it again."""

    address: str


@dataclass(frozen=True)
class Announce:
    """The final state as a delivery event; `address` rides along when the segmenter takes a
    dead address off the profile (a push token)."""

    state: str
    outcome: Outcome
    address_invalid: bool = False
    address: str | None = None


@dataclass(frozen=True)
class FallBack:
    """The step's next channel gets its own send request."""

    request: SendRequest


Before = Wait | PauseChannel | DeadLetter
After = CountSend | WithdrawConsent | SuppressAddress | Announce | FallBack


@dataclass(frozen=True)
class Conclusion:
    """`before` happens whatever the ledger says; then, when `state` is set, the shell records
    it, and only the first to record it does `after`, in order."""

    before: tuple[Before, ...] = ()
    state: str | None = None
    outcome: Outcome | None = None
    after: tuple[After, ...] = ()


def conclude(
    request: SendRequest,
    outcome: Outcome,
    attempt: int,
    address: str | None,
    policy: ConcludePolicy,
    now: datetime,
) -> Conclusion:
    """What `outcome`, the result of try `attempt` of `request`, comes to. `address` is where
    the try went (None when it never reached a provider: a refusal before the call)."""
    before: list[Before] = []
    exhausted = False
    if outcome.kind == "retry" or (outcome.kind == "unknown" and request.transactional):
        plan = plan_retry(
            request.message_id, attempt, policy.attempts, policy.delays, now, outcome.retry_after
        )
        if plan is not None:
            wait = Wait(attempt + 1, plan.due_at, outcome.reason or "retry", plan.delay_class)
            return Conclusion(before=(wait,))
        reason = f"retries_exhausted after {attempt} attempts: {outcome.reason}"
        before.append(DeadLetter(reason))
        outcome = Outcome("recipient", reason, code=outcome.code)
        exhausted = True
    if outcome.kind == "config":
        hold = outcome.retry_after or policy.pause_seconds
        until = now + timedelta(seconds=hold)
        reason = outcome.reason or "configuration error"
        return Conclusion(
            before=(PauseChannel(until, outcome.reason), Wait(attempt, until, reason))
        )
    state = _FINAL_STATES.get(outcome.kind, "unknown")
    after: list[After] = []
    channel = request.channel
    rule = policy.caps.get(channel)
    if state == "sent" and not request.transactional and rule is not None:
        after.append(CountSend(rule))
    reported_address = None
    if state == "failed" and address is not None and not exhausted:
        if outcome.withdrew_consent:
            after.append(WithdrawConsent())
        elif outcome.address_invalid:
            after.append(SuppressAddress(address))
        if outcome.address_invalid and channel in FORGETS_DEAD_ADDRESS:
            reported_address = address
    invalid = state == "failed" and outcome.address_invalid and address is not None
    after.append(Announce(state, outcome, invalid, reported_address))
    reachable_elsewhere = (state == "failed" and not exhausted) or (
        state == "skipped" and tries_next_channel(outcome.reason)
    )
    following = fallback_of(request) if reachable_elsewhere else None
    if following is not None:
        after.append(FallBack(following))
    return Conclusion(tuple(before), state, outcome, tuple(after))
