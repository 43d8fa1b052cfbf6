"""Ingest on the real stack: a 200 means the event is on `waypost.events.v1`, once.

Calls go in concurrently over several connections, so the stack's worker processes (each with
its own producer) all answer some of them. The topic is read right after the last answer, with
no waiting: with acks=all the broker acknowledges a record only once it can be read.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from services.ingest.settings import IngestSettings
from shared.topics import EVENTS
from tests.e2e.helpers import WRITE_KEY, read_topic, unique, wait_for

pytestmark = pytest.mark.e2e

CLIENTS = 12
SINGLE_CALLS = 240
BATCHES = 6
BATCH_SIZE = 50


def _worker_processes(ingest_pid: int) -> int:
    """The worker processes under the ingest supervisor (`services/ingest/workers.py`)."""
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rpartition(")")[2].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read()
        except OSError:
            continue
        if parent == ingest_pid and b"multiprocessing.spawn" in command:
            count += 1
    return count


def test_the_stack_runs_the_configured_number_of_ingest_workers(stack: Any) -> None:
    configured = stack.env().get("WAYPOST_INGEST_WORKERS", "0")
    expected = IngestSettings(ingest_workers=int(configured)).worker_count()

    pid = stack.pid("ingest")

    assert pid is not None
    assert _worker_processes(pid) == expected


def test_every_acknowledged_event_is_on_the_topic_exactly_once(stack: Any) -> None:
    run = unique("ingest-once")
    singles = [
        {"userId": f"{run}-user-{n % 17}", "event": "Product Viewed", "messageId": f"{run}-s{n}"}
        for n in range(SINGLE_CALLS)
    ]
    batches = [
        {
            "batch": [
                {
                    "type": "track",
                    "userId": f"{run}-user-{n % 17}",
                    "event": "Product Added",
                    "messageId": f"{run}-b{b}-{n}",
                    "properties": {"sku": f"SKU-{n}"},
                }
                for n in range(BATCH_SIZE)
            ]
        }
        for b in range(BATCHES)
    ]

    def send(client_index: int) -> list[str]:
        """This client's share of the calls; the message ids of those answered 200."""
        acknowledged = []
        with httpx.Client(base_url=stack.ingest_url, auth=(WRITE_KEY, ""), timeout=30) as client:
            for body in singles[client_index::CLIENTS]:
                if client.post("/v1/track", json=body).status_code == 200:
                    acknowledged.append(body["messageId"])
            for body in batches[client_index::CLIENTS]:
                if client.post("/v1/batch", json=body).status_code == 200:
                    acknowledged.extend(item["messageId"] for item in body["batch"])
        return acknowledged

    with ThreadPoolExecutor(CLIENTS) as pool:
        acknowledged = [m for share in pool.map(send, range(CLIENTS)) for m in share]

    assert len(acknowledged) == SINGLE_CALLS + BATCHES * BATCH_SIZE, "every call answered 200"

    def written() -> tuple[Counter[str], bool] | None:
        """This run's records on the topic, once every acknowledged one can be read: a reader
        sees nothing past another worker's open transaction until it ends."""
        on_topic: Counter[str] = Counter()
        keys_match = True
        for key, value in read_topic(stack.bootstrap, EVENTS.name):
            if value is None or run.encode() not in value:
                continue  # other tests' records (some deliberately undecodable poison)
            record = json.loads(value)
            if str(record.get("messageId", "")).startswith(run):
                on_topic[record["messageId"]] += 1
                keys_match = keys_match and key == record["userId"]
        return (on_topic, keys_match) if set(on_topic) >= set(acknowledged) else None

    on_topic, keys_match = wait_for(written, timeout=60, what="every acknowledged event read")
    assert {m: n for m, n in on_topic.items() if n > 1} == {}, "no event written twice"
    assert set(on_topic) == set(acknowledged), "every acknowledged event written, nothing else"
    assert keys_match, "each record is keyed by its contact"
