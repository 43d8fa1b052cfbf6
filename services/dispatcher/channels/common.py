"""What the channels share (pure): rendering a template's fields, reading provider answers,
token lifetimes, and the outcome of a request that got no answer."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, Protocol

from services.dispatcher.domain.outcomes import Outcome
from shared.clock import Clock
from shared.rendering import RenderError, breaks_line, render_text

# A stored template document: channel, subject, text, html, and optionally url, image_url,
# wechat_template_id and data (names to Jinja sources).
TemplateDocument = Mapping[str, Any]

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


def render_field(
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


def single_line(name: str, value: str | None) -> str:
    value = (value or "").strip()
    if not value:
        raise RenderError(f"{name}: renders empty")
    if breaks_line(value):
        raise RenderError(f"{name}: renders to more than one line")
    return value


def render_url(template: TemplateDocument, name: str, variables: dict[str, Any]) -> str | None:
    value = (render_field(template, name, variables) or "").strip()
    if not value:
        return None
    if not _HTTP_URL.fullmatch(value):
        raise RenderError(f"{name}: {value!r} is not an http(s) URL")
    return value


def render_data(template: TemplateDocument, variables: dict[str, Any]) -> dict[str, str]:
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


def refresh_at(obtained_at: float, expires_in: float, margin: float) -> float:
    """When a token obtained at `obtained_at` should be replaced: `margin` seconds before it
    expires, but never before half its life (a short-lived token is still used)."""
    return obtained_at + expires_in - min(margin, expires_in / 2)


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


def classify_http_failure(channel: str, status: int, retry_after: float | None = None) -> Outcome:
    """An HTTP status where the provider always answers 200: overload or a wrong endpoint."""
    reason = f"{channel} HTTP {status}"
    if status == 429 or status >= 500:
        return Outcome("retry", reason, code=str(status), retry_after=retry_after)
    return Outcome("config", reason, code=str(status))


def as_int(value: object) -> int | None:
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


def or_default(value: float | None, default: float) -> float:
    return default if value is None else value
