"""The timer index is rebuilt from a Faust RocksDB table's stored rows, undecoded: the same rows,
over the same partitions, as the table's own `items()`."""

from __future__ import annotations

from pathlib import Path

import faust
import pytest
from faust.types import TP
from rocksdict import WriteBatch

from services.orchestrator.adapters.timers import TimerStore, stored_rows, timer_key, timer_value


@pytest.fixture
def table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> faust.Table:
    app = faust.App(
        "timers-rows",
        broker="kafka://127.0.0.1:1",  # never contacted
        store="rocksdb://",
        datadir=str(tmp_path),
        web_enabled=False,
        autodiscover=False,
    )
    timers = app.Table("timers", partitions=3, key_type=bytes, value_type=bytes)
    store = timers.data
    for partition in range(3):
        batch = WriteBatch(raw_mode=True)
        for n in range(50):
            key = timer_key(f"c{partition}-{n}", f"{n:032x}")
            batch.put(key, timer_value(1_700_000_000_000 + n, f"t{n}"))
        batch.put(store.offset_key, b"149")  # what Faust keeps beside the rows
        store._db_for_partition(partition).write(batch)
    # The worker owns partitions 0 and 2 (Faust asks its assignor which are active).
    owned = {TP(timers.changelog_topic_name, p) for p in (0, 2)}
    monkeypatch.setattr(app.assignor, "assigned_actives", lambda: owned)
    return timers


def test_stored_rows_are_the_tables_items(table: faust.Table) -> None:
    rows = dict(stored_rows(table))
    assert rows == dict(table.items())
    assert len(rows) == 100
    assert all(key.startswith((b"c0-", b"c2-")) for key in rows)


def test_the_index_is_rebuilt_from_the_owned_partitions(table: faust.Table) -> None:
    store = TimerStore(table)
    assert store.rebuild() == 100
    assert store.indexed == 100


def test_a_plain_mapping_is_read_through_items() -> None:
    rows = {b"c\x00i": timer_value(1, "t")}
    assert dict(stored_rows(rows)) == rows
