"""A dispatcher upsert that lost a race for its `_id` runs again; it is never poison. (Caps and
consent live in the worker's tables now, where one contact's writes cannot race.)"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pymongo.errors import DuplicateKeyError

from services.dispatcher.adapters.store import (
    RACE_ATTEMPTS,
    Suppressions,
    lost_race,
)
from shared.deadletter import is_outage

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)


class RacingCollection:
    """A collection by `_id` whose next `races` upserts find the key taken by a writer that
    inserted between their read and their write (the document that writer left is `winner`)."""

    def __init__(self, races: int = 1, winner: dict[str, Any] | None = None) -> None:
        self.docs: dict[str, dict[str, Any]] = {}
        self.races = races
        self.winner = winner or {}
        self.upserts = 0

    async def find_one(self, flt: dict[str, Any]) -> dict[str, Any] | None:
        doc = self.docs.get(flt["_id"])
        return dict(doc) if doc is not None else None

    async def replace_one(self, flt: dict[str, Any], doc: dict[str, Any], upsert: bool) -> None:
        assert upsert
        self.upserts += 1
        key = flt["_id"]
        if self.races > 0:
            self.races -= 1
            self.docs[key] = {"_id": key, **self.winner}
            raise DuplicateKeyError(f"E11000 duplicate key: {key}", 11000, {"code": 11000})
        self.docs[key] = {"_id": key, **doc}


class OneCollection:
    def __init__(self, collection: RacingCollection) -> None:
        self.collection = collection

    def __getitem__(self, name: str) -> RacingCollection:
        return self.collection


def store(cls: Any, collection: RacingCollection) -> Any:
    return cls(OneCollection(collection))


async def test_a_suppression_that_lost_its_insert_is_written() -> None:
    suppressions = RacingCollection(races=1, winner={"channel": "email", "reason": "bounce"})

    await store(Suppressions, suppressions).add("email", "a@example.com", "smtp 550", T0)

    assert suppressions.docs["email:a@example.com"]["reason"] == "smtp 550"


async def test_a_race_lost_every_time_leaves_as_an_outage_not_as_poison() -> None:
    taken = RacingCollection(races=RACE_ATTEMPTS, winner={"channel": "email", "reason": "bounce"})

    with pytest.raises(DuplicateKeyError) as raised:
        await store(Suppressions, taken).add("email", "a@example.com", "smtp 550", T0)

    assert taken.upserts == RACE_ATTEMPTS
    assert is_outage(raised.value)


def test_a_lost_race_is_the_same_error_labelled_retryable() -> None:
    exc = DuplicateKeyError("E11000 duplicate key", 11000, {"code": 11000, "errmsg": "dup"})

    raced = lost_race(exc)

    assert not is_outage(exc)
    assert is_outage(raced)
    assert raced.code == 11000
    assert str(raced).startswith("dup")
