"""The dispatcher's table-backed ledger, caps and consent (`adapters/tables.py`), on real RocksDB
databases of a table (no broker: the staged writes are read back as the worker would)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.dispatcher.adapters.ledger_view import ledger_changelog, ledger_writes
from services.dispatcher.adapters.tables import (
    FORGOTTEN_REASON,
    Caps,
    Consent,
    ForgottenContacts,
    Ledger,
)
from shared.contracts import Profile, SendRequest
from shared.kafka import Record
from shared.streams import Table, focus
from shared.topics import DISPATCHER_LEDGER_CHANGELOG

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)


@pytest.fixture
def table(tmp_path: Path) -> Iterator[Table]:
    table = Table("ledger", "ledger-changelog", tmp_path)
    table.open(0)
    focus(0)
    yield table
    focus(None)
    table.close(0)


def request(message_id: str = "m1", contact: str = "c1") -> SendRequest:
    return SendRequest(
        message_id=message_id,
        contact_key=contact,
        channel="email",
        template_id="t1",
        journey_id="j1",
        journey_version=1,
        instance_id="i1",
        step_id="s1",
        profile=Profile(contact_key=contact, first_seen=T0, last_seen=T0, updated_at=T0),
        requested_at=T0,
    )


class Gate:
    def __init__(self) -> None:
        self.passed = 0

    async def __call__(self, *_: object) -> None:
        self.passed += 1


async def test_a_claim_is_new_once_and_then_reports_the_state(table: Table) -> None:
    ledger = Ledger(table, Gate())
    first = await ledger.claim(request(), T0)
    again = await ledger.claim(request(), T0 + timedelta(seconds=1))
    assert (first.new, first.state) == (True, "requested")
    assert (again.new, again.state, again.attempt) == (False, "requested", 1)


async def test_a_try_begins_through_the_gate_once(table: Table) -> None:
    gate = Gate()
    ledger = Ledger(table, gate)
    await ledger.claim(request(), T0)

    assert await ledger.begin("m1", "1:first", 1, T0)
    assert not await ledger.begin("m1", "1:first", 1, T0)  # a replay of the same try
    entry = await ledger.get("m1")

    assert gate.passed == 1
    assert entry is not None
    assert entry["state"] == "sending"
    assert entry["sending_at"] == T0


async def test_an_outcome_is_recorded_once_and_reports_move_forward_only(table: Table) -> None:
    ledger = Ledger(table, Gate())
    await ledger.claim(request(), T0)
    await ledger.begin("m1", "1:first", 1, T0)

    assert await ledger.conclude("m1", "sent", T0, provider_id="p1", reason=None)
    assert not await ledger.conclude("m1", "unknown", T0)  # a second copy changes nothing
    assert await ledger.track("m1", "opened", T0 + timedelta(minutes=1))
    assert not await ledger.track("m1", "delivered", T0 + timedelta(minutes=2))
    entry = await ledger.get("m1")

    assert entry is not None
    assert entry["state"] == "opened"
    assert entry["provider_id"] == "p1"
    assert [step["state"] for step in entry["history"]] == [
        "requested",
        "sending",
        "sent",
        "opened",
    ]


async def test_a_retry_keeps_its_due_time_and_reason(table: Table) -> None:
    ledger = Ledger(table, Gate())
    await ledger.claim(request(), T0)
    due = T0 + timedelta(seconds=5)
    await ledger.retrying("m1", 2, due, "smtp 451", T0)
    entry = await ledger.get("m1")
    assert entry is not None
    assert (entry["state"], entry["attempt"], entry["due_at"], entry["reason"]) == (
        "retrying",
        2,
        due,
        "smtp 451",
    )


async def test_forgetting_a_contact_keeps_the_ids_but_not_the_key(table: Table) -> None:
    ledger = Ledger(table, Gate())
    await ledger.claim(request("m1", "c1"), T0)
    await ledger.claim(request("m2", "c2"), T0)

    await ledger.forget("c1")
    forgotten, other = await ledger.get("m1"), await ledger.get("m2")

    assert forgotten is not None
    assert forgotten["contact_key"] == "forgotten"
    assert "history" not in forgotten
    assert other is not None
    assert other["contact_key"] == "c2"
    assert not (await ledger.claim(request("m1", "c1"), T0)).new  # a replay stays a no-op


@pytest.mark.parametrize("contact", ["zoë@example.com", "c\x7f1", "李雷"])
async def test_forgetting_finds_a_key_outside_ascii_however_its_entry_was_written(
    table: Table, contact: str
) -> None:
    """Entries written now hold the key's characters as they are; entries written before the
    encoder changed hold non-ASCII characters escaped (`\\u00eb`). Forgetting finds both."""
    ledger = Ledger(table, Gate())
    await ledger.claim(request("m1", contact), T0)
    older = json.loads(table.get(b"m1") or b"{}")
    table[b"m2"] = json.dumps({**older, "requested_at": T0.isoformat()}).encode()

    await ledger.forget(contact)

    for message_id in ("m1", "m2"):
        entry = await ledger.get(message_id)
        assert entry is not None
        assert entry["contact_key"] == "forgotten", message_id


async def test_a_forgotten_entry_keeps_no_provider_text_or_history(table: Table) -> None:
    ledger = Ledger(table, Gate())
    await ledger.claim(request("m1", "ann@example.com"), T0)
    await ledger.begin("m1", "1:first", 1, T0)
    bounce = "smtp 550: <ann@example.com> unknown"
    await ledger.conclude("m1", "failed", T0, reason=bounce, code="550", provider_id="<p1>")
    before = await ledger.get("m1")
    assert before is not None

    await ledger.forget("ann@example.com")
    entry = await ledger.get("m1")
    raw = table.get(b"m1")

    assert entry is not None
    assert raw is not None
    assert b"ann@example.com" not in raw
    assert {k: entry[k] for k in ("state", "attempt", "channel", "journey_id", "step_id")} == {
        "state": "failed",
        "attempt": 1,
        "channel": "email",
        "journey_id": "j1",
        "step_id": "s1",
    }
    assert entry["failed_at"] == T0
    assert not {"reason", "code", "provider_id", "history"} & set(entry)
    assert entry["rev"] == before["rev"] + 1  # the view replaces its document


async def test_a_request_of_a_forgotten_contact_ends_skipped_without_its_key(
    table: Table,
) -> None:
    ledger = Ledger(table, Gate())
    late = T0 + timedelta(minutes=1)

    assert await ledger.skip_forgotten(request("m1", "ann@example.com"), late)
    assert not await ledger.skip_forgotten(request("m1", "ann@example.com"), late)  # a replay
    entry = await ledger.get("m1")
    raw = table.get(b"m1")

    assert entry is not None
    assert raw is not None
    assert b"ann@example.com" not in raw
    assert (entry["state"], entry["reason"], entry["contact_key"]) == (
        "skipped",
        FORGOTTEN_REASON,
        "forgotten",
    )
    assert entry["skipped_at"] == late
    assert not (await ledger.claim(request("m1", "ann@example.com"), late)).new


async def test_a_waiting_retry_of_a_forgotten_contact_ends_skipped(table: Table) -> None:
    ledger = Ledger(table, Gate())
    await ledger.claim(request("m1", "c1"), T0)
    await ledger.retrying("m1", 2, T0 + timedelta(seconds=5), "smtp 451", T0)
    await ledger.forget("c1")

    assert await ledger.skip_forgotten(request("m1", "c1"), T0 + timedelta(seconds=5))
    entry = await ledger.get("m1")

    assert entry is not None
    assert (entry["state"], entry["attempt"], entry["reason"]) == ("skipped", 2, FORGOTTEN_REASON)


async def test_forgotten_contacts_are_kept_by_a_keyed_hash(table: Table) -> None:
    forgotten = ForgottenContacts(table, b"s" * 32)
    await forgotten.record("ann@example.com", T0)

    assert await forgotten.includes("ann@example.com")
    assert not await forgotten.includes("bob@example.com")
    assert not await ForgottenContacts(table, b"t" * 32).includes("ann@example.com")
    assert all(b"ann" not in key + value for _p, key, value in table.staged() if value)


async def test_caps_count_sends_and_forget_them(table: Table) -> None:
    caps = Caps(table)
    await caps.count("c1", "email", T0, sorted)
    await caps.count("c1", "email", T0 + timedelta(hours=1), lambda sends: sends[-1:])
    assert await caps.sends("c1", "email") == [T0 + timedelta(hours=1)]
    await caps.forget("c1")
    assert await caps.sends("c1", "email") == []


async def test_consent_keeps_the_newest_word(table: Table) -> None:
    consent = Consent(table)
    await consent.record("c1", "email", False, T0 + timedelta(seconds=5))
    await consent.record("c1", "email", True, T0)  # older, late: changes nothing
    word = await consent.get("c1", "email")
    assert word is not None
    assert (word.given, word.at) == (False, T0 + timedelta(seconds=5))
    await consent.forget("c1")
    assert await consent.get("c1", "email") is None


async def test_the_view_stores_the_last_entry_of_each_message_with_dates(table: Table) -> None:
    ledger = Ledger(table, Gate())
    await ledger.claim(request(), T0)
    staged = {key: value for _p, key, value in table.staged()}
    records = [
        Record("ledger-changelog", 0, 0, "m1", staged[b"m1"]),
        Record("ledger-changelog", 0, 1, "m2", b""),
    ]
    writes = ledger_writes(records)
    kinds = [(key, type(write).__name__) for key, write in writes]
    assert kinds == [("m1", "InsertOne"), ("m2", "DeleteOne")]
    stored = writes[0][1]._doc  # type: ignore[union-attr]
    assert stored["_id"] == "m1"
    assert stored["rev"] == 1
    assert stored["requested_at"] == T0
    assert stored["history"][0]["at"] == T0


def test_the_view_follows_the_changelog_the_pipeline_checks_name() -> None:
    assert ledger_changelog("waypost-dispatcher") == DISPATCHER_LEDGER_CHANGELOG
