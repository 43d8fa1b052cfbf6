"""Ingest settings."""

from __future__ import annotations

import os

from pydantic import Field, SecretStr

from shared.secrets import Secret, provider_credential
from shared.settings import CommonSettings, OptionalSwitch
from shared.system_events import is_waypost_source

# The write key of the local stack and the demo; never configure it in production.
DEV_WRITE_KEY = "wp_dev_write_key"


class IngestSettings(CommonSettings):
    ingest_host: str = "127.0.0.1"
    ingest_port: int = 8000
    # "source:key" pairs, comma-separated; several keys per source allow rotation. Secret: kept
    # out of reprs, logs and validation errors.
    ingest_write_keys: SecretStr = SecretStr(f"dev:{DEV_WRITE_KEY}")
    # /docs, /redoc and /openapi.json; unset: served only with WAYPOST_ENV=dev.
    ingest_api_docs: OptionalSwitch = None
    max_event_bytes: int = Field(default=32 * 1024, gt=0)
    max_batch_bytes: int = Field(default=500 * 1024, gt=0)
    # Worker processes serving the API, each with its own producer; 0 means one per CPU core
    # this process may run on. Set it explicitly where the core count is not the CPU budget
    # (a container with a CPU limit).
    ingest_workers: int = Field(default=0, ge=0)
    # How long the producer waits to fill a batch: latency against broker work per event.
    ingest_linger_ms: float = Field(default=2.0, ge=0)
    # The SMS provider's auth token, which signs its status callbacks (X-Twilio-Signature);
    # empty (the default): SMS is off and every status callback is refused.
    sms_auth_token: SecretStr = SecretStr("")

    def secrets(self) -> list[Secret]:
        keys = sorted(self.write_keys()) or [""]
        return [
            *super().secrets(),
            Secret("WAYPOST_LINK_SECRET", self.link_secret.get_secret_value()),
            *(Secret("WAYPOST_INGEST_WRITE_KEYS", key) for key in keys),
            provider_credential("WAYPOST_SMS_AUTH_TOKEN", self.sms_auth_token.get_secret_value()),
        ]

    def serves_api_docs(self) -> bool:
        return self.api_docs_on(self.ingest_api_docs)

    def worker_count(self) -> int:
        """`ingest_workers`, or the number of cores available when it is 0."""
        return self.ingest_workers or len(os.sched_getaffinity(0))

    def write_keys(self) -> dict[str, str]:
        """Key -> source name."""
        keys: dict[str, str] = {}
        for pair in self.ingest_write_keys.get_secret_value().split(","):
            pair = pair.strip()
            if not pair:
                continue
            source, sep, key = pair.partition(":")
            name = source if sep else "default"
            if is_waypost_source(name):
                raise ValueError(
                    f"ingest_write_keys: the source name '{name}' is reserved for Waypost's own "
                    "events; name the write key's source otherwise"
                )
            keys[key if sep else source] = name
        return keys
