"""Editing templates in the admin: content is saved as a draft and sent only once marked ready.

A template that was never ready is edited in place. Editing a ready template keeps its ready
content on the air (the dispatcher reads the top-level fields of the stored document) and holds
the edit under `draft` until it is marked ready; meanwhile the template counts as a draft, so
journeys that use it cannot be published.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from jinja2 import TemplateSyntaxError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.contracts import Channel
from shared.lifecycle import template_status

_CONTENT = ("channel", "subject", "text", "html", "url", "image_url", "wechat_template_id", "data")
_SYNTAX = SandboxedEnvironment()


class TemplateContent(BaseModel):
    """What a marketer writes: the channel and the Jinja2 sources."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    channel: Channel = "email"
    subject: str | None = None
    text: str = Field(min_length=1)
    html: str | None = None
    url: str | None = None
    image_url: str | None = None
    wechat_template_id: str | None = None
    data: dict[str, str] | None = None

    @field_validator("subject", "text", "html", "url", "image_url")
    @classmethod
    def _jinja_syntax(cls, value: str | None) -> str | None:
        if value is not None:
            _parse(value)
        return value

    @field_validator("data")
    @classmethod
    def _data_syntax(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for source in (value or {}).values():
            _parse(source)
        return value


def _parse(source: str) -> None:
    try:
        _SYNTAX.parse(source)
    except TemplateSyntaxError as exc:
        raise ValueError(f"template syntax, line {exc.lineno}: {exc.message}") from exc


def _content(document: Mapping[str, Any]) -> dict[str, Any]:
    return {name: document.get(name) for name in _CONTENT}


def edited(
    current: Mapping[str, Any] | None, content: TemplateContent, now: datetime
) -> dict[str, Any]:
    """The stored document after saving `content` (without `_id`)."""
    new = content.model_dump()
    if current is None or current.get("status") != "ready":
        return {**new, "status": "draft", "updated_at": now}
    live = {k: v for k, v in current.items() if k not in ("_id", "draft")}
    if _content(current) == new:
        return live  # back to what is on the air: nothing pending
    return {**live, "draft": {**new, "updated_at": now}}


def readied(current: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """The stored document after marking it ready: a pending edit replaces the live content."""
    document = {k: v for k, v in current.items() if k not in ("_id", "draft")}
    pending = current.get("draft")
    if pending:
        return {
            **document,
            **_content(pending),
            "status": "ready",
            "updated_at": pending.get("updated_at", now),
            "ready_at": now,
        }
    if current.get("status") == "ready":
        return document
    return {**document, "status": "ready", "ready_at": now}


def view(template_id: str, document: Mapping[str, Any]) -> dict[str, Any]:
    """The API's answer: the latest content, and what is sent today (None before it is ready)."""
    pending = document.get("draft")
    live = _content(document) if document.get("status") == "ready" else None
    return {
        "id": template_id,
        "status": template_status(document),
        "content": _content(pending) if pending else _content(document),
        "sending": live,
        "updated_at": (pending or document).get("updated_at"),
        "ready_at": document.get("ready_at"),
    }
