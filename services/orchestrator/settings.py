"""Orchestrator settings."""

from __future__ import annotations

from pydantic import Field

from shared.settings import StreamSettings


class OrchestratorSettings(StreamSettings):
    app_id: str = "waypost-orchestrator"
    timer_tick_seconds: float = Field(default=0.2, gt=0)
    # Fired timers per publish round; each round waits for Kafka's acknowledgements.
    timer_fire_batch: int = Field(default=1000, ge=1)
    # A fired timer the engine has not answered yet fires again after this, then after doubling
    # delays up to the maximum (the record was lost, or the engine could not act on it yet).
    timer_refire_seconds: float = Field(default=30.0, gt=0)
    timer_refire_max_seconds: float = Field(default=900.0, gt=0)
    # How often every worker checks the audience schedules (only partition 0's owner acts).
    audience_tick_seconds: float = Field(default=1.0, gt=0)
