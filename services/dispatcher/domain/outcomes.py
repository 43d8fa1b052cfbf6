"""Delivery outcomes and the ledger's state machine (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LedgerState = Literal["requested", "sending", "sent", "failed", "skipped", "unknown"]
FINAL_STATES: frozenset[str] = frozenset({"sent", "failed", "skipped", "unknown"})

OutcomeKind = Literal["sent", "failed", "skipped", "retry"]

EVENT_NAMES: dict[str, str] = {
    "sent": "Message Sent",
    "failed": "Message Failed",
    "skipped": "Message Skipped",
    "unknown": "Message Unknown",
}


@dataclass(frozen=True)
class Outcome:
    """What one provider call (or the decision not to call) came to."""

    kind: OutcomeKind
    reason: str | None = None
    provider_id: str | None = None


def resume_action(state: str, transactional: bool) -> Literal["done", "send", "unknown"]:
    """What to do with a request whose ledger entry already exists (a replay).

    `sending` means a worker died during the provider call: it may have arrived. Marketing
    messages are not resent (a duplicate is worse than a miss); transactional ones are.
    """
    if state in FINAL_STATES:
        return "done"
    if state == "sending" and not transactional:
        return "unknown"
    return "send"
