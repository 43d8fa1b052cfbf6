"""What the stack looked like when an end-to-end test failed: which processes are alive, where
each consumer group stands (state, members, lag), the last warnings each service logged, and
where each stream service's threads stood (py-spy, when it may attach).

Attached to every failed end-to-end test's report (tests/conftest.py), so a failure on a machine
whose logs are gone still says which stage stopped and why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from services.segmenter.adapters.profile_view import GROUP_ID as PROFILE_VIEW_GROUP
from shared.topics import PROFILES, READERS

SERVICES = ("ingest", "segmenter", "orchestrator", "dispatcher", "admin")
SERVERS = ("kafka", "ferretdb")
# The services whose threads are dumped: a stage that stops is a loop waiting somewhere.
STREAM_SERVICES = ("segmenter", "orchestrator", "dispatcher")
DUMP_SECONDS = 20.0
# Groups beyond the stream services' readers.
EXTRA_GROUPS = {
    "waypost-admin-journey-log": ("waypost.journey-log.v1",),
    PROFILE_VIEW_GROUP: (PROFILES.name,),
}
LOG_TAIL_BYTES = 400_000
LINES_PER_SERVICE = 8
LINE_CHARS = 300
RECONNECTING = ("Connection refused", "Disconnected (after", "brokers are down")


def _alive(stack: Any, name: str) -> bool:
    return bool(stack.pid(name))


def _groups() -> dict[str, tuple[str, ...]]:
    groups = {group: topics for readers in READERS.values() for group, topics in readers}
    groups.update(EXTRA_GROUPS)
    return groups


def group_lines(bootstrap: str) -> list[str]:
    """One line per consumer group: its state, members, assigned partitions and lag."""
    groups = _groups()
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    lines = []
    try:
        described = {
            group: future.result(timeout=10)
            for group, future in admin.describe_consumer_groups(list(groups)).items()
        }
    except KafkaException as exc:
        return [f"groups not described: {exc}"]
    for group, topics in groups.items():
        info = described.get(group)
        state = str(info.state).rsplit(".", 1)[-1] if info else "?"
        members = len(info.members) if info else 0
        assigned = (
            sum(len(m.assignment.topic_partitions) for m in info.members if m.assignment)
            if info
            else 0
        )
        lines.append(
            f"{group}: {state}, {members} members, {assigned} partitions assigned, "
            f"lag {_lag(bootstrap, group, topics)}"
        )
    return lines


def _lag(bootstrap: str, group: str, topics: tuple[str, ...]) -> str:
    """Records not yet committed by `group`, per topic that has any."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}
    )
    try:
        metadata = consumer.list_topics(timeout=10).topics
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            if topic in metadata
            for p in metadata[topic].partitions
        ]
        committed = consumer.committed(partitions, timeout=10)
        behind: dict[str, int] = {}
        for tp in committed:
            _low, high = consumer.get_watermark_offsets(tp, timeout=10)
            offset = tp.offset if tp.offset >= 0 else 0
            if high > offset:
                behind[tp.topic] = behind.get(tp.topic, 0) + high - offset
        return ", ".join(f"{t}={n}" for t, n in sorted(behind.items())) or "0"
    except KafkaException as exc:
        return f"unknown ({exc})"
    finally:
        consumer.close()


def log_lines(path: Path) -> list[str]:
    """The last warnings and errors in one service's log (and any line that is not JSON:
    librdkafka and the interpreter write those)."""
    try:
        with path.open("rb") as log:
            log.seek(max(0, os.path.getsize(path) - LOG_TAIL_BYTES))
            text = log.read().decode(errors="replace")
    except OSError as exc:
        return [f"no log: {exc}"]
    kept: deque[str] = deque(maxlen=LINES_PER_SERVICE)
    for line in text.splitlines()[1:]:
        try:
            entry = json.loads(line)
            notable = isinstance(entry, dict) and entry.get("level") in (
                "warning",
                "error",
                "critical",
            )
        except ValueError:
            # librdkafka's own lines; its reconnection attempts say nothing the state doesn't
            notable = bool(line.strip()) and not any(noise in line for noise in RECONNECTING)
        if notable:
            kept.append(line[:LINE_CHARS])
    return list(kept)


def thread_dump(pid: int) -> list[str]:
    """Where each thread of one process stands (py-spy from the test environment)."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        return ["no py-spy"]
    try:
        done = subprocess.run(
            [spy, "dump", "--pid", str(pid)],
            capture_output=True,
            text=True,
            timeout=DUMP_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"no dump: {exc}"]
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        return [f"no dump: {reason[0][:LINE_CHARS]}"]
    # Frames in the interpreter's own modules say nothing a thread's first frames don't.
    return [
        line[:LINE_CHARS]
        for line in done.stdout.splitlines()
        if line.strip() and "threading.py:" not in line and "<frozen" not in line
    ]


def stack_report(stack: Any) -> str:
    """The whole report, for a failed test's output."""
    out = [
        "processes: "
        + ", ".join(
            f"{name} {'up' if _alive(stack, name) else 'DOWN'}" for name in SERVICES + SERVERS
        )
    ]
    if _alive(stack, "kafka"):
        out += group_lines(stack.bootstrap)
    for name in SERVICES:
        out.append(f"-- {name}: last warnings")
        out += [f"   {line}" for line in log_lines(stack.logfile(name))]
    # Every worker of a stream service, not only the first: a stalled group may be any
    # member's doing.
    extra = [w for w in stack.extra_workers() if w.rsplit("-", 1)[0] in STREAM_SERVICES]
    for name in (*STREAM_SERVICES, *extra):
        pid = stack.pid(name)
        if pid:
            out.append(f"-- {name}: threads")
            out += [f"   {line}" for line in thread_dump(pid)]
    return "\n".join(out)


def summary(report: str) -> str:
    """The report's process and group lines on one line (for the short test summary)."""
    lines = [line for line in report.splitlines() if not line.startswith(("--", "   "))]
    return " | ".join(lines)
