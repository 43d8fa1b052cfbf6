"""Delivery outcomes and the ledger's state machine (pure).

Every provider call ends in one outcome class (see docs/delivery.md): sent, retry, permanent for
the recipient, permanent for the configuration, or unknown (it may have arrived).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shared.system_events import MESSAGE_FAILED, MESSAGE_SENT, MESSAGE_SKIPPED, MESSAGE_UNKNOWN

# States after which a replayed request must not reach the provider again.
FINAL_STATES: frozenset[str] = frozenset(
    {"sent", "failed", "skipped", "unknown", "delivered", "opened", "clicked"}
)

# Why a provider's answer without the message proves nothing yet, whichever channel asked: it
# was had before the provider could show the message (an `unknown` asked about again later).
ASKED_TOO_SOON = "not reconciled: asked too soon after the try to rule it out"

OutcomeKind = Literal["sent", "retry", "recipient", "config", "unknown", "skipped"]

EVENT_NAMES: dict[str, str] = {
    "sent": MESSAGE_SENT,
    "failed": MESSAGE_FAILED,
    "skipped": MESSAGE_SKIPPED,
    "unknown": MESSAGE_UNKNOWN,
}


@dataclass(frozen=True)
class Outcome:
    """What one provider call (or the decision not to call) came to.

    `retry_after` (seconds) is the provider's wish for `retry`, or how long to hold the channel
    for `config` (a daily quota that resets). `address_invalid` asks to remove the address or
    token from the profile; `withdrew_consent` means the recipient opted out at the provider
    (an SMS STOP), so the channel's consent flips.
    """

    kind: OutcomeKind
    reason: str | None = None
    provider_id: str | None = None
    code: str | None = None
    retry_after: float | None = None
    address_invalid: bool = False
    withdrew_consent: bool = False


@dataclass(frozen=True)
class Receipt:
    """A call's outcome as its receipt wrote it down, with the email route (`email_route`) it
    was sent by, when it says (an email's, written since receipts carry it)."""

    outcome: Outcome
    route: str | None = None


def resume_action(state: str, transactional: bool) -> Literal["done", "send", "unknown"]:
    """What to do with a request whose ledger entry already exists (a replay).

    `sending` means a worker died during the provider call: it may have arrived. Marketing
    messages are not resent (a duplicate is worse than a miss); transactional ones are.
    `retrying` belongs to the retry topics, so a replay of the original request is done.
    """
    if state in FINAL_STATES or state == "retrying":
        return "done"
    if state == "sending" and not transactional:
        return "unknown"
    return "send"
