"""Document-store benchmark: lookups and view writes on the local FerretDB as collections grow.

`.venv/bin/python -m bench.docstore [--sizes N ...] [--ops K]` starts its own PostgreSQL and
FerretDB (ports 25632 and 27632, state in `.local/bench-docstore`, wiped at the start and stopped
at the end), then for each size fills two collections with that many ledger-sized documents
(one index on `contact_key`, as the `messages` view has):

- `twins`: as the stack makes every collection, each single-field index with its GIN twin
  (deploy/local/ferretdb/index_twins.sql);
- `plain` (the baseline): the same collection with the twins dropped, as FerretDB alone
  leaves it.

and times on each, in wall time (the store is on this machine, the client waits for it):

1. `find_one` by `_id` and by `contact_key` (the admin's contact page);
2. the ledger view's write of a batch of 500 entries, half of them stored at a lower
   revision: as it was (the stored revisions read with `$in`, then inserts and replacements,
   `ledger_view`'s old steps) and as it is (`shared.docstore.replace_unless_newer`, one
   conditional upsert per entry, no read);
3. on `twins`, the same batches as unconditional replacements with upsert in one bulk write,
   which is how the profile view wrote before it was versioned like the ledger view (an older
   document could then go over a newer one).

The last line is `RESULT size=… lookup_ms_plain=… lookup_ms_twins=… lookup_ratio=…
view_batch_ms_before=… view_batch_ms_after=… view_ratio=… unconditional_batch_ms=…
versioned_cost=…` for the largest size (ratios: how many times faster; `versioned_cost`: the
conditional batch's time over the unconditional one's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient, InsertOne, ReplaceOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError

from bench.timers import Progress, say, table
from shared.docstore import bulk_write_unordered, replace_unless_newer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy" / "local"))

import stack  # noqa: E402  (a script, not a package: importable once its folder is on the path)

HOME = ROOT / ".local" / "bench-docstore"
PORTS = stack.Ports(postgres=25632, mongo=27632)
BATCH = 500
DATABASE = "bench"


def document(i: int, rev: int = 1) -> dict[str, Any]:
    return {
        "_id": f"msg-{i:09d}",
        "contact_key": f"contact-{i % 5000}",
        "channel": "email",
        "state": "sent",
        "rev": rev,
        "template_id": "welcome",
        "journey_id": "s02-welcome",
        "step_id": "send_welcome",
        "attempt": 1,
        "reason": None,
    }


def psql(running: stack.Stack, sql: str) -> str:
    binary = stack.postgres_bin() / "psql"
    done = subprocess.run(
        [str(binary), running.postgres_url, "-Atc", sql], capture_output=True, text=True, check=True
    )
    return done.stdout


def drop_twins(running: stack.Stack, collection: str) -> int:
    """Drops the GIN twins of one collection's table; returns how many it dropped."""
    rows = psql(
        running,
        "SELECT i.indexrelid::regclass FROM pg_index i "  # noqa: S608 - constants, not input
        "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam "
        f"JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace "
        f"WHERE n.nspname = '{DATABASE}' AND a.amname = 'gin' AND t.relname LIKE '{collection}%'",
    ).split()
    for index in rows:
        psql(running, f"DROP INDEX {index}")
    return len(rows)


async def fill(collection: AsyncCollection[dict[str, Any]], size: int) -> None:
    await collection.drop()
    await collection.create_index("contact_key")
    progress = Progress(f"filling {collection.name}", size, "documents")
    for start in range(0, size, 5000):
        await collection.insert_many(
            [document(i) for i in range(start, min(size, start + 5000))], ordered=False
        )
        progress.tick(min(size, start + 5000))


async def timed(ops: int, op: Callable[[int], Awaitable[Any]]) -> float:
    """Median milliseconds of `ops` calls."""
    took = []
    for i in range(ops):
        started = time.perf_counter()
        await op(i)
        took.append((time.perf_counter() - started) * 1000)
    return statistics.median(took)


async def view_before(
    collection: AsyncCollection[dict[str, Any]], docs: list[dict[str, Any]]
) -> None:
    """The ledger view's old steps: read the stored revisions with `$in`, insert the entries
    not stored, replace those stored at a lower revision."""
    found = collection.find({"_id": {"$in": [d["_id"] for d in docs]}}, {"rev": 1})
    stored = {str(doc["_id"]): int(doc.get("rev", 0)) async for doc in found}
    inserts = [InsertOne(d) for d in docs if d["_id"] not in stored]
    replacements = [
        ReplaceOne({"_id": d["_id"], "rev": stored[d["_id"]]}, d)
        for d in docs
        if d["_id"] in stored and stored[d["_id"]] < d["rev"]
    ]
    for operations in (inserts, replacements):
        if operations:
            with contextlib.suppress(BulkWriteError):  # a document stored meanwhile
                await bulk_write_unordered(collection, operations)
    found = collection.find({"_id": {"$in": [d["_id"] for d in docs]}}, {"rev": 1})
    _ = [doc async for doc in found]  # the old view compared once more after writing


