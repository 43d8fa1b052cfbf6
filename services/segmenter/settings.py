"""Segmenter settings."""

from __future__ import annotations

from shared.settings import CommonSettings


class SegmenterSettings(CommonSettings):
    app_id: str = "waypost-segmenter"
