"""Faults that are nobody's poison, on the real stack: upserts of one key racing on the real
document server."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo.errors import DuplicateKeyError

from services.dispatcher.adapters.store import CONSENT, Consent, Suppressions
from shared.docstore import connect
from shared.settings import CommonSettings
from tests.e2e.helpers import unique

pytestmark = pytest.mark.e2e
T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
RACERS = 16
ROUNDS = 5


async def test_upserts_of_one_key_racing_on_the_document_server_all_land(stack: Any) -> None:
    client = connect(CommonSettings(mongo_url=stack.mongo_url), "tests", max_connections=RACERS)
    db = client[unique("races").replace("-", "_")]
    try:
        # The race itself: plain upserts of one new key, all at once. Some lose it.
        lost = 0

        async def plain(key: str, n: int) -> None:
            nonlocal lost
            try:
                await db[CONSENT].replace_one({"_id": key}, {"n": n}, upsert=True)
            except DuplicateKeyError:
                lost += 1

        for round_ in range(ROUNDS):
            await asyncio.gather(*(plain(f"plain-{round_}", n) for n in range(RACERS)))
        assert lost > 0, "no upsert lost the race: this server cannot show the fault"

        # The same race through the dispatcher's stores: every write lands, none raises.
        consent, suppressions = Consent(db), Suppressions(db)
        words = {T0 + timedelta(seconds=n): n % 2 == 0 for n in range(RACERS)}
        for round_ in range(ROUNDS):
            contact = f"racer-{round_}"
            await asyncio.gather(
                *(consent.record(contact, "email", given, at) for at, given in words.items()),
                *(
                    suppressions.add("email", f"{contact}@example.com", f"smtp 550 #{n}", T0)
                    for n in range(RACERS)
                ),
            )
            kept = await consent.get(contact, "email")
            assert kept is not None
            assert words[kept.at] == kept.given
            reason = await suppressions.reason("email", f"{contact}@example.com")
            assert reason is not None
            assert reason.startswith("smtp 550 #")
    finally:
        await client.drop_database(db.name)
        await client.close()
