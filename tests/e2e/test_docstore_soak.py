"""Soak: the local document store (FerretDB on PostgreSQL) under the abuse its users give it.

It runs its own PostgreSQL and FerretDB, on its own ports and folder, so the session stack is left
alone. Many async writers and readers work throughout, and bulk upserts three times the size of
FerretDB's connection pool (which, sent as one command each, wedge FerretDB 1.24 for good: see
`shared.docstore.STATEMENTS_PER_COMMAND`). Meanwhile cursors are left open and
abandoned, client processes are SIGKILLed mid-query, and FerretDB and then PostgreSQL are
SIGKILLed and restarted on their data (PostgreSQL's stale postmaster.pid naming a live process).
A probe (a write, then a read, bounded by the client deadline) runs every 50 ms. The test checks
that:
- every probe, and every other call, answers within the deadline: nothing hangs;
- outside the kill-to-recovery windows every probe succeeds;
- no acknowledged write is lost: every acknowledged insert and `$inc` is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pymongo import ReplaceOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from shared.docstore import STATEMENTS_PER_COMMAND, bulk_write_unordered, connect
from shared.settings import CommonSettings
from tests.conftest import PORT_OFFSET, TEST_HOME, local_stack
from tests.e2e.helpers import wait_for
from tests.waiting import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

# Apart from the session stack's ports, and moved by the same offset. Below 32768, where Linux
# never gives an outgoing connection its local port: this stack starts while the session's
# stack may be busy with thousands of connections.
SOAK_PORTS = local_stack.Ports(postgres=15439 + PORT_OFFSET, mongo=17024 + PORT_OFFSET)
SOAK_HOME = TEST_HOME.with_name(TEST_HOME.name + "-docstore-soak")
DEADLINE = 5.0  # seconds: every client call's deadline (WAYPOST_MONGO_TIMEOUT_SECONDS)
HUNG = DEADLINE + 3.0  # a call still unanswered by then ignored its deadline
SLACK = 1.0  # how far past the deadline an answer may come (a busy event loop, two cores)
GRACE = 2.0  # after a restart: pgx pings connections idle over 1 s, so dead ones are gone by then
WRITERS, READERS = 12, 6
BULK_UPSERTS = 3 * local_stack.FERRETDB_POOL  # statements per bulk write of the upserter
BULK = 2000  # documents that cursors walk through, two at a time
# An open cursor holds one of FerretDB's PostgreSQL connections. The killed clients together
# leave more cursors open than the pool has connections: unless a dead client's cursors are
# released, the store starves.
HELD_PER_CLIENT = local_stack.FERRETDB_POOL // 3
KILLED_CLIENTS = 4  # before the restarts; one more between them
assert HELD_PER_CLIENT * KILLED_CLIENTS > local_stack.FERRETDB_POOL
STANDING = 6  # cursors abandoned on a client that stays connected the whole run

# A client process: leaves cursors open, then runs queries back to back until it is killed.
ABUSER = """
import sys, threading
from pymongo import MongoClient
client = MongoClient(sys.argv[1], timeoutMS=10000)
bulk = client.soak.bulk
held = []
for _ in range(int(sys.argv[2])):
    cursor = bulk.find({}, batch_size=2)
    next(cursor)
    held.append(cursor)
print("cursors open", flush=True)
def query(step):
    while True:
        bulk.count_documents({"n": {"$gte": step}})
        list(bulk.find({"n": {"$gte": step}}).sort("n", -1).limit(300))
        print("query done", flush=True)
for step in range(3):
    threading.Thread(target=query, args=(step * 100,), daemon=True).start()
threading.Event().wait()
"""


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    """`pid` runs and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@dataclass
class Probe:
    started: float
    took: float
    error: str | None


@dataclass
class Soak:
    """What the load saw: acknowledged writes, probes, calls that ignored their deadline."""

    acked: set[str] = field(default_factory=set)
    increments: dict[str, int] = field(default_factory=dict)
    probes: list[Probe] = field(default_factory=list)
    hung: list[str] = field(default_factory=list)
    failures: int = 0
    reads: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def call(self, what: str, operation: Awaitable[Any], commands: int = 1) -> Any:
        """One client call of `commands` store commands, each with its own deadline; a call that
        outlives them by far is recorded as hung."""
        try:
            return await asyncio.wait_for(operation, HUNG + (commands - 1) * DEADLINE)
        except TimeoutError:
            self.hung.append(what)
            raise

    async def pause(self, seconds: float) -> None:
        """Pace a loop; returns at once when the run stops."""
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except TimeoutError:
            return

    def ok_probes(self, since: float) -> int:
        return sum(1 for p in self.probes if p.started >= since and p.error is None)


@pytest.fixture
def store() -> Iterator[local_stack.Stack]:
    """PostgreSQL and FerretDB alone, fresh, on the soak's ports and folder."""
    running = local_stack.Stack(home=SOAK_HOME, ports=SOAK_PORTS)
    running.down()
    shutil.rmtree(SOAK_HOME, ignore_errors=True)
    local_stack.setup()
    try:
        running.start_ferretdb()
        running.wait_mongo()
        yield running
    finally:
        running.down()


