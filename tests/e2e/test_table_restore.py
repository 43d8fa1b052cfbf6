"""The bulk restore of a worker's tables (shared/restore.py) against the real broker: a restored
table holds exactly the changelog's last values, tombstones included, and Faust goes on from the
offset the restore stored instead of reading the changelog again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from rocksdict import AccessType, Options, Rdict

from shared.faust_app import build_faust_app, restore_tables, table_changelogs
from shared.kafka import ensure_topics
from shared.restore import OFFSET_KEY
from shared.settings import CommonSettings
from shared.topics import Topic
from tests.conftest import ROOT
from tests.e2e.helpers import unique, wait_for

pytestmark = pytest.mark.e2e

Rows = dict[bytes, bytes]


class Changelog:
    """Writes a table's changelog the way Faust does (key, value or tombstone, on the key's
    partition) and keeps the last value of every key per partition."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.topic = topic
        self.partitions = partitions
        self.expected: dict[int, Rows] = {p: {} for p in range(partitions)}
        self.written = 0
        self._producer = Producer(
            {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"}
        )

    def write(self, records: list[tuple[bytes, bytes | None]]) -> None:
        for key, value in records:
            partition = sum(key) % self.partitions
            self._producer.produce(self.topic, key=key, value=value, partition=partition)
            if value is None:
                self.expected[partition].pop(key, None)
            else:
                self.expected[partition][key] = value
        assert self._producer.flush(30) == 0
        self.written += len(records)

    def all_rows(self) -> Rows:
        return {k: v for rows in self.expected.values() for k, v in rows.items()}


def history(round_: int, keys: int = 300) -> list[tuple[bytes, bytes | None]]:
    """Writes, overwrites and deletes: every third key deleted, every ninth written again."""
    records: list[tuple[bytes, bytes | None]] = []
    for n in range(keys):
        key = f"contact-{n:04d}".encode()
        records.append((key, f"r{round_}-v1-{n}".encode()))
        records.append((key, f"r{round_}-v2-{n}".encode()))
        if n % 3 == 0:
            records.append((key, None))
        if n % 9 == 0:
            records.append((key, f"r{round_}-back-{n}".encode()))
    return records


def ends(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("watermarks")})
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(partitions)
        }
    finally:
        consumer.close()


def partition_rows(path: Path) -> tuple[Rows, bytes | None]:
    """A partition database's rows and Faust's offset, read without taking its lock."""
    db = Rdict(str(path), options=Options(raw_mode=True), access_type=AccessType.read_only())
    try:
        rows = {bytes(k): bytes(v) for k, v in db.items() if k != OFFSET_KEY}
        return rows, db.get(OFFSET_KEY)
    finally:
        db.close()


@pytest.fixture
def worker_app(stack: Any, tmp_path: Path) -> tuple[str, CommonSettings, Path]:
    app_id = unique("restore-test")
    settings = CommonSettings(
        kafka_bootstrap=stack.bootstrap, topic_partitions=stack.partitions, log_level="info"
    )
    ensure_topics(
        stack.bootstrap,
        stack.partitions,
        topics=[Topic(f"{app_id}-source", "the test worker's idle source")],
    )
    return app_id, settings, tmp_path / "data"


def run_until_recovered(
    stack: Any, app_id: str, data_dir: Path, out: Path, *, bulk_restore: bool
) -> dict[str, Any]:
    """Start the test worker, wait for what it wrote once Faust had recovered, stop it."""
    env = {
        **os.environ,
        "WAYPOST_KAFKA_BOOTSTRAP": stack.bootstrap,
        "WAYPOST_TOPIC_PARTITIONS": str(stack.partitions),
        "PYTHONPATH": str(ROOT),
    }
    argv = [sys.executable, "-m", "tests.e2e.table_worker", app_id, str(data_dir), str(out)]
    if not bulk_restore:
        argv.append("--no-restore")
    out.unlink(missing_ok=True)
    log = out.with_suffix(".log")
    with log.open("ab") as output:
        worker = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for(
            lambda: out.exists() or worker.poll() is not None,
            timeout=120,
            what="the test worker's recovery",
        )
        assert out.exists(), f"the worker exited:\n{log.read_text()[-3000:]}"
        result: dict[str, Any] = json.loads(out.read_text())
        result["log"] = log.read_text()
        return result
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def test_a_restored_table_is_the_changelogs_last_values_and_faust_goes_on_from_it(
    stack: Any, worker_app: tuple[str, CommonSettings, Path], tmp_path: Path
) -> None:
    app_id, settings, data_dir = worker_app
    app = build_faust_app(app_id, settings, data_dir=data_dir)
    table = app.Table(
        "things", partitions=settings.topic_partitions, key_type=bytes, value_type=bytes
    )
    [changelog_topic] = table_changelogs(app)
    ensure_topics(stack.bootstrap, stack.partitions, topics=[changelog_topic])
    changelog = Changelog(stack.bootstrap, changelog_topic.name, stack.partitions)

    # A cold start: the whole changelog into empty databases.
    changelog.write(history(1))
    restore_tables(app, settings)
    end = ends(stack.bootstrap, changelog.topic, stack.partitions)
    for partition in range(stack.partitions):
        rows, offset = partition_rows(table.data.partition_path(partition))
        assert rows == changelog.expected[partition], partition
        assert offset == str(end[partition] - 1).encode()

    # Faust, without the bulk restore, reads only what came after the restored offset.
    changelog.write(history(2, keys=120))
    tail = changelog.written - sum(end.values())
    out = tmp_path / "recovered.json"
    faust_only = run_until_recovered(stack, app_id, data_dir, out, bulk_restore=False)
    assert faust_only["applied"] == tail
    assert {bytes.fromhex(k): bytes.fromhex(v) for k, v in faust_only["rows"].items()} == (
        changelog.all_rows()
    )

    # With the bulk restore (as the services run), Faust has nothing left to read.
    changelog.write(history(3, keys=60))
    restored = run_until_recovered(stack, app_id, data_dir, out, bulk_restore=True)
    assert restored["applied"] == 0
    assert {bytes.fromhex(k): bytes.fromhex(v) for k, v in restored["rows"].items()} == (
        changelog.all_rows()
    )
    [line] = [
        json.loads(raw)
        for raw in restored["log"].splitlines()
        if raw.startswith("{") and '"worker.tables_restored"' in raw
    ][-1:]
    assert line["records"] == len(history(3, keys=60))
    assert line["complete"] is True
