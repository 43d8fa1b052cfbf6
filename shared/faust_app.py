"""One way to build a Faust app for the stream workers (segmenter, orchestrator)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import faust
import structlog
from confluent_kafka import KafkaException
from faust.stores.rocksdb import Store as RocksDBStore
from faust.types.enums import ProcessingGuarantee
from faust.worker import Worker
from rocksdict import AccessType

from shared.kafka import Record, prepare_topics
from shared.restore import OFFSET_KEY, TableStore, restore
from shared.settings import CommonSettings
from shared.topics import Topic

log = structlog.get_logger(__name__)


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


def table_stores(app: faust.App) -> list[TableStore]:
    """Each RocksDB table's changelog with Faust's own paths and options for its partitions."""
    stores = []
    for table in app.tables.values():
        store = table.data  # the store Faust itself will use: same paths, same options
        if not isinstance(store, RocksDBStore) or not store.use_rocksdict or store.read_only:
            continue
        if store.offset_key != OFFSET_KEY:
            raise RuntimeError(f"Faust keeps table offsets under {store.offset_key!r} now")
        ttl = store.rocksdb_options.ttl
        stores.append(
            TableStore(
                changelog=table.changelog_topic_name,
                path_of=store.partition_path,
                options=store.rocksdb_options.as_options,
                access_type=(
                    AccessType.read_write if ttl is None else partial(AccessType.with_ttl, ttl)
                ),
            )
        )
    return stores


def restore_tables(app: faust.App, settings: CommonSettings) -> None:
    """Bring the tables' local databases to the end of their changelogs in bulk, before Faust
    starts (its own recovery applies one record at a time). Every partition is restored, as the
    assignment is not known yet; Faust then reads only what was written since. A broker that
    fails the restore leaves each database at a consistent offset, and Faust does the rest."""
    stores = table_stores(app)
    if not stores:
        return
    # Read what Faust's own consumer would: committed records only under exactly-once.
    guarantee: object = app.conf.processing_guarantee  # Faust's stubs type it as the class
    exactly_once = guarantee == ProcessingGuarantee.EXACTLY_ONCE
    try:
        done = restore(
            settings.kafka_bootstrap,
            stores,
            client_id=f"{app.conf.id}-restore",
            read_committed=exactly_once,
        )
    except KafkaException as exc:
        log.warning("worker.restore_failed", error=str(exc))
        return
    log.info(
        "worker.tables_restored",
        tables=len(stores),
        partitions=done.partitions,
        records=done.records,
        megabytes=round(done.bytes / 2**20, 1),
        seconds=round(done.seconds, 3),
        complete=done.complete,
        locked=done.locked,
        by_topic=done.by_topic,
    )


def run_worker(app: faust.App, settings: CommonSettings, *, bulk_restore: bool = True) -> None:
    """Run the worker once its tables' changelogs exist with the right partitions and, unless
    `bulk_restore` is off, its tables were restored in bulk (`restore_tables`).

    Faust would create the changelogs itself, but lazily: a record processed before the topic
    shows up in metadata fails its table's partition check (on a brand-new stack, every one did).
    """
    prepare_topics(settings, table_changelogs(app))
    if bulk_restore:
        restore_tables(app, settings)
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
