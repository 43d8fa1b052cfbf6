"""Faults that are nobody's poison, on the real stack: templates that fail for one contact (each
such send is skipped and the next channel of the step is tried; nothing is dead-lettered or left
`sending`)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services.dispatcher.adapters.ledger_view import COLLECTION as MESSAGES
from services.dispatcher.adapters.ledger_view import ledger_view, ledger_writes
from shared.docstore import connect, connect_blocking
from shared.kafka import Record
from shared.settings import CommonSettings
from shared.topics import DEAD_LETTER
from tests.e2e.helpers import outbox, post, publish_inline, read_topic, unique, wait_for

pytestmark = pytest.mark.e2e
T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
RACERS = 16
ROUNDS = 5


def test_a_template_that_fails_for_a_contact_skips_its_channel_and_the_next_one_sends(
    stack: Any, tmp_path: Path
) -> None:
    tag = unique("faults")
    trigger = f"Enter {tag}"
    publish_inline(
        stack,
        tmp_path,
        tag,
        {"type": "event", "event": trigger},
        [
            {
                "id": "announce",
                "type": "send",
                "channels": [
                    {"channel": "email", "template": f"{tag}-email"},
                    {"channel": "sms", "template": f"{tag}-sms"},
                ],
            },
            {"id": "done", "type": "exit"},
        ],
        {
            f"{tag}-email": {
                "channel": "email",
                "subject": "Your points",
                "text": "{{ 100 // contact.orders }} points {{ '*' * contact.stars }}",
            },
            f"{tag}-sms": {"channel": "sms", "text": "Acme: your points are waiting."},
        },
    )
    contacts = {
        # contact: (traits, what the email's skip reason names)
        "zero": (
            {"orders": 0, "stars": 1},
            f"template_error: {tag}-email: text: ZeroDivisionError",
        ),
        "type": ({"orders": "many", "stars": 1}, f"template_error: {tag}-email: text: TypeError"),
        "huge": ({"orders": 1, "stars": 10**9}, f"template_error: {tag}-email: text: Overflow"),
        # An address with a line break is none: the orchestrator picks the SMS at once.
        "crlf": ({"orders": 1, "stars": 1}, None),
    }
    users = {name: unique(name) for name in contacts}
    phones = {name: f"+4850020{n:04d}" for n, name in enumerate(contacts)}
    for name, (traits, _) in contacts.items():
        email = f"{users[name]}@ex.com"
        if name == "crlf":
            email += "\r\nBcc: someone-else@ex.com"
        answer = post(
            stack,
            "identify",
            {"userId": users[name], "traits": {**traits, "email": email, "phone": phones[name]}},
        )
        assert answer.status_code == 200, answer.text
    for user in users.values():
        assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200

    client = connect_blocking(CommonSettings(mongo_url=stack.mongo_url), "tests")
    try:
        ledger = client["waypost"][MESSAGES]
        for name, (_, reason) in contacts.items():
            texts = wait_for(
                lambda name=name: outbox(stack, channel="sms", to=phones[name]), what=name
            )
            assert len(texts) == 1

            def concluded(name: str = name) -> dict[str, Any] | None:
                entries = {e["channel"]: e for e in ledger.find({"contact_key": users[name]})}
                sms = entries.get("sms", {})
                return entries if sms.get("state") in ("sent", "delivered") else None

            entries = wait_for(concluded, what=f"{name}'s SMS in the ledger")
            if reason is None:
                assert "email" not in entries
                continue
            assert entries["email"]["state"] == "skipped"
            assert entries["email"]["reason"].startswith(reason)
        assert outbox(stack, channel="email", to=f"{users['zero']}@ex.com") == []
    finally:
        client.close()
    letters = [key for key, _ in read_topic(stack.bootstrap, DEAD_LETTER.name)]
    assert not set(letters) & set(users.values())


async def test_the_ledger_view_never_takes_an_older_entry_over_a_newer_one(stack: Any) -> None:
    """A view consumer that writes a batch late (its process was paused while its partitions
    moved on) leaves the newer document as it is, on the real document server."""
    client = connect(CommonSettings(mongo_url=stack.mongo_url), "tests")
    db = client[unique("view").replace("-", "_")]
    view = ledger_view(CommonSettings(mongo_url=stack.mongo_url), db, "waypost-dispatcher")
    key = unique("m")

    def record(rev: int, state: str) -> Record:
        entry = {"state": state, "rev": rev, "contact_key": "c1", f"{state}_at": T0.isoformat()}
        return Record("ledger", 0, rev, key, json.dumps(entry).encode())

    try:
        # A document an older version stored, without a revision: the view's start numbers it.
        await db[MESSAGES].insert_one({"_id": key, "state": "requested", "contact_key": "c1"})
        await view._create_indexes()
        await view._write(ledger_writes([record(1, "requested")]))
        await view._write(ledger_writes([record(3, "sent")]))
        await view._write(ledger_writes([record(2, "sending")]))  # late, from a paused worker
        stored = await db[MESSAGES].find_one({"_id": key})
        assert stored is not None
        assert (stored["state"], stored["rev"]) == ("sent", 3)
        await view._write(ledger_writes([record(4, "delivered")]))
        stored = await db[MESSAGES].find_one({"_id": key})
        assert stored is not None
        assert (stored["state"], stored["rev"]) == ("delivered", 4)
        # A view that never stored the message (another member, a restart) tries it as new
        # first: the store refuses the insert, and the older revision still goes nowhere.
        other = ledger_view(CommonSettings(mongo_url=stack.mongo_url), db, "waypost-dispatcher")
        await other._write(ledger_writes([record(2, "sending")]))
        stored = await db[MESSAGES].find_one({"_id": key})
        assert stored is not None
        assert (stored["state"], stored["rev"]) == ("delivered", 4)
        # ... and a newer one replaces it.
        fresh = ledger_view(CommonSettings(mongo_url=stack.mongo_url), db, "waypost-dispatcher")
        await fresh._write(ledger_writes([record(5, "opened")]))
        stored = await db[MESSAGES].find_one({"_id": key})
        assert stored is not None
        assert (stored["state"], stored["rev"]) == ("opened", 5)
    finally:
        await client.drop_database(db.name)
        await client.close()


async def test_a_message_the_view_holds_already_does_not_keep_the_others_from_it(
    stack: Any,
) -> None:
    """A view that reads records again (after a restart) meets messages it stored before among
    messages it has not: the store refuses those as duplicates. On the local document server an
    `update` command ends at its first refusal, so the statements after it must be sent again:
    every message of the batch ends at its newest revision, on the real document server."""
    client = connect(CommonSettings(mongo_url=stack.mongo_url), "tests")
    db = client[unique("again").replace("-", "_")]
    view = ledger_view(CommonSettings(mongo_url=stack.mongo_url), db, "waypost-dispatcher")

    def batch(keys: list[str], rev: int, state: str) -> list[Record]:
        entry = {"state": state, "rev": rev, "contact_key": "c1", f"{state}_at": T0.isoformat()}
        return [Record("ledger", 0, rev, key, json.dumps(entry).encode()) for key in keys]

    try:
        await view._create_indexes()
        keys = [unique("m") for _ in range(40)]
        stored_before = keys[::7]  # one early in every command of the batch, and more
        await view._write(ledger_writes(batch(stored_before, 3, "sent")))
        await view._write(ledger_writes(batch(keys, 2, "sending")))
        await view._write(ledger_writes(batch(keys, 3, "sent")))
        stored = {
            doc["_id"]: doc["rev"]
            async for doc in db[MESSAGES].find({"_id": {"$in": keys}}, {"rev": 1})
        }
        behind = sorted(k for k in keys if stored.get(k) != 3)
        assert not behind, f"{len(behind)} of {len(keys)} left behind, e.g. {behind[:3]}"
    finally:
        await client.drop_database(db.name)
        await client.close()
