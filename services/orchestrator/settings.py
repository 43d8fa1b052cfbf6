"""Orchestrator settings."""

from __future__ import annotations

from pydantic import Field

from shared.settings import CommonSettings


class OrchestratorSettings(CommonSettings):
    app_id: str = "waypost-orchestrator"
    timer_tick_seconds: float = Field(default=0.2, gt=0)
