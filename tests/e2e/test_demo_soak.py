"""Soak: the demo's traffic twice against the same data while clients die mid-call, and the
document store answers throughout.

It runs on a fresh stack of its own (other ports, its own folder), as `make demo` does, so the
backlog the chaos tests leave on the session stack does not set its pace. The demo's journeys
and segments are published, and its storefront (300 shoppers) runs twice, each run with shoppers
of its own, as two `make demo` runs would. Meanwhile client processes are SIGKILLed in the
middle of store queries, admin calls are cut off mid-way, and a probe (a read and a write,
bounded by the client deadline) asks the store every 200 ms. Every registered shopper of both
runs gets their welcome email; no probe fails or outlives the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import demo  # deploy/local/demo.py (tests/conftest.py puts deploy/local on the path)
import httpx
import pytest
from pymongo.errors import PyMongoError

from shared.cli import publish, publish_segments
from shared.docstore import connect_blocking
from shared.settings import CommonSettings
from tests.conftest import (
    PORT_OFFSET,
    ROOT,
    TEST_DELIVERY_ENV,
    TEST_HOME,
    local_stack,
    ports_at,
)
from tests.e2e.helpers import unique, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.soak]

DEADLINE = 5.0  # the probe's client deadline, seconds
SHOPPERS = 300

# A client that opens cursors and runs queries back to back until it is killed.
QUERIER = """
import sys
from pymongo import MongoClient
client = MongoClient(sys.argv[1], timeoutMS=10000)
db = client.waypost
held = [db.messages.find({}, batch_size=2) for _ in range(5)]
for cursor in held:
    next(cursor, None)
print("querying", flush=True)
while True:
    list(db.messages.find({"state": "sent"}).limit(200))
    list(db.journey_log.aggregate([{"$group": {"_id": "$kind", "n": {"$sum": 1}}}]))
"""


# The session stack's ports moved by 300 (see tests/conftest.py).
SOAK_OFFSET = PORT_OFFSET + 300
SOAK_PORTS = ports_at(SOAK_OFFSET)
SOAK_HOME = TEST_HOME.with_name(TEST_HOME.name + "-demo-soak")


@pytest.fixture
def demo_stack() -> Iterator[local_stack.Stack]:
    """The whole stack, fresh, for this soak alone."""
    running = local_stack.Stack(
        home=SOAK_HOME, ports=SOAK_PORTS, partitions=3, extra_env=TEST_DELIVERY_ENV
    )
    running.down()
    shutil.rmtree(SOAK_HOME, ignore_errors=True)
    local_stack.setup()
    try:
        running.up()
        yield running
    finally:
        running.down()


@dataclass
class Probes:
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


def _probe(settings: CommonSettings, probes: Probes) -> None:
    client = connect_blocking(settings, "soak-probe")
    try:
        n = 0
        while not probes.stop.is_set():
            n += 1
            started = time.monotonic()
            try:
                client.waypost.soak_probes.replace_one({"_id": "probe"}, {"n": n}, upsert=True)
                client.waypost.templates.find_one({"_id": "welcome"})
            except PyMongoError as exc:
                probes.failures.append(f"{type(exc).__name__}: {exc}"[:200])
            probes.latencies.append(time.monotonic() - started)
            probes.stop.wait(0.2)
    finally:
        client.close()


def _abuse(stack: Any, probes: Probes) -> None:
    """Clients that die mid-call: query processes SIGKILLed, admin calls cut off."""
    while not probes.stop.is_set():
        querier = subprocess.Popen(
            [sys.executable, "-c", QUERIER, stack.mongo_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        assert querier.stdout is not None
        querier.stdout.readline()  # "querying": its cursors are open, its queries running
        probes.stop.wait(0.5)
        querier.send_signal(signal.SIGKILL)
        querier.wait()
        querier.stdout.close()
        # Cut off mid-call, as a closed browser tab would be.
        with contextlib.suppress(httpx.TransportError):
            httpx.get(
                f"{stack.admin_url}/v1/stats",
                headers={"Authorization": "Bearer wp_dev_admin_key"},
                timeout=0.05,
            )


@contextmanager
def _abused_and_probed(stack: Any) -> Iterator[Probes]:
    settings = CommonSettings(mongo_url=stack.mongo_url, mongo_timeout_seconds=DEADLINE)
    probes = Probes()
    threads = [
        threading.Thread(target=_probe, args=(settings, probes), daemon=True),
        threading.Thread(target=_abuse, args=(stack, probes), daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        yield probes
    finally:
        probes.stop.set()
        for thread in threads:
            thread.join(timeout=30)


def test_the_demo_twice_while_clients_die_mid_call(demo_stack: local_stack.Stack) -> None:
    stack = demo_stack
    settings = CommonSettings(
        kafka_bootstrap=stack.bootstrap, mongo_url=stack.mongo_url, topic_partitions=3
    )
    publish_segments(settings, sorted((ROOT / "examples" / "segments").glob("*.yaml")))
    publish(settings, sorted((ROOT / "examples" / "journeys").glob("*.yaml")))
    with _abused_and_probed(stack) as probes:
        for run in (unique("soak-a"), unique("soak-b")):
            registered = asyncio.run(demo.drive_storefront(stack, SHOPPERS, 7, run))
            assert len(registered) > SHOPPERS // 2

            def all_welcomed(emails: set[str] = registered) -> bool:
                return bool(demo.welcomed(stack, emails) == len(emails))

            wait_for(
                all_welcomed,
                timeout=300,
                what=f"a welcome email for each of the {len(registered)} shoppers of {run}",
            )
    assert probes.latencies, "the probe ran"
    assert probes.failures == [], probes.failures[:5]
    slowest = max(probes.latencies)
    print(f"\n{len(probes.latencies)} store probes, slowest {slowest:.2f}s, none failed")
    assert slowest < DEADLINE
