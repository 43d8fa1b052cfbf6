"""Segmenter settings."""

from __future__ import annotations

from shared.settings import StreamSettings


class SegmenterSettings(StreamSettings):
    app_id: str = "waypost-segmenter"
    # How often changed member counts are published (they are exact; this is only their pace).
    count_interval_seconds: float = 0.5
    # How often the worker looks for contacts evaluated against older segment definitions.
    backfill_check_seconds: float = 2.0
