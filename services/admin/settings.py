"""Admin settings."""

from __future__ import annotations

from pydantic import Field

from shared.secrets import Secret
from shared.settings import CommonSettings

# The admin key of the local stack and the demo; never configure it in production.
DEV_ADMIN_KEY = "wp_dev_admin_key"


class AdminSettings(CommonSettings):
    admin_host: str = "127.0.0.1"
    admin_port: int = 8001
    # Comma-separated bearer keys; separate from ingest write keys, never accepted there.
    admin_api_keys: str = DEV_ADMIN_KEY
    group_id: str = "waypost-admin"
    # A request body's cap, as sent and decompressed: a journey draft with its templates fits.
    admin_max_body_bytes: int = Field(default=2 * 1024 * 1024, gt=0)

    def secrets(self) -> list[Secret]:
        keys = sorted(self.api_keys()) or [""]
        return [*super().secrets(), *(Secret("WAYPOST_ADMIN_API_KEYS", key) for key in keys)]

    def api_keys(self) -> set[str]:
        return {k.strip() for k in self.admin_api_keys.split(",") if k.strip()}
