"""Segmenter settings."""

from __future__ import annotations

from shared.settings import CommonSettings


class SegmenterSettings(CommonSettings):
    app_id: str = "waypost-segmenter"
    # How often changed member counts are published (they are exact; this is only their pace).
    count_interval_seconds: float = 0.5
    # How often the worker looks for contacts evaluated against older segment definitions.
    backfill_check_seconds: float = 2.0
    # A batch is up to this many records, or what arrived within this many milliseconds: its
    # outputs are acknowledged once, then its rows stored, then its offsets committed.
    batch_max_records: int = 500
    batch_max_ms: float = 20.0
