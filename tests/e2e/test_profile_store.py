"""The profile view on the real document server: a batch written late (its member was paused
while its partitions moved on) puts no older profile over a newer one; a tombstone deletes the
document."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from services.admin.adapters.segments import Contacts
from services.admin.domain.segments import contact_view
from services.segmenter.adapters.profile_view import COLLECTION, profile_view, profile_writes
from shared.contracts import Profile
from shared.docstore import connect
from shared.kafka import Record
from shared.profiles import STORED_OFFSET
from shared.settings import CommonSettings
from tests.e2e.helpers import unique

pytestmark = pytest.mark.e2e
T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def record(offset: int, key: str, plan: str | None) -> Record:
    """The profiles topic's record at `offset`: a profile on plan `plan`, or (None) a
    tombstone."""
    if plan is None:
        return Record("waypost.profiles.v1", 0, offset, key, b"")
    profile = Profile(
        contact_key=key,
        first_seen=T0,
        last_seen=T0,
        updated_at=T0,
        traits={"plan": plan, "email": f"{key}@example.com"},
        segments=["buyers"],
    )
    return Record("waypost.profiles.v1", 0, offset, key, profile.to_wire())


async def test_a_late_batch_puts_no_older_profile_over_a_newer_one(
    stack: Any,
) -> None:
    settings = CommonSettings(mongo_url=stack.mongo_url)
    client = connect(settings, "tests")
    db = client[unique("profiles").replace("-", "_")]
    view = profile_view(settings, db)
    kept, forgotten, old = unique("kept"), unique("forgotten"), unique("old")
    try:
        # A document an older version stored, without an offset: any record replaces it.
        await db[COLLECTION].insert_one({"_id": old, "traits": {"plan": "legacy"}})
        await view._create_indexes()
        await view._write(profile_writes([record(0, old, "new")]))
        stored = await db[COLLECTION].find_one({"_id": old})
        assert stored is not None
        assert (stored["traits"]["plan"], stored[STORED_OFFSET]) == ("new", 0)

        # The partition's new owner writes offsets 5 to 8; the paused member then writes 3 and 7.
        await view._write(
            profile_writes(
                [record(5, kept, "pro"), record(6, forgotten, "pro"), record(8, forgotten, None)]
            )
        )
        await view._write(profile_writes([record(3, kept, "free"), record(7, old, "late")]))
        stored = await db[COLLECTION].find_one({"_id": kept})
        assert stored is not None
        assert (stored["traits"]["plan"], stored[STORED_OFFSET]) == ("pro", 5)
        assert await db[COLLECTION].find_one({"_id": forgotten}) is None
        # What the late batch held newer than the store is written.
        stored = await db[COLLECTION].find_one({"_id": old})
        assert stored is not None
        assert (stored["traits"]["plan"], stored[STORED_OFFSET]) == ("late", 7)
        # The same batch again (a restart reads it again) changes nothing, and the admin reads
        # the profile without the view's bookkeeping.
        await view._write(profile_writes([record(5, kept, "pro")]))
        document = await Contacts(db).get(kept)
        assert document is not None
        shown = contact_view(document)
        assert shown["contact_key"] == kept
        assert STORED_OFFSET not in shown
        assert shown["traits"]["plan"] == "pro"
    finally:
        await client.drop_database(db.name)
        await client.close()
