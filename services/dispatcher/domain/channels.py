"""SMS, push and WeChat content rendered from a stored template, the request bodies the providers
expect, and what each provider's answer means as an `Outcome` (pure: the adapters do the I/O).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime, time, timedelta
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from services.dispatcher.domain.messages import PushContent, SmsContent, WechatContent
from services.dispatcher.domain.outcomes import Outcome
from services.dispatcher.domain.rendering import RenderError, breaks_line, render_text
from shared.clock import Clock

# A stored template document: channel, subject, text, html, and optionally url, image_url,
# wechat_template_id and data (names to Jinja sources).
TemplateDocument = Mapping[str, Any]

# Twilio refuses longer bodies (21617) for every contact alike, so it is a template problem.
SMS_MAX_CHARS = 1600
# FCM refuses a larger message for this contact only; measured on the whole request body.
FCM_MAX_MESSAGE_BYTES = 4096
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
# An FCM access token is replaced this many seconds before it expires.
FCM_REFRESH_MARGIN = 300.0
# Data keys FCM rejects (INVALID_ARGUMENT), plus the one the dispatcher adds itself.
FCM_RESERVED_KEYS = frozenset({"from", "notification", "message_type", "waypost_message_id"})
FCM_RESERVED_PREFIXES = ("google.", "gcm.")
# WeChat's daily quotas reset at midnight Beijing time.
WECHAT_QUOTA_ZONE = "Asia/Shanghai"
WECHAT_TOKEN_ERRCODES = frozenset({40001, 40014, 42001})

_HTTP_URL = re.compile(r"https?://\S+", re.IGNORECASE)
_URL_IN_TEXT = re.compile(r"https?://[^\s<>\"']+", re.IGNORECASE)
_TRAILING_PUNCTUATION = ".,;:!?"


class AccessTokenError(Exception):
    """No access token could be had for a provider; `outcome` says retry or configuration."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome


class MonotonicClock(Clock, Protocol):
    """A clock that also measures durations (token lifetimes) immune to wall-clock steps."""

    def monotonic(self) -> float: ...


# ---------------------------------------------------------------------------------- rendering


def render_sms(
    template: TemplateDocument, variables: dict[str, Any], status_callback: str | None
) -> SmsContent:
    """The SMS body is the template's text, stripped."""
    body = (_render_field(template, "text", variables) or "").strip()
    if not body:
        raise RenderError("sms body renders empty")
    if len(body) > SMS_MAX_CHARS:
        raise RenderError(f"sms body: {len(body)} characters, over the limit of {SMS_MAX_CHARS}")
    return SmsContent(body=body, status_callback=status_callback)


def render_push(template: TemplateDocument, variables: dict[str, Any]) -> PushContent:
    """Title from the subject (one line), body from the text, data values and image URL."""
    title = _single_line("subject", _render_field(template, "subject", variables, required=True))
    body = (_render_field(template, "text", variables) or "").strip()
    data = _render_data(template, variables)
    for key in data:
        if key in FCM_RESERVED_KEYS or key.startswith(FCM_RESERVED_PREFIXES):
            raise RenderError(f"data.{key}: the name is reserved for push messages")
    image_url = _render_url(template, "image_url", variables)
    return PushContent(title=title, body=body, data=data, image_url=image_url)


def render_wechat(template: TemplateDocument, variables: dict[str, Any]) -> WechatContent:
    """A template message when the template names a WeChat template id, otherwise a news card."""
    template_id = template.get("wechat_template_id")
    if template_id is not None and not isinstance(template_id, str):
        raise RenderError("wechat_template_id: must be a string")
    if template_id and template_id.strip():
        return WechatContent(
            kind="template",
            template_id=template_id.strip(),
            data=_render_data(template, variables),
            url=_render_url(template, "url", variables),
        )
    title = _single_line("subject", _render_field(template, "subject", variables, required=True))
    text = _render_field(template, "text", variables) or ""
    url = _render_url(template, "url", variables)
    description = text.strip()
    if url is None:
        url, description = take_first_url(text)
        if url is None:
            raise RenderError(
                "url: a WeChat news message needs a link; set url or put an http(s) URL in the text"
            )
    return WechatContent(
        kind="news",
        title=title,
        description=description,
        url=url,
        image_url=_render_url(template, "image_url", variables),
    )


