"""The stream worker (shared/streams.py) on the real broker, with worker processes of
`tests/e2e/stream_worker.py` counting records per key in a table.

- A worker that takes over on an empty data folder restores the table from its changelog,
  deletions included, before it handles a record: the counts go on exactly.
- Two workers share the partitions; one is SIGKILLed mid-stream: its partitions move to the
  survivor, every record is counted, and no count is off by a record lost or counted twice.
- Transactional workers: one is stopped (SIGSTOP) holding a batch it has not checkpointed,
  past its session; the other takes every partition over and handles the batch. Resumed, the
  first one's checkpoint is refused (fenced), so it never performs the batch's side effect:
  every record's effect happens exactly once, and the outputs a reader sees, exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from shared.kafka import ensure_topics
from shared.topics import Topic
from tests.conftest import ROOT
from tests.e2e.helpers import unique, wait_for

pytestmark = pytest.mark.e2e

KEYS = [f"k{n:02d}" for n in range(24)]


class Worker:
    """One worker process with its own data folder and log."""

    def __init__(
        self,
        stack: Any,
        app_id: str,
        topics: tuple[str, str],
        folder: Path,
        extra: dict[str, str] | None = None,
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / "worker.log"
        env = {
            **os.environ,
            "WAYPOST_KAFKA_BOOTSTRAP": stack.bootstrap,
            "WAYPOST_TOPIC_PARTITIONS": str(stack.partitions),
            "WAYPOST_DATA_DIR": str(folder / "data"),
            "WAYPOST_LOG_LEVEL": "info",
            **(extra or {}),
        }
        argv = [sys.executable, "-m", "tests.e2e.stream_worker", app_id, *topics]
        with self.log.open("wb") as output:
            self.process = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT
            )

    def lines(self, event: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if f'"{event}"' in line:
                found.append(json.loads(line))
        return found

    def stop(self, signum: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


class Outputs:
    """Reads the workers' output topic from the start, in a thread."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.counted: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": unique("reader"),
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        self._consumer.subscribe([topic])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for message in self._consumer.consume(500, 0.2):
                if message.error() is None:
                    with self._lock:
                        self.counted.append(json.loads(message.value()))

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.counted)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._consumer.close()


@pytest.fixture
def topics(stack: Any) -> Iterator[tuple[str, str, Outputs]]:
    tag = unique("streams")
    source, output = f"test.{tag}.in", f"test.{tag}.out"
    ensure_topics(
        stack.bootstrap, stack.partitions, topics=[Topic(source, "input"), Topic(output, "output")]
    )
    outputs = Outputs(stack.bootstrap, output)
    yield source, output, outputs
    outputs.close()


