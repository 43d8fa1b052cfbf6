"""Orchestrator settings."""

from __future__ import annotations

from pydantic import Field, SecretStr

from shared.secrets import Secret
from shared.settings import StreamSettings

# The coupon secret of the local stack and the tests; never configure it in production.
DEV_COUPON_SECRET = "waypost-dev-coupon-secret"  # noqa: S105


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
    # Keys the coupon codes journeys issue (HMAC-SHA256): without it nobody can work out another
    # contact's code from their key and the journey. Changing it changes the codes issued from
    # then on (issued ones stay valid where they are stored), so every worker needs the same one.
    coupon_secret: SecretStr = SecretStr(DEV_COUPON_SECRET)

    def secrets(self) -> list[Secret]:
        return [
            *super().secrets(),
            Secret("WAYPOST_COUPON_SECRET", self.coupon_secret.get_secret_value()),
        ]

    def coupon_key(self) -> bytes:
        """The key the engine issues coupon codes with."""
        return self.coupon_secret.get_secret_value().encode()