def take_first_url(text: str) -> tuple[str | None, str]:
    """The first http(s) URL in `text` and the text without it (stripped)."""
    match = _URL_IN_TEXT.search(text)
    if match is None:
        return None, text.strip()
    url = match.group(0).rstrip(_TRAILING_PUNCTUATION)
    # A closing parenthesis belongs to the URL only when the URL opened it: "(see https://x/y)".
    while url.endswith(")") and url.count(")") > url.count("("):
        url = url[:-1].rstrip(_TRAILING_PUNCTUATION)
    left = text[: match.start()].rstrip(" \t")
    right = text[match.start() + len(url) :].lstrip(" \t")
    if left.endswith("\n") and right.startswith("\n"):
        right = right[1:]  # the URL had a line of its own
    # Rejoin with a space only inside a line, and not before punctuation that followed the URL.
    joins_words = bool(left and right) and not left.endswith("\n") and right[0] not in "\n.,;:!?)"
    return url, (left + (" " if joins_words else "") + right).strip()


def _render_field(
    template: TemplateDocument, name: str, variables: dict[str, Any], *, required: bool = False
) -> str | None:
    source = template.get(name)
    if source is None or source == "":
        if required:
            raise RenderError(f"{name}: missing from the template")
        return None
    if not isinstance(source, str):
        raise RenderError(f"{name}: must be a template string")
    try:
        return render_text(source, variables)
    except RenderError as exc:
        raise RenderError(f"{name}: {exc}") from exc


def _single_line(name: str, value: str | None) -> str:
    value = (value or "").strip()
    if not value:
        raise RenderError(f"{name}: renders empty")
    if breaks_line(value):
        raise RenderError(f"{name}: renders to more than one line")
    return value


def _render_url(template: TemplateDocument, name: str, variables: dict[str, Any]) -> str | None:
    value = (_render_field(template, name, variables) or "").strip()
    if not value:
        return None
    if not _HTTP_URL.fullmatch(value):
        raise RenderError(f"{name}: {value!r} is not an http(s) URL")
    return value


def _render_data(template: TemplateDocument, variables: dict[str, Any]) -> dict[str, str]:
    sources = template.get("data")
    if sources is None:
        return {}
    if not isinstance(sources, Mapping):
        raise RenderError("data: must map names to template strings")
    rendered: dict[str, str] = {}
    for key, source in sources.items():
        if not isinstance(key, str) or not key:
            raise RenderError(f"data: {key!r} is not a name")
        if not isinstance(source, str):
            raise RenderError(f"data.{key}: must be a template string")
        try:
            rendered[key] = render_text(source, variables)
        except RenderError as exc:
            raise RenderError(f"data.{key}: {exc}") from exc
    return rendered


# ------------------------------------------------------------------------------ request bodies


def sms_form(
    to: str, content: SmsContent, sender: str, messaging_service_sid: str | None
) -> dict[str, str]:
    """The form of a Twilio-style Messages.json POST; a messaging service picks its own sender."""
    form = {"To": to, "Body": content.body}
    if messaging_service_sid:
        form["MessagingServiceSid"] = messaging_service_sid
    else:
        form["From"] = sender
    if content.status_callback is not None:
        form["StatusCallback"] = content.status_callback
    return form


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


def wechat_request_body(openid: str, content: WechatContent, message_id: str) -> dict[str, Any]:
    """The JSON of a template message (de-duplicated by `client_msg_id`) or a customer-service
    news or text message."""
    if content.kind == "template":
        body: dict[str, Any] = {
            "touser": openid,
            "template_id": content.template_id,
            "data": {key: {"value": value} for key, value in content.data.items()},
            "client_msg_id": message_id,
        }
        if content.url:
            body["url"] = content.url
        return body
    if content.kind == "news":
        article = {"title": content.title, "description": content.description}
        if content.url:
            article["url"] = content.url
        if content.image_url:
            article["picurl"] = content.image_url
        return {"touser": openid, "msgtype": "news", "news": {"articles": [article]}}
    return {
        "touser": openid,
        "msgtype": "text",
        "text": {"content": content.description or content.title},
    }


def wechat_send_path(content: WechatContent) -> str:
    if content.kind == "template":
        return "/cgi-bin/message/template/send"
    return "/cgi-bin/message/custom/send"


# ------------------------------------------------------------------------------ token lifetimes


def refresh_at(obtained_at: float, expires_in: float, margin: float) -> float:
    """When a token obtained at `obtained_at` should be replaced: `margin` seconds before it
    expires, but never before half its life (a short-lived token is still used)."""
    return obtained_at + expires_in - min(margin, expires_in / 2)


def wechat_refresh_margin(expires_in: float) -> float:
    """Refresh when less than 5 minutes or 10% of the token's life remain."""
    return max(300.0, expires_in / 10)


# ------------------------------------------------------------------------------ classification


def answer_object(raw: bytes) -> dict[str, Any] | None:
    """A provider answer's JSON object, or None when it has none (an HTML error page, say)."""
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def retry_after_seconds(header: str | None) -> float | None:
    """A `Retry-After` header in seconds; dates and nonsense are ignored."""
    if header is None:
        return None
    try:
        value = float(header.strip())
    except ValueError:
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return value


