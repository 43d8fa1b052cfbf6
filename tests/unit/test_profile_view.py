"""The profile view's writes, without servers: one write per contact key, the batch's last word
on it: the profile, versioned by its record's offset, or a delete for a tombstone."""

from __future__ import annotations

from datetime import UTC, datetime

from pymongo import DeleteOne, InsertOne

from services.segmenter.adapters.profile_view import profile_writes
from shared.contracts import Profile
from shared.kafka import Record
from shared.profiles import STORED_OFFSET

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def profile(key: str, **traits: object) -> Profile:
    return Profile(
        contact_key=key,
        first_seen=T0,
        last_seen=T0,
        updated_at=T0,
        traits=dict(traits),
        recent_message_ids=["m-1", "m-2"],
    )


def record(offset: int, key: str | None, value: Profile | None) -> Record:
    return Record(
        topic="waypost.profiles.v1",
        partition=1,
        offset=offset,
        key=key,
        value=value.to_wire() if value is not None else b"",
    )


def documents(records: list[Record]) -> dict[str, dict[str, object] | None]:
    """Per key, the document written, or None for a delete."""
    out: dict[str, dict[str, object] | None] = {}
    for key, write in profile_writes(records):
        if isinstance(write, DeleteOne):
            assert write._filter == {"_id": key}
            out[key] = None
            continue
        assert isinstance(write, InsertOne)
        out[key] = write._doc
    return out


def test_each_contact_gets_its_last_profile_with_that_record_s_offset() -> None:
    written = documents(
        [
            record(10, "ann", profile("ann", plan="free")),
            record(11, "bob", profile("bob", plan="pro")),
            record(12, "ann", profile("ann", plan="pro", **{"a.b": 1})),
        ]
    )
    assert set(written) == {"ann", "bob"}
    ann, bob = written["ann"], written["bob"]
    assert ann is not None
    assert bob is not None
    assert ann["_id"] == "ann"
    assert ann[STORED_OFFSET] == 12
    assert ann["traits"] == {"plan": "pro", "a%2Eb": 1}
    assert "recent_message_ids" not in ann
    assert bob[STORED_OFFSET] == 11


def test_a_tombstone_deletes_the_document_and_a_later_profile_is_stored() -> None:
    written = documents(
        [
            record(20, "ann", profile("ann", email="ann@example.com")),
            record(21, "ann", None),
            record(22, "bob", None),
            record(23, "bob", profile("bob", plan="pro")),
        ]
    )
    assert written["ann"] is None
    bob = written["bob"]
    assert bob is not None
    assert (bob[STORED_OFFSET], bob["traits"]) == (23, {"plan": "pro"})


def test_records_without_a_key_or_undecodable_are_left_out() -> None:
    broken = Record(topic="waypost.profiles.v1", partition=0, offset=3, key="bad", value=b"{")
    written = documents([record(1, None, profile("x")), broken, record(4, "ok", profile("ok"))])
    assert set(written) == {"ok"}


def test_an_undecodable_last_record_leaves_the_one_before_it_standing() -> None:
    broken = Record(topic="waypost.profiles.v1", partition=1, offset=32, key="ann", value=b"{")
    written = documents(
        [
            record(30, "ann", profile("ann", plan="free")),
            record(31, "ann", profile("ann", plan="pro")),
            broken,
        ]
    )
    ann = written["ann"]
    assert ann is not None
    assert (ann[STORED_OFFSET], ann["traits"]) == (31, {"plan": "pro"})


def test_a_tombstone_then_an_undecodable_record_still_deletes() -> None:
    broken = Record(topic="waypost.profiles.v1", partition=1, offset=42, key="ann", value=b"{")
    written = documents([record(40, "ann", profile("ann")), record(41, "ann", None), broken])
    assert written == {"ann": None}
