"""Email, pure: the content rendered from a template (tracked links, the one-click unsubscribe
link of list mail) and what an SMTP reply means."""

from __future__ import annotations

from dataclasses import dataclass

from services.dispatcher.channels.common import TemplateDocument
from services.dispatcher.domain.messages import MessageContent, RenderContext
from services.dispatcher.domain.outcomes import Outcome
from shared.links import track_email, urls_written_in
from shared.rendering import EmailTemplate, render_email


@dataclass(frozen=True)
class EmailContent(MessageContent):
    subject: str
    text: str
    html: str | None = None
    # Signed links the message carries (List-Unsubscribe; None leaves the headers out).
    unsubscribe_url: str | None = None


def render(
    template: TemplateDocument, variables: dict[str, object], context: RenderContext
) -> EmailContent:
    """Subject, text and HTML; the links written in the template rewritten for tracking (not
    those that came from data); list mail gets its unsubscribe link (transactional mail, such
    as receipts and resets, is not list mail)."""
    source = EmailTemplate(
        subject=template.get("subject") or "",
        text=template.get("text") or "",
        html=template.get("html"),
    )
    rendered = render_email(source, dict(variables))
    html, text = track_email(
        rendered.html,
        rendered.text,
        context.links,
        context.claims,
        opens=context.track_opens,
        clicks=context.track_clicks,
        template_urls=urls_written_in(source.text, source.html),
    )
    links = context.links
    unsubscribe = None if context.transactional else links.unsubscribe_url(context.claims)
    return EmailContent(rendered.subject, text, html, unsubscribe)


def sender_refused(code: int, message: str) -> Outcome:
    """The server refused our envelope sender: our configuration, unless it is temporary."""
    if 400 <= code < 500:
        return Outcome("retry", f"smtp {code}: {message}", code=str(code))
    return Outcome("config", f"smtp sender {code}: {message}", code=str(code))


def reply_outcome(code: int, message: str) -> Outcome:
    """A refusal of the recipient or the message: temporary (4xx) or for good (5xx)."""
    if 400 <= code < 500:
        return Outcome("retry", f"smtp {code}: {message}", code=str(code))
    return Outcome("recipient", f"smtp {code}: {message}", code=str(code), address_invalid=True)
