"""Secrets a service refuses to start with: empty, published, placeholders, or too short.

Each service names the secrets it uses (`Secret`, with the environment variable that sets it)
and calls `require_strong` before it serves. Outside `WAYPOST_ENV=dev` (what the local stack,
the demo and the tests set) a weak secret stops the start with a message naming every variable
at fault; in dev it is only logged.

Waypost's own secrets (the link-signing, coupon, suppression and erasure secrets, admin and write
keys) must hold at least 32 bytes. A provider's credential (an SMS auth token, a WeChat app
secret, an SMTP password) has the length its provider gives it, and may be left empty to turn its
channel off: only published defaults (the local sandbox's) and placeholders count against it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)

MIN_SECRET_BYTES = 32

# Values published in this repository (defaults, the local stack, examples): anyone has them.
PUBLISHED = frozenset(
    {
        "waypost-dev-link-secret",
        "change-me-dev-link-secret",
        "waypost-dev-coupon-secret",
        "change-me-dev-coupon-secret",
        "waypost-dev-suppression-secret",
        "change-me-dev-suppression-secret",
        "waypost-dev-erasure-secret",
        "change-me-dev-erasure-secret",
        "waypost-dev-audit-secret",
        "change-me-dev-audit-secret",
        "wp_dev_admin_key",
        "wp_dev_write_key",
        "dev-admin-key",
        "dev-write-key",
        "waypost-sandbox-sms-token",
        "waypost-sandbox-wechat-secret",
        "waypost-sandbox-email-events-key",
        "waypost-dev-kafka-password",
    }
)
PLACEHOLDER = re.compile(
    r"change[-_ ]?me|replace[-_ ]?me|placeholder|your[-_ ]|example|x{4,}|\btodo\b|^<.*>$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Secret:
    """One secret a service uses: the variable that sets it, its value, and the least length
    it must have (0: its provider decides)."""

    variable: str
    value: str | None
    min_bytes: int = MIN_SECRET_BYTES
    # A provider's credential may be left empty: its channel is then off.
    optional: bool = False


def provider_credential(variable: str, value: str | None) -> Secret:
    """A provider's credential: empty turns its channel off, any length its provider gives."""
    return Secret(variable, value, min_bytes=0, optional=True)


def weakness(secret: Secret) -> str | None:
    """Why the secret must not be used, or None."""
    value = secret.value or ""
    if not value.strip():
        return None if secret.optional else "is empty"
    if value in PUBLISHED:
        return "is a default published with Waypost"
    if PLACEHOLDER.search(value):
        return "looks like a placeholder"
    if len(value.encode()) < secret.min_bytes:
        return f"is shorter than {secret.min_bytes} bytes"
    return None


class WeakSecrets(Exception):
    """A service was configured with secrets it must not start with."""


def require_strong(env: str, secrets: Iterable[Secret]) -> None:
    """Raise `WeakSecrets` naming every weak secret, unless `env` is "dev" (then log them)."""
    problems = [f"{s.variable} {why}" for s in secrets if (why := weakness(s)) is not None]
    if not problems:
        return
    if env == "dev":
        log.warning("secrets.weak_in_dev", problems=problems)
        return
    raise WeakSecrets(
        "refusing to start: "
        + "; ".join(problems)
        + f". Set each to a random value (at least {MIN_SECRET_BYTES} bytes for Waypost's own "
        "secrets and keys, e.g. `openssl rand -hex 32`), or set WAYPOST_ENV=dev on a local stack."
    )


def enforce(env: str, secrets: Iterable[Secret]) -> None:
    """`require_strong` at a service's start: a refusal is logged and ends the process (exit
    status 2) before it serves anything."""
    try:
        require_strong(env, secrets)
    except WeakSecrets as exc:
        log.error("secrets.refused", reason=str(exc))
        raise SystemExit(2) from None
