"""Template rendering in a Jinja2 sandbox with strict undefined variables (pure), and the
variables a template reads: the dispatcher renders with it, and publishing checks templates
with it (`shared.template_checks`).

Whatever goes wrong while rendering for a contact (a variable the contact lacks, a division by
zero, a value of the wrong type, a result over the size bound) is a RenderError: the send is
skipped with the reason instead of going out as "Hello ," or stopping the stream.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from jinja2 import (
    StrictUndefined,
    Template,
    TemplateError,
    TemplateSyntaxError,
    UndefinedError,
    nodes,
)
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

from shared.conditions import profile_facts
from shared.contracts import Profile, SendRequest

# The most one rendered template field may hold, in UTF-8 bytes. Email parts (subject, text,
# HTML) get 1 MiB each, far above any real mail; SMS, push and WeChat fields get 64 KiB, above
# anything their providers accept (1,600 SMS characters, a 4 KB FCM message), whose own limits
# are checked after rendering. Output is measured as it is produced, so a runaway loop stops
# at the bound instead of filling the worker's memory.
EMAIL_RENDER_LIMIT = 1 << 20
FIELD_RENDER_LIMIT = 64 << 10
# Compiled template sources kept (per escaping mode): a few per live template and channel.
COMPILED_TEMPLATES = 512
# Integer powers up to this many bits; `2 ** 10000000000` would fill the worker's memory.
MAX_POWER_BITS = 4096

# Every variable a template reads, as docs/journeys.md ("Template variables") lists them and the
# admin's template editor shows them: (the variable, in Markdown; what it holds). A unit test
# holds the document's table to this list.
TEMPLATE_VARIABLES: tuple[tuple[str, str], ...] = (
    (
        "`traits.<name>`",
        "the contact's traits (`traits.first_name`, `traits.plan`)",
    ),
    (
        "`tags`",
        "the contact's tags, a list (`{% if 'vip' in tags %}`)",
    ),
    (
        "`segments`",
        "the ids of the segments the contact is in, a list",
    ),
    (
        "`consent.<channel>`",
        "the contact's consent per channel",
    ),
    (
        "`aggregates.<id>`",
        "the values of the published aggregates for the contact",
    ),
    (
        "`contact.key`, `contact.user_id`, `contact.first_seen`, `contact.last_seen`, "
        "`contact.event_counts`",
        "the contact itself (first and last seen are date-times)",
    ),
    (
        "`contact.<trait>`",
        "short form of `traits.<trait>`, for a trait not named like a field above",
    ),
    (
        "`event.name`, `event.type`, `event.message_id`, `event.timestamp`",
        "the event that entered the contact into the journey (its name, `track`/`identify`/…, its"
        " id, its time as ISO 8601 text)",
    ),
    (
        "`event.properties.<name>`, `event.traits.<name>`",
        "that event's properties and traits",
    ),
    (
        "`event.<property>`",
        "short form of `event.properties.<property>`, for a property not named like a field above",
    ),
    (
        "`context.<name>`",
        "the instance's context: `context.trigger` (the trigger event, as `event`, without short "
        "forms), `context.entered_at`, `context.variant.<step>`, `context.goals.<id>`, and what "
        "steps write (`context.<coupon save_as>.code`, captured values, the owner under the "
        "assign step's `attribute`, a wait's or a webhook's `save_as`, by default the step id)",
    ),
    (
        "`journey.id`, `journey.version`",
        "the journey version the instance runs",
    ),
)


class _BoundedEnvironment(SandboxedEnvironment):
    """The sandbox, with `*` and `**` refused before they build a value over the bound."""

    intercepted_binops = frozenset({"*", "**"})

    def make_globals(self, d: MutableMapping[str, Any] | None) -> MutableMapping[str, Any]:
        # A template's globals as one plain dict, not Jinja's ChainMap over the environment's:
        # every render copies them into its context, and copying a ChainMap goes key by key
        # in Python (about 6 µs a render). Nothing changes the globals after start-up.
        return {**self.globals, **(d or {})}

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for sequence, times in ((left, right), (right, left)):
                if (
                    isinstance(sequence, str | bytes | list | tuple)
                    and isinstance(times, int)
                    and len(sequence) * times > EMAIL_RENDER_LIMIT
                ):
                    raise OverflowError(
                        f"repeating {len(sequence)} items {times} times is over the "
                        f"render bound of {EMAIL_RENDER_LIMIT} bytes"
                    )
        elif (
            isinstance(left, int)
            and isinstance(right, int)
            and abs(left) > 1
            and right * abs(left).bit_length() > MAX_POWER_BITS
        ):
            raise OverflowError(f"{left} ** {right} is over {MAX_POWER_BITS} bits")
        return super().call_binop(context, operator, left, right)


_ENV = _BoundedEnvironment(undefined=StrictUndefined, autoescape=False)
_HTML_ENV = _BoundedEnvironment(undefined=StrictUndefined, autoescape=True)


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


class UndefinedVariable(RenderError):
    """The template reads a variable (or a field of one) that the variables do not hold."""


class TemplateSyntax(RenderError):
    """The template is not valid Jinja2: it renders for nobody."""


def render_variables(request: SendRequest) -> dict[str, Any]:
    """What a template can read when the dispatcher sends `request` (see `template_variables`)."""
    return template_variables(
        request.profile, request.context, request.journey_id, request.journey_version
    )


def template_variables(
    profile: Profile, context: Mapping[str, Any], journey_id: str, journey_version: int
) -> dict[str, Any]:
    """The variables of a template: the roots a condition reads, in the same shape (`traits`,
    `tags`, `segments`, `consent`, `aggregates`, `contact`, `event`, `context`), and `journey`.

    `event` is the trigger event as conditions see it (`event.name`, `event.properties.plan`);
    short forms keep working where no field of the same name exists: `event.plan` for a
    property, `contact.first_name` for a trait (`event.name` is the event's name, and
    `contact.key` the contact's key, whatever the properties and traits hold).
    """
    roots = profile_facts(profile)
    trigger: Mapping[str, Any] = context.get("trigger") or {}
    properties = trigger.get("properties") or {}
    return {
        **roots,
        "contact": {**profile.traits, **roots["contact"]},
        "event": {**properties, **trigger},
        "context": context,
        "journey": {"id": journey_id, "version": journey_version},
    }


def render_text(
    source: str,
    variables: dict[str, Any],
    *,
    html: bool = False,
    limit: int = FIELD_RENDER_LIMIT,
) -> str:
    """Render one template source (HTML-escaped when `html`) to at most `limit` UTF-8 bytes.

    Any failure of the template for these variables is a RenderError naming the error; only a
    MemoryError, which is the worker's, goes through.
    """
    try:
        template = _compiled(source, html)
        parts: list[str] = []
        size = 0
        for part in template.generate(variables):
            size += len(part.encode("utf-8"))  # also refuses lone surrogates, as SMTP would
            if size > limit:
                raise RenderError(f"renders to more than {limit} bytes")
            parts.append(part)
        return "".join(parts)
    except (RenderError, MemoryError):
        raise
    except UndefinedError as exc:
        raise UndefinedVariable(str(exc)) from exc
    except TemplateSyntaxError as exc:
        raise TemplateSyntax(str(exc)) from exc
    except TemplateError as exc:
        raise RenderError(str(exc)) from exc
    except Exception as exc:  # a template's runtime fault is the recipient's, not the worker's
        raise RenderError(f"{type(exc).__name__}: {exc}") from exc


def parse_template(source: str) -> nodes.Template:
    """The syntax tree of a template source, as the renderer reads it (to inspect, not render)."""
    return _ENV.parse(source)


@lru_cache(maxsize=COMPILED_TEMPLATES)
def _compiled(source: str, html: bool) -> Template:
    """A template source compiled once: a campaign renders the same few sources for every
    contact, and compiling costs more than rendering (a syntax error is raised each time)."""
    return (_HTML_ENV if html else _ENV).from_string(source)


def breaks_line(value: str) -> bool:
    """Whether `value` holds a line break of any kind (CR, LF, U+2028, …): a header or an
    address that does would smuggle in lines of its own."""
    return value.splitlines() != [value] and value != ""


def render_email(template: EmailTemplate, variables: dict[str, Any]) -> RenderedEmail:
    """Subject (one line), text and HTML parts, each within EMAIL_RENDER_LIMIT."""
    parts: dict[str, str] = {}
    for name, source in (("subject", template.subject), ("text", template.text)):
        try:
            parts[name] = render_text(source, variables, limit=EMAIL_RENDER_LIMIT)
        except RenderError as exc:
            raise RenderError(f"{name}: {exc}") from exc
    html = None
    if template.html:
        try:
            html = render_text(template.html, variables, html=True, limit=EMAIL_RENDER_LIMIT)
        except RenderError as exc:
            raise RenderError(f"html: {exc}") from exc
    subject = parts["subject"].strip()
    if breaks_line(subject):
        raise RenderError("subject renders to more than one line")
    return RenderedEmail(subject=subject, text=parts["text"], html=html)
