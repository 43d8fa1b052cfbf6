"""SMS through a Twilio-style REST API, pure: the content rendered from a template, the form of
a Messages.json POST, and what an answer means."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from services.dispatcher.channels.common import TemplateDocument, as_int, render_field
from services.dispatcher.domain.messages import MessageContent, RenderContext
from services.dispatcher.domain.outcomes import Outcome
from shared.rendering import RenderError


@dataclass(frozen=True)
class SmsContent(MessageContent):
    body: str
    # Where the provider reports delivery (a signed ingest URL); None asks for no reports.
    status_callback: str | None = None


# Twilio refuses longer bodies (21617) for every contact alike, so it is a template problem.
SMS_MAX_CHARS = 1600


def render_sms(
    template: TemplateDocument, variables: dict[str, Any], status_callback: str | None
) -> SmsContent:
    """The SMS body is the template's text, stripped."""
    body = (render_field(template, "text", variables) or "").strip()
    if not body:
        raise RenderError("sms body renders empty")
    if len(body) > SMS_MAX_CHARS:
        raise RenderError(f"sms body: {len(body)} characters, over the limit of {SMS_MAX_CHARS}")
    return SmsContent(body=body, status_callback=status_callback)


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


def classify_sms(
    status: int, body: Mapping[str, Any] | None, retry_after: float | None = None
) -> Outcome:
    """A Twilio-style Messages.json answer: HTTP status plus the error body's `code`."""
    body = body or {}
    if 200 <= status < 300:
        sid = body.get("sid")
        return Outcome("sent", provider_id=str(sid) if sid else None)
    code = as_int(body.get("code"))
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


def render(
    template: TemplateDocument, variables: dict[str, Any], context: RenderContext
) -> SmsContent:
    """The SMS, with the signed URL the provider reports its delivery to."""
    callback = context.links.sms_status_url(replace(context.claims, kind="sms_status"))
    return render_sms(template, variables, callback)
