"""Admin settings."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator

from services.admin.domain.audit import ContactDigest
from services.admin.domain.roles import AdminKey, parse_admin_keys
from shared.secrets import Secret
from shared.settings import CommonSettings, OptionalSwitch

# The admin key of the local stack and the demo; never configure it in production.
DEV_ADMIN_KEY = "wp_dev_admin_key"
# The audit secret of the local stack and the demo: shorter than any secret production accepts.
DEV_AUDIT_SECRET = "waypost-dev-audit-secret"  # noqa: S105


class AdminSettings(CommonSettings):
    admin_host: str = "127.0.0.1"
    admin_port: int = 8001
    # Comma-separated `name:role:key` entries (role: viewer, editor or publisher); a bare key is
    # a publisher named key-1, key-2, … (services/admin/domain/roles.py). Separate from ingest
    # write keys, never accepted there.
    admin_api_keys: SecretStr = SecretStr(DEV_ADMIN_KEY)
    # /docs, /redoc and /openapi.json; unset: served only with WAYPOST_ENV=dev.
    admin_api_docs: OptionalSwitch = None
    group_id: str = "waypost-admin"
    # A request body's cap, as sent and decompressed: a journey draft with its templates fits.
    admin_max_body_bytes: int = Field(default=2 * 1024 * 1024, gt=0)
    # The web UI's sessions (docs/ui.md): signed with this secret, else with one derived from
    # the admin keys; how long one lasts; whether its cookie is sent over HTTPS only.
    admin_session_secret: SecretStr | None = None
    admin_session_hours: float = Field(default=12.0, gt=0, le=24 * 30)
    admin_session_cookie_secure: bool = False
    # Keys the digest that names a contact in the audit log and the access log (an HMAC), so
    # that reading them does not let anyone test guessed keys or e-mail addresses. Keep it:
    # a new secret names the same contact otherwise, and `/v1/audit?contact=` finds only the
    # entries written since.
    admin_audit_secret: SecretStr = SecretStr(DEV_AUDIT_SECRET)
    # How often each segment's live count is recorded for its count-over-time chart.
    admin_count_interval_seconds: float = Field(default=300.0, ge=1, le=86_400)
    # Whether the admin keeps each contact's recent events for its timeline (the
    # `recent_events` view). It costs the document store about as much as the profile view
    # (docs/ui.md); off, the timeline shows journey steps and messages only, and what was kept
    # is dropped when the admin starts.
    admin_recent_events: bool = True

    def secrets(self) -> list[Secret]:
        keys = self.admin_keys()
        session = []
        if self.admin_session_secret is not None:
            session = [
                Secret("WAYPOST_ADMIN_SESSION_SECRET", self.admin_session_secret.get_secret_value())
            ]
        audit = Secret("WAYPOST_ADMIN_AUDIT_SECRET", self.admin_audit_secret.get_secret_value())
        if not keys:
            return [*super().secrets(), *session, audit, Secret("WAYPOST_ADMIN_API_KEYS", "")]
        return [
            *super().secrets(),
            *session,
            audit,
            *(Secret(f"WAYPOST_ADMIN_API_KEYS ({key.name})", key.secret) for key in keys),
        ]

    def contact_digest(self) -> ContactDigest:
        """How the audit log and the access log name a contact."""
        return ContactDigest(self.admin_audit_secret.get_secret_value().encode())

    def admin_keys(self) -> tuple[AdminKey, ...]:
        return parse_admin_keys(self.admin_api_keys.get_secret_value())

    def serves_api_docs(self) -> bool:
        return self.api_docs_on(self.admin_api_docs)

    @model_validator(mode="after")
    def _keys_parse(self) -> AdminSettings:
        self.admin_keys()  # raises, naming each entry at fault by position and name
        return self
