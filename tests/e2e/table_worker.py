"""A Faust worker with one RocksDB table, for tests/e2e/test_table_restore.py.

`python -m tests.e2e.table_worker APP_ID DATA_DIR OUT [--no-restore]` runs `run_worker` (the
bulk restore, then Faust) with a table `things` and an idle agent on `<APP_ID>-source`. Once
Faust has recovered the table it writes OUT: every row (hex), and how many changelog records
Faust itself applied during its recovery. `--no-restore` starts Faust without the bulk restore.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import faust

from shared.faust_app import build_faust_app, run_worker
from shared.logs import configure_logging
from shared.settings import CommonSettings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("app_id")
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--no-restore", action="store_true")
    args = parser.parse_args()
    settings = CommonSettings()
    configure_logging("table-worker", "info", "json")
    app = build_faust_app(args.app_id, settings, data_dir=args.data_dir)
    applied = 0

    async def on_changelog_event(_event: Any) -> None:
        nonlocal applied
        applied += 1

    async def recovered() -> None:
        rows = {bytes(k).hex(): bytes(v).hex() for k, v in things.items()}
        written = args.out.with_suffix(".tmp")
        written.write_text(json.dumps({"rows": rows, "applied": applied}))
        written.replace(args.out)  # whole, or not there yet, for the test that waits on it

    things = app.Table(
        "things",
        partitions=settings.topic_partitions,
        key_type=bytes,
        value_type=bytes,
        on_recover=recovered,
        on_changelog_event=on_changelog_event,
    )
    source = app.topic(f"{args.app_id}-source", key_serializer="raw", value_serializer="raw")

    async def idle(stream: faust.StreamT[bytes]) -> None:
        async for _event in stream:
            pass

    app.agent(source, name="idle")(idle)
    run_worker(app, settings, bulk_restore=not args.no_restore)


if __name__ == "__main__":
    main()