def produce(bootstrap: str, topic: str, records: list[tuple[str, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for key, value in records:
        producer.produce(topic, key=key.encode(), value=value)
        producer.poll(0)
    assert producer.flush(30) == 0


def counted(outputs: Outputs, expected: int) -> list[dict[str, Any]]:
    """Wait until every one of `expected` records was counted at least once."""

    def done() -> list[dict[str, Any]] | None:
        seen = outputs.snapshot()
        return seen if len({(o["key"], o["offset"]) for o in seen}) >= expected else None

    return wait_for(done, timeout=180, what=f"{expected} records counted")


def test_a_worker_on_an_empty_folder_restores_the_table_before_it_counts_on(
    stack: Any, topics: tuple[str, str, Outputs], tmp_path: Path
) -> None:
    source, output, outputs = topics
    app_id = unique("test-streams")
    # Five records per key, then `forget` for a third of the keys.
    first = [(key, b"x") for _round in range(5) for key in KEYS]
    forgotten = KEYS[::3]
    produce(stack.bootstrap, source, first + [(key, b"forget") for key in forgotten])
    one = Worker(stack, app_id, (source, output), tmp_path / "one")
    try:
        counted(outputs, len(first))
        # Every record of the first worker was handled once it has committed past them all.
        wait_for(lambda: committed_all(stack, app_id, source), timeout=60, what="commits")
    finally:
        one.stop()
    assert one.process.returncode == 0

    produce(stack.bootstrap, source, [(key, b"x") for key in KEYS])
    two = Worker(stack, app_id, (source, output), tmp_path / "two")  # an empty data folder
    try:
        seen = counted(outputs, len(first) + len(KEYS))
    finally:
        two.stop()
    last = {o["key"]: o["count"] for o in sorted(seen, key=lambda o: o["offset"])}
    assert last == {key: 1 if key in forgotten else 6 for key in KEYS}
    (restored,) = two.lines("stream.tables_restored")
    assert restored["complete"] is True
    assert restored["records"] > 0


def committed_all(stack: Any, group: str, topic: str) -> bool:
    consumer = Consumer({"bootstrap.servers": stack.bootstrap, "group.id": group})
    try:
        parts = [TopicPartition(topic, p) for p in range(stack.partitions)]
        committed = consumer.committed(parts, timeout=10)
        return all(
            tp.offset == consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in committed
        )
    finally:
        consumer.close()


def test_two_workers_lose_one_to_sigkill_and_every_record_is_counted_once(
    stack: Any, topics: tuple[str, str, Outputs], tmp_path: Path
) -> None:
    source, output, outputs = topics
    app_id = unique("test-streams")
    one = Worker(stack, app_id, (source, output), tmp_path / "one")
    two = Worker(stack, app_id, (source, output), tmp_path / "two")
    rounds = 150
    total = rounds * len(KEYS)
    try:
        wait_for(
            lambda: one.lines("stream.assigned") and two.lines("stream.assigned"),
            timeout=60,
            what="both workers assigned",
        )
        half = [(key, b"x") for _round in range(rounds // 2) for key in KEYS]
        produce(stack.bootstrap, source, half)
        # The kill lands while the workers have the backlog in hand; the second half arrives
        # while the killed worker's partitions wait for the survivor.
        wait_for(lambda: len(outputs.snapshot()) > total // 8, timeout=120, what="an eighth")
        one.stop(signal.SIGKILL)
        produce(stack.bootstrap, source, half)
        seen = counted(outputs, total)
        wait_for(
            lambda: two.lines("stream.assigned")[-1]["partitions"] == list(range(stack.partitions)),
            timeout=60,
            what="the survivor holds every partition",
        )
    finally:
        one.stop()
        two.stop()
    # Every count from 1 to the number of records, per key: nothing lost, nothing counted twice.
    by_key: dict[str, set[int]] = {}
    for o in seen:
        by_key.setdefault(o["key"], set()).add(o["count"])
    assert by_key == {key: set(range(1, rounds + 1)) for key in KEYS}
    # A record repeated after the kill (its batch's outputs were acknowledged, its row not
    # stored) carries the count it had the first time.
    assert len({(o["key"], o["offset"], o["count"]) for o in seen}) == total


def test_a_worker_cut_off_past_its_session_is_fenced_before_its_side_effects(
    stack: Any, topics: tuple[str, str, Outputs], tmp_path: Path
) -> None:
    source, output, outputs = topics
    app_id = unique("fenced")
    effects, hold = tmp_path / "effects.txt", tmp_path / "hold"
    env = {
        "WAYPOST_TEST_TRANSACTIONAL": "1",
        "WAYPOST_TEST_EFFECTS": str(effects),
        "WAYPOST_TEST_HOLD": str(hold),
    }
    first = [(key, b"x") for _round in range(4) for key in KEYS]
    produce(stack.bootstrap, source, first)
    hold.touch()
    one = Worker(stack, app_id, (source, output), tmp_path / "one", env)
    two: Worker | None = None
    try:
        wait_for(lambda: one.lines("stream_test.holding"), timeout=120, what="a batch held")
        one.process.send_signal(signal.SIGSTOP)
        hold.unlink()  # resumed, it goes straight on to its checkpoint
        two = Worker(stack, app_id, (source, output), tmp_path / "two", env)
        wait_for(
            lambda: len(done(effects)) >= len(first), timeout=180, what="the first records' effects"
        )
        one.process.send_signal(signal.SIGCONT)
        wait_for(lambda: one.lines("stream.fenced"), timeout=120, what="the resumed worker fenced")
        second = [(key, b"x") for _round in range(2) for key in KEYS]
        produce(stack.bootstrap, source, second)
        total = len(first) + len(second)
        wait_for(lambda: len(done(effects)) >= total, timeout=180, what="every record's effect")
        seen = counted(outputs, total)
    finally:
        one.process.send_signal(signal.SIGCONT)
        one.stop()
        if two is not None:
            two.stop()
    lines = effects.read_text().splitlines()
    assert len(lines) == len(set(lines)) == total  # no effect twice, none missing
    # A reader (read_committed) sees each record's output once: the fenced batch's were aborted.
    assert len(seen) == len({(o["key"], o["offset"]) for o in seen}) == total
    by_key: dict[str, list[int]] = {}
    for o in seen:
        by_key.setdefault(o["key"], []).append(o["count"])
    assert {key: sorted(c) for key, c in by_key.items()} == {
        key: [1, 2, 3, 4, 5, 6] for key in KEYS
    }


def done(effects: Path) -> set[str]:
    return set(effects.read_text().splitlines()) if effects.exists() else set()
