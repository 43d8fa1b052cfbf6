"""Where a send request goes next, from what its ledger entry says (pure).

The shell (`services.dispatcher.handlers`) asks at each stimulus that finds a ledger entry — a
request claimed or found again (a replay), a retry record that fell due, a try whose marker
another copy of the request took first — and carries out the move it gets back. What a provider
call comes to is decided by `domain.conclude`.

A marketing message is delivered at most once and a transactional one at least once: a try
that stopped during its provider call (the entry left `sending`) is concluded `unknown`
(marketing) or tried again (transactional), unless what came of it can be found out
(`Reconcile`: the call's receipt, or the provider asked), in which case a try shown sent is
concluded `sent`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from services.dispatcher.domain.outcomes import Outcome, resume_action

# Why a try that stopped during its provider call ends unknown.
STOPPED = "a worker stopped during the provider call"
NOT_RESENT = f"{STOPPED}; not resent (marketing)"


@dataclass(frozen=True)
class Entry:
    """What the decisions read of a ledger entry."""

    state: str
    attempt: int
    due_at: datetime | None = None
    reason: str | None = None
    sending_at: datetime | None = None
    try_id: str | None = None  # the try that marked it `sending` ("attempt:name")

    @classmethod
    def of(cls, entry: Mapping[str, Any]) -> Entry:
        """From an entry as the ledger reads it back (times as datetimes)."""
        due, sending = entry.get("due_at"), entry.get("sending_at")
        return cls(
            state=str(entry["state"]),
            attempt=int(entry.get("attempt", 1)),
            due_at=due if isinstance(due, datetime) else None,
            reason=str(entry["reason"]) if entry.get("reason") else None,
            sending_at=sending if isinstance(sending, datetime) else None,
            try_id=str(entry["try"]) if entry.get("try") else None,
        )


@dataclass(frozen=True)
class Marked:
    """A try this worker marked `sending` (its marker id and the time it wrote with it) and
    never called: its intent, a proof of ownership or its batch failed first. Both must match
    the entry: the marker id alone is the same on every worker (each worker's first try of
    attempt 1 is "1:first"), so another worker that took the partition meanwhile may have
    marked, and called, the same id."""

    try_id: str
    at: datetime


@dataclass(frozen=True)
class Attempt:
    """A try at the provider. `try_name` names it (the first, a retry record's due time, a
    resumption), so that copies of the same try meet at the same ledger marker."""

    attempt: int
    try_name: str


@dataclass(frozen=True)
class Requeue:
    """Write the retry record again: it may not have been written before a crash. The ledger's
    attempt number lets only one copy through. `due` None: at once."""

    attempt: int
    due: datetime | None
    reason: str


@dataclass(frozen=True)
class Reconcile:
    """Find out what came of a try that stopped during its call (marked `try_id` at `began`;
    None: unknown, or when requested): its call receipt first, then the provider, where it can
    be asked. A receipt or a provider showing it sent: conclude that. Otherwise, `resend`
    (transactional): a new try, else conclude what the asking found (`retry` when proven
    absent, else unknown)."""

    attempt: int
    began: datetime | None
    resend: bool
    try_id: str | None = None


@dataclass(frozen=True)
class AwaitCall:
    """This worker made the provider call of the try that stands `sending` (its batch failed
    before the call's outcome was committed: a fenced producer, say, and the worker started
    over): conclude with the call's own answer, awaited while it is under way, rather than take
    the try for stopped."""

    attempt: int


@dataclass(frozen=True)
class Conclude:
    outcome: Outcome
    attempt: int


@dataclass(frozen=True)
class Done:
    """Nothing to do (a final entry, a stale copy of a retry, a try another copy holds)."""

    why: str


Move = Attempt | Requeue | Reconcile | AwaitCall | Conclude | Done


@dataclass(frozen=True)
class AskAgain:
    """The provider's listing could not be had: ask it again at `due`, the `tries`-th time,
    with the entry left `sending` (nothing is sent meanwhile)."""

    attempt: int
    due: datetime
    tries: int


def after_unlisted(
    attempt: int, tries: int, now: datetime, delays: Sequence[float]
) -> AskAgain | None:
    """A marketing try without an answer whose provider listing could not be had, asked
    `tries` times so far: when to ask again, or None (asked enough: it stays unknown)."""
    if tries >= len(delays):
        return None
    return AskAgain(attempt, now + timedelta(seconds=delays[tries]), tries + 1)


def when_told(attempt: int, tries: int, due: datetime) -> AskAgain:
    """A try without an answer whose provider was asked before it could tell (an events log
    shows a message some time after it took it): ask it again at `due`, when it can."""
    return AskAgain(attempt, due, tries + 1)


def after_claim(
    new: bool,
    entry: Entry | None,
    *,
    transactional: bool,
    reconcilable: bool,
    called: int | None = None,
    parked: Marked | None = None,
) -> Move:
    """A request arrived: `new` when the claim recorded its entry, else the entry it found.
    `called`: the attempt whose provider call this worker made lately, if any. `parked`: the
    try this worker marked `sending` and never called (`resume`)."""
    if new or entry is None:
        return Attempt(1, "first")
    if entry.state == "retrying":
        return Requeue(entry.attempt, entry.due_at, entry.reason or "retry")
    return resume(
        entry,
        transactional=transactional,
        reconcilable=reconcilable,
        called=called,
        parked=parked,
    )


def on_retry(
    entry: Entry | None,
    attempt: int,
    due_at: datetime,
    *,
    transactional: bool,
    reconcilable: bool,
    parked: Marked | None = None,
) -> Move:
    """A retry record for `attempt` fell due. It was written once the try's call had been
    answered (or asked about), so a call this worker made is never awaited again here; a try
    it marked and never called (`parked`) is made (`resume`)."""
    if entry is None or entry.attempt != attempt:
        return Done("a stale copy: another attempt owns the message now")
    return resume(
        entry,
        transactional=transactional,
        reconcilable=reconcilable,
        try_name=due_at.isoformat(),
        parked=parked,
    )


def resume(
    entry: Entry,
    *,
    transactional: bool,
    reconcilable: bool,
    try_name: str = "first",
    called: int | None = None,
    parked: Marked | None = None,
) -> Move:
    """Go on from where an entry stands (after a crash, a replay or a retry record). `called`:
    the attempt whose provider call this worker made lately (its answer is at hand).

    `parked`: a try this worker marked `sending` whose intent failed (or a proof of ownership,
    or its batch), so it never made the call; the mark may be found all the same (an intent
    the broker wrote after the worker gave up on it). Found `sending` by that very marker (its
    id and time), it never reached the provider: it is made, under a new name (the marker
    holds the old one), not taken for stopped."""
    if entry.state in ("requested", "retrying"):
        return Attempt(entry.attempt, try_name)
    if entry.state == "sending" and called == entry.attempt:
        return AwaitCall(entry.attempt)
    if (
        entry.state == "sending"
        and parked is not None
        and (parked.try_id, parked.at) == (entry.try_id, entry.sending_at)
    ):
        return Attempt(entry.attempt, again(parked.try_id))
    action = resume_action(entry.state, transactional)
    if entry.state == "sending" and reconcilable:
        return Reconcile(entry.attempt, entry.sending_at, action == "send", entry.try_id)
    if action == "unknown":
        return Conclude(Outcome("unknown", NOT_RESENT), entry.attempt)
    if action == "send":  # transactional: a new attempt, the last one may have arrived
        return Attempt(entry.attempt + 1, "resumed")
    return Done(f"already {entry.state}")


def again(try_id: str) -> str:
    """The name of a try made again after `try_id` ("attempt:name") never reached the
    provider: distinct from it, so that the ledger's marker lets it through."""
    _attempt, _, name = try_id.partition(":")
    return f"{name or try_id}+"


def after_lost_begin(
    entry: Entry | None, attempt: int, *, transactional: bool, reconcilable: bool
) -> Move:
    """Another copy took this try's marker first. If the entry never reached `sending`, that
    copy died between its marker and its entry update: finish as if it died in the call."""
    if entry is None or entry.attempt != attempt:
        return Done("another attempt owns the message now")
    if entry.state not in ("requested", "retrying"):
        return Done("the copy that holds the try goes on with it")
    stopped = Entry("sending", entry.attempt, sending_at=None)
    return resume(stopped, transactional=transactional, reconcilable=reconcilable)
