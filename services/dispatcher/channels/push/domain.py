"""Mobile push through FCM HTTP v1, pure: the content rendered from a template, the request
body, the service-account assertion, and what an answer means."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from services.dispatcher.channels.common import (
    TemplateDocument,
    or_default,
    render_data,
    render_field,
    render_url,
    single_line,
)
from services.dispatcher.domain.messages import MessageContent, RenderContext
from services.dispatcher.domain.outcomes import Outcome
from shared.rendering import RenderError


@dataclass(frozen=True)
class PushContent(MessageContent):
    title: str
    body: str
    data: Mapping[str, str] = field(default_factory=dict)
    image_url: str | None = None


# FCM refuses a larger message for this contact only; measured on the whole request body.
FCM_MAX_MESSAGE_BYTES = 4096

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"

# An FCM access token is replaced this many seconds before it expires.
FCM_REFRESH_MARGIN = 300.0

# Data keys FCM rejects (INVALID_ARGUMENT), plus the one the dispatcher adds itself.
FCM_RESERVED_KEYS = frozenset({"from", "notification", "message_type", "waypost_message_id"})

FCM_RESERVED_PREFIXES = ("google.", "gcm.")


def render_push(template: TemplateDocument, variables: dict[str, Any]) -> PushContent:
    """Title from the subject (one line), body from the text, data values and image URL."""
    title = single_line("subject", render_field(template, "subject", variables, required=True))
    body = (render_field(template, "text", variables) or "").strip()
    data = render_data(template, variables)
    for key in data:
        if key in FCM_RESERVED_KEYS or key.startswith(FCM_RESERVED_PREFIXES):
            raise RenderError(f"data.{key}: the name is reserved for push messages")
    image_url = render_url(template, "image_url", variables)
    return PushContent(title=title, body=body, data=data, image_url=image_url)


def fcm_request_body(token: str, content: PushContent, message_id: str) -> bytes:
    """The encoded FCM HTTP v1 request; its length is what the 4096-byte limit is checked on."""
    notification = {"title": content.title, "body": content.body}
    if content.image_url:
        notification["image"] = content.image_url
    message = {
        "token": token,
        "notification": notification,
        "data": {**content.data, "waypost_message_id": message_id},
        "android": {"priority": "high"},
        "apns": {"headers": {"apns-priority": "10"}},
    }
    return json.dumps({"message": message}, ensure_ascii=False, separators=(",", ":")).encode()


def fcm_jwt_claims(client_email: str, token_uri: str, issued_at: int) -> dict[str, Any]:
    """Claims of the service-account assertion exchanged for an access token (valid 1 h)."""
    return {
        "iss": client_email,
        "scope": FCM_SCOPE,
        "aud": token_uri,
        "iat": issued_at,
        "exp": issued_at + 3600,
    }


def fcm_error_code(status: int, body: Mapping[str, Any] | None) -> str:
    """The FcmError code of an error answer, else one derived from the HTTP status."""
    error = body.get("error") if body else None
    if isinstance(error, Mapping):
        for detail in error.get("details") or ():
            if isinstance(detail, Mapping) and detail.get("errorCode"):
                return str(detail["errorCode"])
    return _FCM_CODE_BY_STATUS.get(status, f"HTTP_{status}")


# Without an FcmError detail a 403 is a permission of the sender's project, not the token's.
_FCM_CODE_BY_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "UNREGISTERED",
    429: "QUOTA_EXCEEDED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def fcm_needs_new_token(status: int, body: Mapping[str, Any] | None) -> bool:
    """A 401 about our access token (not the APNs/web-push credentials) is cured by a new one."""
    return status == 401 and fcm_error_code(status, body) == "UNAUTHENTICATED"


def classify_fcm(
    status: int, body: Mapping[str, Any] | None, retry_after: float | None = None
) -> Outcome:
    """An FCM HTTP v1 messages:send answer (an UNAUTHENTICATED here came after a refresh)."""
    if 200 <= status < 300:
        name = body.get("name") if body else None
        return Outcome("sent", provider_id=str(name) if name else None)
    code = fcm_error_code(status, body)
    error = body.get("error") if body else None
    message = error.get("message") if isinstance(error, Mapping) else None
    reason = f"fcm {code}: {message or f'HTTP {status}'}"
    if code in ("UNREGISTERED", "SENDER_ID_MISMATCH"):
        return Outcome("recipient", reason, code=code, address_invalid=True)
    if code == "INVALID_ARGUMENT":
        return Outcome("recipient", reason, code=code)
    if code == "QUOTA_EXCEEDED" or status == 429:
        return Outcome("retry", reason, code=code, retry_after=or_default(retry_after, 60.0))
    if code in ("UNAVAILABLE", "INTERNAL") or status >= 500:
        return Outcome("retry", reason, code=code, retry_after=or_default(retry_after, 1.0))
    # THIRD_PARTY_AUTH_ERROR, UNAUTHENTICATED after a fresh token, PERMISSION_DENIED, others.
    return Outcome("config", reason, code=code)


def classify_oauth_failure(
    status: int, body: Mapping[str, Any] | None, retry_after: float | None = None
) -> Outcome:
    """A failed service-account token exchange: a refused grant is configuration."""
    error = str(body.get("error")) if body and body.get("error") else f"HTTP {status}"
    description = body.get("error_description") if body else None
    reason = f"fcm token {error}" + (f": {description}" if description else "")
    if status == 429 or status >= 500:
        return Outcome("retry", reason, code=error, retry_after=retry_after)
    return Outcome("config", reason, code=error)


def render(
    template: TemplateDocument, variables: dict[str, Any], _context: RenderContext
) -> PushContent:
    return render_push(template, variables)