def transport_failure(
    channel: str, error: str, *, request_sent: bool, resend_safe: bool = False
) -> Outcome:
    """No answer came: retry when the request never left (or the provider de-duplicates a
    resend), otherwise the message may have arrived."""
    if not request_sent:
        return Outcome("retry", f"{channel} connect: {error}")
    if resend_safe:
        return Outcome("retry", f"{channel} no answer, resend is de-duplicated: {error}")
    return Outcome("unknown", f"{channel} no answer: {error}")


def classify_sms(
    status: int, body: Mapping[str, Any] | None, retry_after: float | None = None
) -> Outcome:
    """A Twilio-style Messages.json answer: HTTP status plus the error body's `code`."""
    body = body or {}
    if 200 <= status < 300:
        sid = body.get("sid")
        return Outcome("sent", provider_id=str(sid) if sid else None)
    code = _as_int(body.get("code"))
    code_text = str(code) if code is not None else str(status)
    reason = f"sms {code_text}: {body.get('message') or f'HTTP {status}'}"
    # Rate limited requests were never processed, so a resend is always safe.
    if status == 429 or code == 20429 or status >= 500:
        return Outcome("retry", reason, code=code_text, retry_after=retry_after)
    if status in (401, 403) or code == 20003:
        return Outcome("config", reason, code=code_text)
    if code in (21211, 21614):
        return Outcome("recipient", reason, code=code_text, address_invalid=True)
    if code == 21610:
        return Outcome("recipient", reason, code=code_text, withdrew_consent=True)
    # 404 (unknown account) and every other refusal (21602 no body, 21603 no sender, 21606 the
    # sender cannot send, ...) hold for every contact alike.
    return Outcome("config", reason, code=code_text)


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
        return Outcome("retry", reason, code=code, retry_after=_or(retry_after, 60.0))
    if code in ("UNAVAILABLE", "INTERNAL") or status >= 500:
        return Outcome("retry", reason, code=code, retry_after=_or(retry_after, 1.0))
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


def classify_wechat(
    errcode: int, errmsg: str | None, msgid: object, message_id: str, now: datetime
) -> Outcome:
    """A WeChat message-send answer (a token errcode here repeated after a fresh token)."""
    code = str(errcode)
    reason = f"wechat {errcode}: {errmsg or 'no message'}"
    if errcode == 0:
        return Outcome("sent", provider_id=str(msgid) if msgid is not None else message_id)
    if errcode in (40003, 43004):
        return Outcome("recipient", reason, code=code, address_invalid=True)
    if errcode == 45015:
        # Outside the customer-service window: the follower is fine, a later message may work.
        return Outcome("recipient", reason, code=code)
    if errcode in (40037, 47003):
        return Outcome("config", reason, code=code)
    if errcode == 45009:
        return Outcome("config", reason, code=code, retry_after=seconds_until_quota_reset(now))
    # -1 (busy), a token rejected twice, and codes nobody listed here.
    return Outcome("retry", reason, code=code)


def classify_wechat_token_failure(errcode: int, errmsg: str | None, now: datetime) -> Outcome:
    """A refused stable_token request: bad app id or secret (or an unlisted IP) is
    configuration, busy is a retry."""
    reason = f"wechat token {errcode}: {errmsg or 'no message'}"
    if errcode in (40002, 40013, 40125, 40164, 41002, 41004):
        return Outcome("config", reason, code=str(errcode))
    if errcode == 45009:
        return Outcome(
            "config", reason, code=str(errcode), retry_after=seconds_until_quota_reset(now)
        )
    return Outcome("retry", reason, code=str(errcode))


def classify_http_failure(channel: str, status: int, retry_after: float | None = None) -> Outcome:
    """An HTTP status where the provider always answers 200: overload or a wrong endpoint."""
    reason = f"{channel} HTTP {status}"
    if status == 429 or status >= 500:
        return Outcome("retry", reason, code=str(status), retry_after=retry_after)
    return Outcome("config", reason, code=str(status))


def seconds_until_quota_reset(now: datetime) -> float:
    """Seconds from `now` until the next midnight in China (WeChat's daily quotas)."""
    local = now.astimezone(ZoneInfo(WECHAT_QUOTA_ZONE))
    midnight = datetime.combine(local.date() + timedelta(days=1), time(), tzinfo=local.tzinfo)
    # Subtract in UTC: aware datetimes sharing a tzinfo subtract as wall times.
    return (midnight.astimezone(UTC) - now.astimezone(UTC)).total_seconds()


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _or(value: float | None, default: float) -> float:
    return default if value is None else value