async def view_after(
    collection: AsyncCollection[dict[str, Any]], docs: list[dict[str, Any]]
) -> None:
    await replace_unless_newer(collection, docs, "rev")


async def replace_all(
    collection: AsyncCollection[dict[str, Any]], docs: list[dict[str, Any]]
) -> None:
    """Every document put over the stored one, whatever its revision (one bulk write)."""
    await bulk_write_unordered(
        collection, [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs]
    )


def view_batch(size: int, round_: int) -> list[dict[str, Any]]:
    """Half the entries stored at a lower revision, half new."""
    half = BATCH // 2
    stored = [document((round_ * 7919 + i * 13) % size, rev=2 + round_) for i in range(half)]
    new = [document(size + round_ * BATCH + i) for i in range(half)]
    return stored + new


async def one(
    collection: AsyncCollection[dict[str, Any]],
    size: int,
    ops: int,
    rounds: int,
    write: Callable[[AsyncCollection[dict[str, Any]], list[dict[str, Any]]], Awaitable[None]],
) -> dict[str, float]:
    """Median ms of a lookup by id, by contact, and of a view batch, on one collection."""
    return {
        "id": await timed(
            ops, lambda i: collection.find_one({"_id": f"msg-{(i * 7919) % size:09d}"})
        ),
        "contact": await timed(
            ops, lambda i: collection.find_one({"contact_key": f"contact-{i % 5000}"})
        ),
        "view": await timed(rounds, lambda r: write(collection, view_batch(size, r))),
    }


async def measure(
    running: stack.Stack, sizes: Sequence[int], ops: int, rounds: int
) -> list[dict[str, float]]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        running.mongo_url, timeoutMS=600_000
    )
    db = client[DATABASE]
    results = []
    try:
        for size in sizes:
            say(f"size {size:,}")
            figures: dict[str, float] = {"size": size}
            for name in ("twins", "plain"):
                collection = db[name]
                await fill(collection, size)
                if name == "plain":
                    dropped = drop_twins(running, name)
                    if dropped == 0:
                        raise RuntimeError("no GIN twin to drop: is index_twins.sql applied?")
                write = view_before if name == "plain" else view_after
                for figure, value in (await one(collection, size, ops, rounds, write)).items():
                    figures[f"{figure}_{name}"] = value
                if name == "twins":
                    # Later rounds than `one` took: the same mix, half stored, half new.
                    figures["unconditional"] = await timed(
                        rounds,
                        lambda r, c=collection, n=size: replace_all(c, view_batch(n, rounds + r)),
                    )
            results.append(figures)
    finally:
        await client.drop_database(DATABASE)
        await client.close()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 50_000])
    parser.add_argument("--ops", type=int, default=100, help="lookups timed per size")
    parser.add_argument("--rounds", type=int, default=5, help="view batches timed per size")
    args = parser.parse_args(argv)
    running = stack.Stack(home=HOME, ports=PORTS)
    running.down()
    shutil.rmtree(HOME, ignore_errors=True)
    try:
        running.start_ferretdb()
        running.wait_mongo()
        results = asyncio.run(measure(running, sorted(args.sizes), args.ops, args.rounds))
    finally:
        running.down()
    rows = [
        [
            "documents",
            "find by _id ms",
            "find by contact ms",
            "view batch ms",
            "unconditional batch ms",
            "store",
        ]
    ]
    for f in results:
        for name, label in (("plain", "FerretDB alone (before)"), ("twins", "with twins (now)")):
            rows.append(
                [
                    f"{int(f['size']):,}",
                    f"{f[f'id_{name}']:.2f}",
                    f"{f[f'contact_{name}']:.2f}",
                    f"{f[f'view_{name}']:.0f}",
                    f"{f['unconditional']:.0f}" if name == "twins" else "-",
                    label,
                ]
            )
    print(flush=True)
    table(rows)
    say(
        f"view batch: {BATCH} entries, half stored at a lower revision; before = read with $in, "
        "then insert and replace; now = one conditional upsert each, no read; unconditional = "
        "one bulk write of plain replacements with upsert (the profile view before it was "
        "versioned)"
    )
    last = results[-1]
    lookup_plain, lookup_twins = last["id_plain"], last["id_twins"]
    print(
        "RESULT "
        f"size={int(last['size'])} lookup_ms_plain={lookup_plain:.2f} "
        f"lookup_ms_twins={lookup_twins:.2f} lookup_ratio={lookup_plain / lookup_twins:.1f} "
        f"view_batch_ms_before={last['view_plain']:.0f} "
        f"view_batch_ms_after={last['view_twins']:.0f} "
        f"view_ratio={last['view_plain'] / last['view_twins']:.1f} "
        f"unconditional_batch_ms={last['unconditional']:.0f} "
        f"versioned_cost={last['view_twins'] / last['unconditional']:.2f}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
