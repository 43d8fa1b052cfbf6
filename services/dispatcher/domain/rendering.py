"""Template rendering in a Jinja2 sandbox with strict undefined variables (pure).

A template that reads a variable the contact lacks is an error, so the send is skipped with a
reason instead of going out as "Hello ,".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from shared.contracts import SendRequest

_ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
_HTML_ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=True)


@dataclass(frozen=True)
class EmailTemplate:
    subject: str
    text: str
    html: str | None = None


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str | None


class RenderError(Exception):
    """The template could not be rendered for this contact; the message says why."""


def render_variables(request: SendRequest) -> dict[str, Any]:
    """What a template can read: the contact's traits, the trigger event, the instance context."""
    trigger = request.context.get("trigger", {})
    return {
        "contact": {**request.profile.traits, "key": request.contact_key},
        "event": trigger.get("properties", {}),
        "context": request.context,
        "journey": {"id": request.journey_id, "version": request.journey_version},
    }


def render_text(source: str, variables: dict[str, Any], *, html: bool = False) -> str:
    """Render one template source (HTML-escaped when `html`); RenderError says why it failed."""
    try:
        return (_HTML_ENV if html else _ENV).from_string(source).render(variables)
    except TemplateError as exc:
        raise RenderError(str(exc)) from exc


def render_email(template: EmailTemplate, variables: dict[str, Any]) -> RenderedEmail:
    try:
        subject = _ENV.from_string(template.subject).render(variables).strip()
        text = _ENV.from_string(template.text).render(variables)
        html = _HTML_ENV.from_string(template.html).render(variables) if template.html else None
    except TemplateError as exc:
        raise RenderError(str(exc)) from exc
    if "\n" in subject or "\r" in subject:
        raise RenderError("subject renders to more than one line")
    return RenderedEmail(subject=subject, text=text, html=html)
