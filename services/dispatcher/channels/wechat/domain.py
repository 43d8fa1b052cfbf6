"""WeChat Official Account messages, pure: template or news content rendered from a template,
the request bodies, token lifetimes, and what an answer means."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from services.dispatcher.channels.common import (
    TemplateDocument,
    render_data,
    render_field,
    render_url,
    single_line,
    take_first_url,
)
from services.dispatcher.domain.messages import MessageContent, RenderContext
from services.dispatcher.domain.outcomes import Outcome
from shared.rendering import RenderError


@dataclass(frozen=True)
class WechatContent(MessageContent):
    """A template message (`template_id` + `data`) or a customer-service news/text message."""

    kind: Literal["template", "news", "text"]
    title: str = ""
    description: str = ""
    url: str | None = None
    image_url: str | None = None
    template_id: str | None = None
    data: Mapping[str, str] = field(default_factory=dict)


# WeChat's daily quotas reset at midnight Beijing time.
WECHAT_QUOTA_ZONE = "Asia/Shanghai"

WECHAT_TOKEN_ERRCODES = frozenset({40001, 40014, 42001})


def render_wechat(template: TemplateDocument, variables: dict[str, Any]) -> WechatContent:
    """A template message when the template names a WeChat template id, otherwise a news card."""
    template_id = template.get("wechat_template_id")
    if template_id is not None and not isinstance(template_id, str):
        raise RenderError("wechat_template_id: must be a string")
    if template_id and template_id.strip():
        return WechatContent(
            kind="template",
            template_id=template_id.strip(),
            data=render_data(template, variables),
            url=render_url(template, "url", variables),
        )
    title = single_line("subject", render_field(template, "subject", variables, required=True))
    text = render_field(template, "text", variables) or ""
    url = render_url(template, "url", variables)
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
        image_url=render_url(template, "image_url", variables),
    )


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


def wechat_refresh_margin(expires_in: float) -> float:
    """Refresh when less than 5 minutes or 10% of the token's life remain."""
    return max(300.0, expires_in / 10)


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


def seconds_until_quota_reset(now: datetime) -> float:
    """Seconds from `now` until the next midnight in China (WeChat's daily quotas)."""
    local = now.astimezone(ZoneInfo(WECHAT_QUOTA_ZONE))
    midnight = datetime.combine(local.date() + timedelta(days=1), time(), tzinfo=local.tzinfo)
    # Subtract in UTC: aware datetimes sharing a tzinfo subtract as wall times.
    return (midnight.astimezone(UTC) - now.astimezone(UTC)).total_seconds()


def render(
    template: TemplateDocument, variables: dict[str, Any], _context: RenderContext
) -> WechatContent:
    return render_wechat(template, variables)
