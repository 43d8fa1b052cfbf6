"""Where a send request goes next from its ledger entry (`services.dispatcher.domain.progress`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.dispatcher.domain import progress
from services.dispatcher.domain.outcomes import FINAL_STATES, Outcome
from services.dispatcher.domain.progress import (
    NOT_RESENT,
    Attempt,
    AwaitCall,
    Conclude,
    Done,
    Entry,
    Marked,
    Reconcile,
    Requeue,
)

T0 = datetime(2026, 12, 3, 12, tzinfo=UTC)
T1 = datetime(2026, 12, 3, 12, 5, tzinfo=UTC)
MARKETING = {"transactional": False, "reconcilable": False}
TRANSACTIONAL = {"transactional": True, "reconcilable": False}


def test_a_new_request_is_tried_once_as_its_first_try() -> None:
    assert progress.after_claim(True, None, **MARKETING) == Attempt(1, "first")


def test_a_replayed_request_whose_retry_waits_writes_the_retry_record_again() -> None:
    entry = Entry("retrying", 2, due_at=T1, reason="throttled")
    assert progress.after_claim(False, entry, **MARKETING) == Requeue(2, T1, "throttled")
    bare = Entry("retrying", 3)
    assert progress.after_claim(False, bare, **MARKETING) == Requeue(3, None, "retry")


@pytest.mark.parametrize("state", sorted(FINAL_STATES))
@pytest.mark.parametrize("facts", [MARKETING, TRANSACTIONAL])
def test_a_replay_of_a_concluded_request_does_nothing(state: str, facts: dict[str, bool]) -> None:
    move = progress.after_claim(False, Entry(state, 1), **facts)
    assert move == Done(f"already {state}")


@pytest.mark.parametrize("state", ["requested"])
def test_a_request_claimed_but_never_tried_is_tried_now(state: str) -> None:
    assert progress.after_claim(False, Entry(state, 1), **MARKETING) == Attempt(1, "first")


def test_a_marketing_try_stopped_in_its_provider_call_ends_unknown_never_resent() -> None:
    move = progress.after_claim(False, Entry("sending", 2, sending_at=T0), **MARKETING)
    assert move == Conclude(Outcome("unknown", NOT_RESENT), 2)


def test_a_transactional_try_stopped_in_its_provider_call_is_tried_again() -> None:
    move = progress.after_claim(False, Entry("sending", 2, sending_at=T0), **TRANSACTIONAL)
    assert move == Attempt(3, "resumed")


@pytest.mark.parametrize("transactional", [False, True])
def test_a_stopped_try_at_a_provider_that_can_be_asked_is_reconciled(transactional: bool) -> None:
    entry = Entry("sending", 1, sending_at=T0)
    move = progress.after_claim(False, entry, transactional=transactional, reconcilable=True)
    assert move == Reconcile(1, T0, resend=transactional)


def test_a_stopped_try_is_reconciled_by_the_marker_it_was_left_with() -> None:
    """The marker names the try whose call receipt can tell what came of it."""
    entry = Entry("sending", 1, sending_at=T0, try_id="1:first")
    move = progress.after_claim(False, entry, **{**MARKETING, "reconcilable": True})
    assert move == Reconcile(1, T0, resend=False, try_id="1:first")


@pytest.mark.parametrize("facts", [MARKETING, TRANSACTIONAL, {**MARKETING, "reconcilable": True}])
def test_a_try_sending_whose_call_this_worker_made_concludes_with_the_calls_answer(
    facts: dict[str, bool],
) -> None:
    """Its batch failed after the call (a fenced producer): the worker read the request again,
    and awaits the call's answer rather than taking the try for stopped, asking the provider or
    sending again."""
    entry = Entry("sending", 2, sending_at=T0)
    assert progress.after_claim(False, entry, **facts, called=2) == AwaitCall(2)


def test_a_retry_record_never_awaits_the_call_again() -> None:
    """It was written once the call's answer was used (an SMS asked about again, say):
    awaiting that answer again would start the asking over, for ever."""
    entry = Entry("sending", 2, sending_at=T0)
    facts = {**MARKETING, "reconcilable": True}
    assert progress.on_retry(entry, 2, T1, **facts) == Reconcile(2, T0, resend=False)


def test_a_call_of_another_attempt_or_an_entry_not_sending_is_not_awaited() -> None:
    sending = Entry("sending", 2, sending_at=T0)
    assert progress.after_claim(False, sending, **MARKETING, called=1) == Conclude(
        Outcome("unknown", NOT_RESENT), 2
    )
    assert progress.after_claim(False, Entry("sent", 2), **MARKETING, called=2) == Done(
        "already sent"
    )
    assert progress.after_claim(False, Entry("requested", 2), **MARKETING, called=2) == Attempt(
        2, "first"
    )


FACTS = [MARKETING, TRANSACTIONAL, {**MARKETING, "reconcilable": True}]


@pytest.mark.parametrize("facts", FACTS)
def test_a_try_marked_in_a_failed_round_and_never_called_is_made_not_taken_for_stopped(
    facts: dict[str, bool],
) -> None:
    """The round that marked it `sending` failed to commit (a broker outage), so this worker
    never called; the commit landed after all. Read again, the try is made under a new name:
    no `unknown` for a message that never left, no second attempt, no question to the
    provider."""
    entry = Entry("sending", 1, sending_at=T0, try_id="1:first")
    parked = Marked("1:first", T0)
    assert progress.after_claim(False, entry, **facts, parked=parked) == Attempt(1, "first+")
    due = T1.isoformat()
    retried = Entry("sending", 2, sending_at=T1, try_id=f"2:{due}")
    move = progress.on_retry(retried, 2, T1, **facts, parked=Marked(f"2:{due}", T1))
    assert move == Attempt(2, f"{due}+")
    # Parked again, the try made again is made once more, under yet another name.
    again = Entry("sending", 1, sending_at=T1, try_id="1:first+")
    move = progress.after_claim(False, again, **facts, parked=Marked("1:first+", T1))
    assert move == Attempt(1, "first++")


@pytest.mark.parametrize("facts", FACTS)
@pytest.mark.parametrize(
    "entry",
    [
        # Another worker took the partition and marked a try of its own.
        Entry("sending", 1, sending_at=T0, try_id="1:resumed"),
        # ... or the same first try, at its own time: it may have called.
        Entry("sending", 1, sending_at=T1, try_id="1:first"),
    ],
)
def test_a_marker_that_is_not_the_parked_one_is_taken_for_stopped_as_ever(
    facts: dict[str, bool], entry: Entry
) -> None:
    """What this worker parked says nothing of a marker it did not write: the try is stopped
    during a call, for all it can tell (unknown, asked about, or a new attempt)."""
    parked = progress.after_claim(False, entry, **facts, parked=Marked("1:first", T0))
    assert parked == progress.after_claim(False, entry, **facts)
    assert not isinstance(parked, Attempt) or parked.attempt == 2  # transactional: a new one
    concluded = Entry("sent", 1)
    assert progress.after_claim(False, concluded, **facts, parked=Marked("1:first", T0)) == Done(
        "already sent"
    )


def test_a_try_this_worker_called_is_awaited_even_when_a_later_round_parked_it() -> None:
    entry = Entry("sending", 1, sending_at=T0, try_id="1:first")
    move = progress.after_claim(False, entry, **MARKETING, called=1, parked=Marked("1:first", T0))
    assert move == AwaitCall(1)


def test_an_entry_read_back_names_the_try_that_marked_it() -> None:
    read = Entry.of({"state": "sending", "attempt": 2, "try": "2:first", "sending_at": T0})
    assert read == Entry("sending", 2, sending_at=T0, try_id="2:first")
    assert Entry.of({"state": "requested"}).try_id is None


def test_a_due_retry_tries_again_named_by_its_due_time() -> None:
    entry = Entry("retrying", 2, due_at=T1)
    move = progress.on_retry(entry, 2, T1, **MARKETING)
    assert move == Attempt(2, T1.isoformat())


@pytest.mark.parametrize("entry", [None, Entry("retrying", 3)])
def test_a_stale_retry_copy_does_nothing(entry: Entry | None) -> None:
    move = progress.on_retry(entry, 2, T1, **MARKETING)
    assert isinstance(move, Done)


def test_a_retry_that_meets_its_try_stopped_in_the_call_follows_the_delivery_rule() -> None:
    entry = Entry("sending", 2, sending_at=T0)
    assert progress.on_retry(entry, 2, T1, **MARKETING) == Conclude(
        Outcome("unknown", NOT_RESENT), 2
    )
    assert progress.on_retry(entry, 2, T1, **TRANSACTIONAL) == Attempt(3, "resumed")


@pytest.mark.parametrize("state", ["requested", "retrying"])
def test_a_lost_marker_whose_holder_died_before_sending_counts_as_stopped_in_the_call(
    state: str,
) -> None:
    entry = Entry(state, 1)
    assert progress.after_lost_begin(entry, 1, **MARKETING) == Conclude(
        Outcome("unknown", NOT_RESENT), 1
    )
    assert progress.after_lost_begin(entry, 1, **TRANSACTIONAL) == Attempt(2, "resumed")
    reconcilable = {"transactional": False, "reconcilable": True}
    # No time of its own: the asking starts from when the request was made.
    assert progress.after_lost_begin(entry, 1, **reconcilable) == Reconcile(1, None, False)


@pytest.mark.parametrize(
    "entry", [None, Entry("sending", 1, sending_at=T0), Entry("sent", 1), Entry("requested", 2)]
)
def test_a_lost_marker_held_by_a_live_copy_or_another_attempt_does_nothing(
    entry: Entry | None,
) -> None:
    assert isinstance(progress.after_lost_begin(entry, 1, **TRANSACTIONAL), Done)


def test_an_entry_is_read_from_the_ledger_document() -> None:
    document = {
        "state": "retrying",
        "attempt": 2,
        "due_at": T1,
        "reason": "throttled",
        "sending_at": T0,
        "contact_key": "c1",
    }
    assert Entry.of(document) == Entry("retrying", 2, T1, "throttled", T0)
    assert Entry.of({"state": "requested"}) == Entry("requested", 1)


# --- a provider listing that could not be had -------------------------------------------------


def test_an_unlisted_try_is_asked_about_again_later_then_left_unknown() -> None:
    delays = (30.0, 120.0)
    first = progress.after_unlisted(2, 0, T0, delays)
    assert first == progress.AskAgain(2, T0 + timedelta(seconds=30), 1)
    assert first is not None
    second = progress.after_unlisted(2, first.tries, T1, delays)
    assert second == progress.AskAgain(2, T1 + timedelta(seconds=120), 2)
    assert progress.after_unlisted(2, 2, T1, delays) is None  # asked enough: it stays unknown
    assert progress.after_unlisted(1, 0, T0, ()) is None  # asking again switched off


def test_a_due_ask_again_record_reconciles_the_try_still_sending() -> None:
    """The record that asks again is a retry record of the same attempt: the entry, still
    `sending`, goes to reconciling; nothing is sent for it."""
    entry = Entry("sending", 2, sending_at=T0)
    reconcilable = {"transactional": False, "reconcilable": True}
    move = progress.on_retry(entry, 2, T1, **reconcilable)
    assert move == Reconcile(2, T0, resend=False)
    concluded = Entry("sent", 2)
    assert isinstance(progress.on_retry(concluded, 2, T1, **reconcilable), Done)
