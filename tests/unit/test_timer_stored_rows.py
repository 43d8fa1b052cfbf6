"""The timer index is rebuilt from a worker table's stored rows, undecoded: the rows of the
partitions the worker holds, never the offset it keeps beside them."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.orchestrator.adapters.timers import TimerStore, stored_rows, timer_key, timer_value
from shared.streams import Table, focus


@pytest.fixture
def table(tmp_path: Path) -> Table:
    timers = Table("timers", "timers-changelog", tmp_path)
    for partition in range(3):
        timers.open(partition)
        focus(partition)
        for n in range(50):
            timers[timer_key(f"c{partition}-{n}", f"{n:032x}")] = timer_value(
                1_700_000_000_000 + n, f"t{n}"
            )
        timers.apply(partition, through=149)
    focus(None)
    timers.close(1)  # the worker holds partitions 0 and 2
    return timers


def test_stored_rows_are_the_owned_partitions_rows(table: Table) -> None:
    rows = dict(stored_rows(table))
    assert len(rows) == 100
    assert all(key.startswith((b"c0-", b"c2-")) for key in rows)
    assert rows == {key: table[key] for key in rows}


def test_the_index_is_rebuilt_from_the_owned_partitions(table: Table) -> None:
    store = TimerStore(table)
    assert store.rebuild() == 100
    assert store.indexed == 100


def test_a_plain_mapping_is_read_through_items() -> None:
    rows = {b"c\x00i": timer_value(1, "t")}
    assert dict(stored_rows(rows)) == rows