async def _writer(db: AsyncDatabase[dict[str, Any]], soak: Soak, w: int) -> None:
    counter = f"counter-{w}"
    n = 0
    while not soak.stop.is_set():
        n += 1
        key = f"w{w}-{n}"
        try:
            doc = {"_id": key, "w": w, "n": n, "at": datetime.now(UTC), "pad": "x" * 200}
            await soak.call("insert", db.writes.insert_one(doc))
            soak.acked.add(key)
            update = {"$inc": {"n": 1}}
            await soak.call("$inc", db.counters.update_one({"_id": counter}, update, upsert=True))
            soak.increments[counter] = soak.increments.get(counter, 0) + 1
        except (PyMongoError, TimeoutError):
            soak.failures += 1
            await soak.pause(0.1)


async def _bulk_upserter(db: AsyncDatabase[dict[str, Any]], soak: Soak) -> None:
    """Upserts in bulks far larger than FerretDB's pool, as the profile view writes them: in one
    command each, such a bulk would hold a connection per statement and never finish."""
    r = 0
    while not soak.stop.is_set():
        r += 1
        keys = [f"bulk{r}-{i}" for i in range(BULK_UPSERTS)]
        writes = [ReplaceOne({"_id": k}, {"w": -1, "round": r}, upsert=True) for k in keys]
        try:
            commands = math.ceil(len(writes) / STATEMENTS_PER_COMMAND)
            await soak.call("bulk upsert", bulk_write_unordered(db.writes, writes), commands)
            soak.acked.update(keys)
        except (PyMongoError, TimeoutError):
            soak.failures += 1
        await soak.pause(0.2)


async def _reader(db: AsyncDatabase[dict[str, Any]], soak: Soak) -> None:
    while not soak.stop.is_set():
        low = random.randrange(BULK)
        try:
            await soak.call("count", db.writes.count_documents({"w": random.randrange(WRITERS)}))
            cursor = db.bulk.find({"n": {"$gte": low}}).sort("n", 1).limit(50)
            await soak.call("find", cursor.to_list())
            await soak.call("find_one", db.writes.find_one({"_id": f"w0-{low}"}))
            soak.reads += 3
        except (PyMongoError, TimeoutError):
            soak.failures += 1
            await soak.pause(0.1)


