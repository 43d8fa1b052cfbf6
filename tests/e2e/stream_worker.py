"""A minimal stream worker for the end-to-end tests of `shared.streams`, run as a process:
`python -m tests.e2e.stream_worker APP_ID INPUT OUTPUT` with `WAYPOST_*` settings.

It counts records per key in a table, the way the services' shells work: decide against the
stored row, publish and wait for the acknowledgement, then write the row. A row keeps the count
and the offset of the last record counted, so a batch repeated after a crash is not counted
twice; a record whose value is `forget` deletes the key's row. Each counted record is published
on OUTPUT as `{"key", "offset", "count"}`.

`WAYPOST_TEST_TRANSACTIONAL=1` runs it as a transactional worker that acts the way a sender
must: after folding a batch it checkpoints (`StreamWorker.checkpoint`), and only then performs
its side effect, appending `key offset` per counted record to the file `WAYPOST_TEST_EFFECTS`.
While the file `WAYPOST_TEST_HOLD` exists it holds each batch before the checkpoint, after
logging `stream_test.holding` (a test stops it there).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import structlog

from shared.clock import SystemClock
from shared.kafka import AsyncProducer, Record, prepare_topics
from shared.logs import configure_logging
from shared.settings import StreamSettings
from shared.streams import StreamWorker, focus, run_stream_worker, transactional_config

log = structlog.get_logger(__name__)


def main(app_id: str, source: str, output: str) -> None:
    settings = StreamSettings(batch_max_records=200)
    configure_logging("stream-worker", settings.log_level, settings.log_format)
    transactional = os.environ.get("WAYPOST_TEST_TRANSACTIONAL") == "1"
    extra = transactional_config(app_id, settings) if transactional else None
    producer = AsyncProducer(settings.kafka_bootstrap, client_id=app_id, extra=extra)
    worker = StreamWorker(
        app_id, settings, producer, SystemClock(), service="counts", transactional=transactional
    )
    counts = worker.table("counts")
    effects = Path(os.environ.get("WAYPOST_TEST_EFFECTS", os.devnull))
    hold = Path(os.environ.get("WAYPOST_TEST_HOLD", "/nonexistent/hold"))

    async def process(records: list[Record]) -> None:
        rows: dict[tuple[int, bytes], dict[str, int] | None] = {}
        outputs = []
        for record in records:
            focus(record.partition)
            key = (record.key or "").encode()
            slot = (record.partition, key)
            if slot not in rows:
                stored = counts.get(key)
                rows[slot] = json.loads(stored) if stored else None
            row = rows[slot]
            if row is not None and record.offset <= row["last"]:
                continue  # counted before a crash
            if record.value == b"forget":
                rows[slot] = None
                continue
            count = (row["count"] if row else 0) + 1
            rows[slot] = {"count": count, "last": record.offset}
            value = {"key": record.key, "offset": record.offset, "count": count}
            outputs.append((output, record.key, json.dumps(value).encode()))
        await producer.send_all(outputs)
        for (partition, key), row in rows.items():
            focus(partition)
            if row is None:
                counts.pop(key, None)
            else:
                counts[key] = json.dumps(row).encode()
        if not transactional:
            return
        if hold.exists():
            log.info("stream_test.holding", records=len(records))
            while hold.exists():
                await asyncio.sleep(0.05)
        await worker.checkpoint()  # raises Fenced: then no effect at all
        with effects.open("a") as lines:
            for _topic, key, value in outputs:
                lines.write(f"{key} {json.loads(value)['offset']}\n")

    worker.consume([source], process)
    prepare_topics(settings, worker.changelogs())
    try:
        run_stream_worker(worker)
    finally:
        producer.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
