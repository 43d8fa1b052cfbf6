"""Orchestrator settings."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator

from services.orchestrator.domain.destinations import DestinationPolicy
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

    # Webhook steps reach public internet addresses only; these open more, comma-separated:
    # CIDRs (`10.20.0.0/16,::1/128`) and host names (`crm.internal`, `.svc.cluster.local`).
    webhook_allowed_networks: str = ""
    webhook_allowed_hosts: str = ""
    # One webhook call, its retries and its wait for a free slot included, ends within this.
    webhook_deadline_seconds: float = Field(default=60.0, gt=0)
    # Webhook calls in flight at once per worker; more wait for a turn.
    webhook_max_in_flight: int = Field(default=32, ge=1)

    def webhook_destinations(self) -> DestinationPolicy:
        """What webhook steps may reach besides the public internet."""
        return DestinationPolicy.parse(
            self.webhook_allowed_networks.split(","), self.webhook_allowed_hosts.split(",")
        )

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        DestinationPolicy.parse(value.split(","), ())  # a bad CIDR stops the start, named
        return value
