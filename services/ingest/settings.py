"""Ingest settings."""

from __future__ import annotations

from pydantic import Field, SecretStr

from shared.settings import CommonSettings
from shared.system_events import is_waypost_source

# The write key of the local stack and the demo; never configure it in production.
DEV_WRITE_KEY = "wp_dev_write_key"


class IngestSettings(CommonSettings):
    ingest_host: str = "127.0.0.1"
    ingest_port: int = 8000
    # "source:key" pairs, comma-separated; several keys per source allow rotation.
    ingest_write_keys: str = f"dev:{DEV_WRITE_KEY}"
    max_event_bytes: int = Field(default=32 * 1024, gt=0)
    max_batch_bytes: int = Field(default=500 * 1024, gt=0)
    # The SMS provider's auth token, which signs its status callbacks (X-Twilio-Signature);
    # the default matches the local provider sandbox.
    sms_auth_token: SecretStr = SecretStr("waypost-sandbox-sms-token")

    def write_keys(self) -> dict[str, str]:
        """Key -> source name."""
        keys: dict[str, str] = {}
        for pair in self.ingest_write_keys.split(","):
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
