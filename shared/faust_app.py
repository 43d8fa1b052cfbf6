"""One way to build a Faust app for the stream workers (segmenter, orchestrator)."""

from __future__ import annotations

from pathlib import Path

import faust

from shared.settings import CommonSettings


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
