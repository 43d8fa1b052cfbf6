"""Sessions of the admin web UI: a signed cookie that names the admin key by its name (never
its secret), and the CSRF token every form carries, derived from the session.

Pure: the session id, the time and the signing secret come in from the caller."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

COOKIE = "waypost_session"
# The form field that carries the CSRF token.
CSRF_FIELD = "csrf_token"
_VERSION = "s1"
_SEPARATOR = "|"
# A cookie longer than this is not read at all (browsers cap a cookie near 4 KB anyway).
MAX_TOKEN_CHARS = 512


@dataclass(frozen=True)
class Session:
    """A browser's session: `key_name` is None until a key signed in."""

    session_id: str
    key_name: str | None
    expires_at: datetime

    @property
    def signed_in(self) -> bool:
        return self.key_name is not None


def session_secret(configured: str | None, key_secrets: Iterable[str]) -> bytes:
    """The signing secret: the configured one, else one derived from every admin key, so every
    process of the admin agrees and removing or rotating keys ends the sessions signed before."""
    if configured:
        return hashlib.sha256(b"waypost-ui-session\x00" + configured.encode()).digest()
    digest = hashlib.sha256(b"waypost-ui-session-from-keys")
    for secret in sorted(key_secrets):
        digest.update(hashlib.sha256(secret.encode()).digest())
    return digest.digest()


def issue(secret: bytes, session: Session) -> str:
    """The cookie value of `session`: its fields and their signature, URL-safe."""
    payload = _SEPARATOR.join(
        (
            _VERSION,
            session.session_id,
            session.key_name or "",
            str(int(session.expires_at.timestamp())),
        )
    )
    return f"{_b64(payload.encode())}.{_b64(_sign(secret, 'session', payload))}"


def read(secret: bytes, token: str | None, now: datetime) -> Session | None:
    """The session a cookie holds; None when it is absent, malformed, tampered with or expired."""
    if not token or len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
        return None
    encoded, signature = token.split(".")
    try:
        payload = _unb64(encoded).decode()
        presented = _unb64(signature)
    except ValueError:
        return None
    if not hmac.compare_digest(presented, _sign(secret, "session", payload)):
        return None
    parts = payload.split(_SEPARATOR)
    if len(parts) != 4 or parts[0] != _VERSION or not parts[1] or not parts[3].isdigit():
        return None
    expires_at = datetime.fromtimestamp(int(parts[3]), tz=UTC)
    if expires_at <= now:
        return None
    return Session(parts[1], parts[2] or None, expires_at)


def csrf_token(secret: bytes, session: Session) -> str:
    """The token the session's forms carry: bound to the session id and the key signed in, so a
    token from before sign-in is no good after it."""
    return _b64(_sign(secret, "csrf", f"{session.session_id}{_SEPARATOR}{session.key_name or ''}"))


def csrf_holds(secret: bytes, session: Session | None, presented: str | None) -> bool:
    """Whether a form's token is the one its session issued (compared in constant time)."""
    if session is None or not presented:
        return False
    expected = csrf_token(secret, session)
    return hmac.compare_digest(presented.encode("utf-8", "replace"), expected.encode())


def _sign(secret: bytes, purpose: str, payload: str) -> bytes:
    return hmac.new(secret, f"{purpose}{_SEPARATOR}{payload}".encode(), hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError("not base64") from exc
