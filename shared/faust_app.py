"""One way to build a Faust app for the stream workers (segmenter, orchestrator)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faust
from faust.worker import Worker

from shared.kafka import Record, prepare_topics
from shared.settings import CommonSettings
from shared.topics import Topic


def build_faust_app(app_id: str, settings: CommonSettings, *, data_dir: Path) -> faust.App:
    """A Faust app on our broker with RocksDB tables (rocksdict) and no web server."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return faust.App(
        app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="rocksdb://",
        datadir=str(data_dir),
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        topic_allow_declare=True,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        web_enabled=False,
        table_standby_replicas=0,
        broker_commit_interval=1.0,
        # A killed worker's partitions move after this long, not after Faust's 60 s default.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
        table_cleanup_interval=30.0,
        autodiscover=False,
    )


def table_changelogs(app: faust.App) -> list[Topic]:
    """The compacted changelog topic of every table the app declared."""
    return [
        Topic(table.changelog_topic_name, f"changelog of the {name} table", compacted=True)
        for name, table in app.tables.items()
    ]


def run_worker(app: faust.App, settings: CommonSettings) -> None:
    """Run the worker once its tables' changelogs exist with the right partitions.

    Faust would create them itself, but lazily: a record processed before the topic shows up
    in metadata fails its table's partition check (on a brand-new stack, every one did).
    """
    prepare_topics(settings, table_changelogs(app))
    Worker(
        app, loglevel=settings.log_level.upper(), override_logging=False
    ).execute_from_commandline()


def record_of(event: Any) -> Record:
    """A Faust stream event as the library-neutral `Record` (raw key and value bytes)."""
    message = event.message
    key = message.key.decode() if isinstance(message.key, bytes) else None
    value = event.value if isinstance(event.value, bytes) else b""
    return Record(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=key,
        value=value,
    )
