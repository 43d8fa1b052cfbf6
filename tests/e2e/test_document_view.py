"""A document view (`shared.document_view`) keeps its collection in step with its topic while
members join and leave its consumer group, and while one is stopped past its session and comes
back: every record reaches the store within seconds, on the real broker and document server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from pymongo import MongoClient
from pymongo.collection import Collection

from shared.docstore import connect, database
from shared.settings import CommonSettings
from tests.conftest import ROOT
from tests.e2e.helpers import unique, wait_for
from tests.e2e.view_member import view

pytestmark = pytest.mark.e2e

PARTITIONS = 3
# Well under the 60 s after which a member replaces a consumer that stopped fetching: a view
# that needs that rescue to catch up after a rebalance fails here.
CATCH_UP_SECONDS = 25.0
# Joins and leaves per run (more to hunt a rare race locally).
ROUNDS = int(os.environ.get("WAYPOST_TEST_VIEW_ROUNDS", "4"))
# How long members may take to start and settle in their group (processes start, import and
# join on a machine shared with other test modules).
SETTLE_SECONDS = 120.0


class ViewThread:
    """One member of the view's group in this process, on a thread and event loop of its own
    (as a service runs it)."""

    def __init__(self, settings: CommonSettings, topic: str, collection: str, group: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._settings = settings
        self._names = (topic, collection, group)
        self._thread = threading.Thread(
            target=self._loop.run_until_complete, args=(self._follow(),), daemon=True
        )
        self._thread.start()

    async def _follow(self) -> None:
        client = connect(self._settings, "waypost-test-document-view")
        try:
            await view(self._settings, database(client, self._settings), *self._names).run(
                self._stop
            )
        finally:
            await client.close()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the view did not stop"
        self._loop.close()


class ViewProcess:
    """One member of the view's group as a process (`tests.e2e.view_member`)."""

    def __init__(self, stack: Any, names: tuple[str, str, str], log: Path) -> None:
        env = {
            **os.environ,
            "WAYPOST_KAFKA_BOOTSTRAP": stack.bootstrap,
            "WAYPOST_MONGO_URL": stack.mongo_url,
        }
        self.log = log
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.e2e.view_member", *names],
                cwd=ROOT,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])

    def stop(self) -> int:
        """Stop it (SIGTERM); its exit code, 0 when it stopped as asked."""
        if self.alive():
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            return -1


class Fixture:
    """A topic of its own, a producer, and the collection its view writes."""

    def __init__(self, stack: Any) -> None:
        self.settings = CommonSettings(
            kafka_bootstrap=stack.bootstrap,
            mongo_url=stack.mongo_url,
            topic_partitions=stack.partitions,
        )
        self.topic, self.group = unique("waypost.test-view"), unique("waypost-test-view")
        self.collection = self.topic.replace(".", "_")
        self.admin = AdminClient({"bootstrap.servers": stack.bootstrap})
        self.admin.create_topics([NewTopic(self.topic, PARTITIONS, 1)])[self.topic].result(30)
        self.producer = Producer({"bootstrap.servers": stack.bootstrap, "enable.idempotence": True})
        self.client: MongoClient[dict[str, Any]] = MongoClient(stack.mongo_url)
        self.store: Collection[dict[str, Any]] = self.client[self.settings.mongo_db][
            self.collection
        ]
        self.sent: dict[str, str] = {}

    @property
    def names(self) -> tuple[str, str, str]:
        return self.topic, self.collection, self.group

    def produce(self, round_: int, count: int) -> None:
        for n in range(count):
            key, value = f"k{n % 60}", f"{round_}-{n}"
            self.sent[key] = value
            self.producer.produce(self.topic, key=key, value=value)
        assert self.producer.flush(30) == 0

    def missing(self) -> dict[str, str]:
        found = {doc["_id"]: doc["value"] for doc in self.store.find({})}
        return {k: v for k, v in self.sent.items() if found.get(k) != v}

    def wait_stored(self, what: str) -> None:
        try:
            wait_for(lambda: not self.missing(), timeout=CATCH_UP_SECONDS, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; not stored: {sorted(self.missing())[:10]}") from None

    def members(self) -> list[int]:
        """The partitions each member of the view's group holds, as the coordinator says."""
        described = self.admin.describe_consumer_groups([self.group])[self.group].result(30)
        return sorted(len(m.assignment.topic_partitions) for m in described.members)

    def wait_members(self, count: int, what: str) -> None:
        """Until the group has `count` members, each holding a partition (3 partitions)."""
        wait_for(
            lambda: (held := self.members()) and len(held) == count and min(held) > 0,
            timeout=SETTLE_SECONDS,
            what=f"{what}: {count} members holding partitions",
        )

    def close(self) -> None:
        try:
            self.admin.delete_topics([self.topic])
            self.store.drop()
        finally:
            self.client.close()


@pytest.fixture
def view_topic(stack: Any) -> Iterator[Fixture]:
    fixture = Fixture(stack)
    try:
        yield fixture
    finally:
        fixture.close()


def test_every_record_reaches_the_store_while_members_join_and_leave(
    view_topic: Fixture,
) -> None:
    it = view_topic
    members = [ViewThread(it.settings, *it.names)]
    try:
        it.produce(0, 120)
        it.wait_members(1, "the first member")
        it.wait_stored("the first records stored")
        for round_ in range(1, ROUNDS + 1):
            # Join or leave while records keep coming, so commits race the rebalance.
            it.produce(round_, 60)
            if round_ % 2:
                members.append(ViewThread(it.settings, *it.names))
            else:
                members.pop().stop()
            for burst in range(5):
                it.produce(round_ * 10 + burst, 60)
                time.sleep(0.3)  # records spread over the rebalance, not a test's wait
            it.wait_members(len(members), f"rebalance {round_}")
            it.produce(round_ * 10 + 5, 60)
            it.wait_stored(f"every record stored after rebalance {round_} ({len(members)} members)")
    finally:
        for member in members:
            with contextlib.suppress(AssertionError):
                member.stop()


def test_every_record_reaches_the_store_after_a_member_stopped_past_its_session(
    stack: Any, view_topic: Fixture, tmp_path: Path
) -> None:
    it = view_topic
    members: list[ViewProcess] = []
    try:
        members.append(ViewProcess(stack, it.names, tmp_path / "one.log"))
        members.append(ViewProcess(stack, it.names, tmp_path / "two.log"))
        one, two = members
        it.produce(0, 120)
        it.wait_members(2, "both members")
        it.wait_stored("the first records stored by two members")
        for round_ in (1, 2):
            # Stopped with records coming: past its session its partitions move to the other
            # member, its last commits are refused, and it comes back to a group that moved on.
            one.process.send_signal(signal.SIGSTOP)
            burst = 0

            def evicted(round_: int = round_) -> bool:
                nonlocal burst
                it.produce(round_ * 1000 + burst, 60)
                burst += 1
                return it.members() == [3]

            wait_for(evicted, timeout=SETTLE_SECONDS, what=f"stop {round_}: the group without it")
            one.process.send_signal(signal.SIGCONT)
            it.produce(round_ * 1000 + 999, 60)
            it.wait_members(2, f"stop {round_}: back in the group")
            it.produce(round_ * 1000 + 998, 60)
            assert one.alive(), f"the stopped member died:\n{one.tail()}"
            assert two.alive(), f"the other member died:\n{two.tail()}"
            it.wait_stored(f"every record stored after stop {round_}")
    finally:
        codes = [member.stop() for member in members]
    assert codes == [0, 0], f"members ended with {codes}"
