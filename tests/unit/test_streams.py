"""The stream worker's tables and positions (shared/streams.py), without a broker: a table
addresses the partition in focus, reads its staged writes first, stores them in one write batch
with the changelog offset they reach; a position drops what its owner handled already."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from rocksdict import AccessType, Options, Rdict

from shared.kafka import Record
from shared.restore import OFFSET_KEY
from shared.streams import NotOwned, Positions, Table, focus


@pytest.fixture
def table(tmp_path: Path) -> Iterator[Table]:
    things = Table("things", "app-things-changelog", tmp_path)
    things.open(0)
    things.open(1)
    yield things
    focus(None)
    for partition in things.partitions:
        things.close(partition)


def test_writes_go_to_the_partition_in_focus_and_are_staged_until_applied(table: Table) -> None:
    focus(0)
    table[b"a"] = b"1"
    focus(1)
    table[b"b"] = b"2"
    assert b"a" not in table  # partition 1 has no `a`
    assert table[b"b"] == b"2"  # staged writes are read first
    assert sorted(table.staged()) == [(0, b"a", b"1"), (1, b"b", b"2")]
    assert list(table.rows()) == []  # nothing stored yet

    table.apply(0, through=7)
    table.apply(1, through=None)

    assert list(table.staged()) == []
    assert dict(table.rows()) == {b"a": b"1", b"b": b"2"}
    focus(None)
    assert table[b"a"] == b"1"  # outside a record, every held partition is looked in
    assert table.get(b"missing") is None


def test_the_applied_offset_is_kept_beside_the_rows_and_survives_a_reopen(
    table: Table, tmp_path: Path
) -> None:
    focus(0)
    table[b"a"] = b"1"
    table.apply(0, through=41)
    table.close(0)
    db = Rdict(
        str(table.path_of(0)), options=Options(raw_mode=True), access_type=AccessType.read_only()
    )
    try:
        assert db[OFFSET_KEY] == b"41"
        assert db[b"a"] == b"1"
    finally:
        db.close()
    table.open(0)
    assert table[b"a"] == b"1"
    assert dict(table.rows()) == {b"a": b"1"}  # the offset is not a row


def test_a_delete_is_staged_as_a_tombstone_and_applied(table: Table) -> None:
    focus(1)
    table[b"k"] = b"v"
    table.apply(1, through=0)
    del table[b"k"]
    assert b"k" not in table
    assert list(table.staged()) == [(1, b"k", None)]
    with pytest.raises(KeyError):
        del table[b"k"]
    assert table.pop(b"k", None) is None
    table.apply(1, through=1)
    assert list(table.rows()) == []


def test_a_partition_not_held_is_refused(table: Table) -> None:
    focus(5)
    with pytest.raises(NotOwned):
        table.get(b"a")
    with pytest.raises(NotOwned):
        table[b"a"] = b"1"
    focus(None)
    with pytest.raises(NotOwned, match="outside a record"):
        table[b"a"] = b"1"


def test_closing_a_partition_drops_its_staged_writes(table: Table) -> None:
    focus(0)
    table[b"a"] = b"1"
    table.close(0)
    assert list(table.staged()) == []
    assert table.partitions == frozenset({1})
    table.open(0)
    assert table.get(b"a") is None


def record(topic: str, partition: int, offset: int) -> Record:
    return Record(topic, partition, offset, "k", b"")


def test_positions_drop_records_below_the_next_offset_and_advance_past_handled_ones() -> None:
    positions = Positions()
    assert positions.fresh(record("t", 0, 0))  # nothing known: everything is fresh
    positions.start("t", 0, 10)
    positions.start("t", 1, -1001)  # no committed offset: from wherever the consumer starts
    assert not positions.fresh(record("t", 0, 9))
    assert positions.fresh(record("t", 0, 10))
    assert positions.fresh(record("t", 1, 0))

    moved = positions.handled([record("t", 0, 10), record("t", 0, 12), record("t", 1, 3)])

    assert moved == {("t", 0): 13, ("t", 1): 4}
    # Fetched again after a rebalance: already handled by this owner, dropped.
    assert not positions.fresh(record("t", 0, 12))
    assert positions.fresh(record("t", 0, 13))
    positions.forget("t", 0)
    assert positions.fresh(record("t", 0, 0))