async def _prober(db: AsyncDatabase[dict[str, Any]], soak: Soak) -> None:
    n = 0
    while not soak.stop.is_set():
        n += 1
        key = f"probe-{n}"
        began = time.monotonic()
        error = None
        try:
            await soak.call("probe write", db.probes.insert_one({"_id": key}))
            soak.acked.add(key)
            found = await soak.call("probe read", db.probes.find_one({"_id": key}))
            if found is None:
                error = "acknowledged probe write not found"
        except (PyMongoError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {str(exc)[:160]}"
        soak.probes.append(Probe(began, time.monotonic() - began, error))
        await soak.pause(0.05)


async def _abandoner(settings: CommonSettings, soak: Soak) -> None:
    """Clients that open cursors, read one batch of each, drop them and go away."""
    while not soak.stop.is_set():
        client = connect(settings, "soak-abandoner", max_connections=4)
        try:
            for _ in range(6):
                cursor = client.soak.bulk.find({}, batch_size=2)
                await soak.call("abandoned cursor", cursor.next())
        except (PyMongoError, TimeoutError):
            soak.failures += 1
        finally:
            await client.close()
        await soak.pause(0.3)


async def _kill_client_mid_query(url: str, soak: Soak) -> None:
    """A client process holding open cursors is SIGKILLed while its queries run."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ABUSER, url, str(HELD_PER_CLIENT), stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    try:
        lines: list[bytes] = []

        async def queries_running() -> None:
            while lines.count(b"query done\n") < 5:
                line = await process.stdout.readline()  # type: ignore[union-attr]
                assert line, "the client process exited early"
                lines.append(line)

        await asyncio.wait_for(queries_running(), 30)
        assert lines[0] == b"cursors open\n"
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have exited already
            process.kill()
        await process.wait()


async def _restart(
    soak: Soak, kill: Callable[[], None], start: Callable[[], None]
) -> tuple[float, float, float]:
    """SIGKILL a server, start it on its data; (killed, ready, recovered) times. Recovered: a
    probe succeeded after it was ready, and pgx's stale connections have had time to go."""
    killed = time.monotonic()
    await asyncio.to_thread(kill)
    await asyncio.to_thread(start)
    ready = time.monotonic()
    await eventually(
        lambda: soak.ok_probes(ready) > 0,
        timeout=15,
        what="a probe to succeed after the restart",
        every=0.05,
    )
    first_ok = min(p.started for p in soak.probes if p.started >= ready and p.error is None)
    return killed, ready, max(first_ok, ready + GRACE)


@pytest.mark.serial
async def test_the_document_store_answers_through_abuse(store: local_stack.Stack) -> None:
    settings = CommonSettings(mongo_url=store.mongo_url, mongo_timeout_seconds=DEADLINE)
    client = connect(settings, "soak")
    forgetful = connect(settings, "soak-forgetful")
    db = client.soak
    soak = Soak()
    began = time.monotonic()
    tasks: list[asyncio.Task[None]] = []
    try:
        await db.bulk.insert_many([{"_id": n, "n": n, "pad": "y" * 100} for n in range(BULK)])
        await db.writes.create_index("w")
        for _ in range(STANDING):  # abandoned, on a client that stays connected
            await forgetful.soak.bulk.find({}, batch_size=2).next()

        tasks = [
            *(asyncio.create_task(_writer(db, soak, w)) for w in range(WRITERS)),
            *(asyncio.create_task(_reader(db, soak)) for _ in range(READERS)),
            asyncio.create_task(_prober(db, soak)),
            asyncio.create_task(_abandoner(settings, soak)),
            asyncio.create_task(_bulk_upserter(db, soak)),
        ]
        for _ in range(KILLED_CLIENTS):
            await _kill_client_mid_query(store.mongo_url, soak)
        clients_killed = time.monotonic()

        def kill_ferretdb() -> None:
            store.stop("ferretdb", signal.SIGKILL)

        def start_ferretdb() -> None:
            store.start_ferretdb()
            store.wait_mongo()

        def kill_postgres() -> None:
            postmaster = store.pid("postgres")
            backends = _children(postmaster) if postmaster is not None else []
            store.stop("postgres", signal.SIGKILL)
            # Its backends leave when they notice, holding the shared memory until then: a
            # postmaster started before they are gone refuses to start ("pre-existing shared
            # memory block is still in use"), as an operator restarting it at once would see.
            wait_for(
                lambda: not any(_alive(pid) for pid in backends),
                timeout=60,
                what="the killed PostgreSQL's backends gone",
            )
            # Its postmaster.pid stays behind. Make its pid one that a live process now has
            # (as after pid reuse), which on its own would stop PostgreSQL from starting.
            lock = store.home / "data" / "postgres" / "postmaster.pid"
            lines = lock.read_text().split("\n")
            lock.write_text("\n".join([str(store.pid("ferretdb")), *lines[1:]]))

        def start_postgres() -> None:
            store.start_postgres()
            store.wait_postgres()

        windows = [await _restart(soak, kill_ferretdb, start_ferretdb)]
        await _kill_client_mid_query(store.mongo_url, soak)
        windows.append(await _restart(soak, kill_postgres, start_postgres))
        # Load goes on after the last restart: more writes acknowledged, more probes answered.
        after = time.monotonic()
        acked_before = len(soak.acked)
        await eventually(
            lambda: len(soak.acked) > acked_before + 500 and soak.ok_probes(after) >= 20,
            timeout=30,
            what="the load to go on after the restarts",
            every=0.05,
        )
    finally:
        soak.stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        stored = {str(d["_id"]) async for d in db.writes.find({}, {"_id": 1})}
        stored |= {str(d["_id"]) async for d in db.probes.find({}, {"_id": 1})}
        counters = {str(d["_id"]): int(d["n"]) async for d in db.counters.find({})}
    finally:
        await client.close()
        await forgetful.close()

    def in_window(probe: Probe) -> bool:
        return any(
            probe.started <= recovered and probe.started + probe.took >= killed
            for killed, _ready, recovered in windows
        )

    failed_outside = [p for p in soak.probes if p.error and not in_window(p)]
    slow = [p for p in soak.probes if p.took > DEADLINE + SLACK]
    recoveries = [f"{recovered - killed:.1f}s" for killed, _ready, recovered in windows]
    print(
        f"\nsoak {time.monotonic() - began:.0f}s ({clients_killed - began:.0f}s to the first "
        f"restart): {len(soak.acked)} writes acknowledged, "
        f"{soak.reads} reads, {len(soak.probes)} probes "
        f"({sum(1 for p in soak.probes if p.error and in_window(p))} failed inside the "
        f"restart windows, {len(failed_outside)} outside), "
        f"{soak.failures} other calls failed, recovery after FerretDB and PostgreSQL kills: "
        f"{', '.join(recoveries)}; slowest probe {max(p.took for p in soak.probes):.2f}s"
    )
    assert not soak.hung, f"calls that ignored their deadline: {soak.hung[:10]}"
    assert not slow, f"probes answered after the deadline: {slow[:5]}"
    assert not failed_outside, f"probes failed outside the restart windows: {failed_outside[:5]}"
    lost = soak.acked - stored
    assert not lost, f"{len(lost)} acknowledged writes lost, e.g. {sorted(lost)[:5]}"
    short = {
        k: (counters.get(k, 0), n) for k, n in soak.increments.items() if counters.get(k, 0) < n
    }
    assert not short, f"acknowledged $inc lost (stored, acknowledged): {short}"
