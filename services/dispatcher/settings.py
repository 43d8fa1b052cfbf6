"""Dispatcher settings."""

from __future__ import annotations

from pydantic import Field, SecretStr

from shared.settings import CommonSettings


class DispatcherSettings(CommonSettings):
    group_id: str = "waypost-dispatcher"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False
    smtp_use_tls: bool = False
    smtp_timeout_seconds: float = Field(default=30.0, gt=0)
    email_from: str = "Waypost <hello@waypost.local>"
    message_id_domain: str = "waypost.local"
    max_in_flight: int = Field(default=32, ge=1)
    send_attempts: int = Field(default=4, ge=1)
