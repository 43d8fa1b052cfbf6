"""The publish check of a journey's templates: each is rendered by the dispatcher's renderer
(`shared.rendering`) against a sample of its trigger and profile, and a variable the templates
do not have is refused, naming the step and the template.

The sample knows the shape of the variables, not the data: any trait or event property is
there (only the contact and the event at send time say whether they hold it), while a root
that does not exist (`user.name`), a field `journey` lacks or a context no step writes is
undefined. The sample answers every use of a value (text, number, list, mapping) so only a
name that cannot exist is refused; a branch the sample does not take is not rendered.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from jinja2 import nodes

from shared.journey_checks import DefinitionProblem, context_written
from shared.journeys import (
    AttributeChangedTrigger,
    AudienceTrigger,
    EventTrigger,
    JourneyFile,
    ObjectEventTrigger,
    SegmentTrigger,
    SendStep,
    TagAddedTrigger,
    Trigger,
)
from shared.rendering import (
    EMAIL_RENDER_LIMIT,
    RenderError,
    TemplateSyntax,
    UndefinedVariable,
    parse_template,
    render_text,
)
from shared.system_events import (
    ATTRIBUTE_CHANGED,
    AUDIENCE_SELECTED,
    SEGMENT_ENTERED,
    SEGMENT_LEFT,
    TAG_ADDED,
)

# The template fields the channels render (Jinja2 sources), and `data`'s values.
RENDERED_FIELDS = ("subject", "text", "html", "url", "image_url")
_SAMPLE_TIME = datetime(2026, 1, 1, 9, 0, tzinfo=UTC)
VARIABLES_HINT = (
    "a template reads traits, tags, segments, consent, aggregates, contact, event, context "
    "and journey (docs/journeys.md, 'Template variables')"
)


class Sample:
    """A value from a contact's data, unknown until send time: text, a number, a list of one
    sample, or a mapping whose every field is a sample."""

    # Read by the sandbox before a call: a sample is safe to call and changes nothing.
    unsafe_callable = False
    alters_data = False
    jinja_pass_arg = None

    def __getattr__(self, name: str) -> Sample:
        if name.startswith("_"):
            raise AttributeError(name)
        return SAMPLE

    def __getitem__(self, _key: Any) -> Sample:
        return SAMPLE

    def __call__(self, *_args: Any, **_kwargs: Any) -> Sample:
        return SAMPLE

    def __iter__(self) -> Iterator[Sample]:
        return iter((SAMPLE,))

    def __len__(self) -> int:
        return 1

    def __contains__(self, _item: Any) -> bool:
        return True

    def __bool__(self) -> bool:
        return True

    def __str__(self) -> str:
        return "sample"

    def __int__(self) -> int:
        return 1

    def __index__(self) -> int:
        return 1

    def __float__(self) -> float:
        return 1.0

    def __round__(self, _digits: int | None = None) -> Sample:
        return SAMPLE

    def _same(self, *_other: Any) -> Sample:
        return SAMPLE

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _same
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = _same
    __mod__ = __rmod__ = __pow__ = __rpow__ = __neg__ = __pos__ = __abs__ = _same

    def _unordered(self, _other: Any) -> bool:
        return False

    __lt__ = __le__ = __gt__ = __ge__ = _unordered

    def __eq__(self, other: object) -> bool:
        return other is self

    def __hash__(self) -> int:
        return 0


SAMPLE = Sample()


class WithShortForms(dict[str, Any]):
    """A root with its own fields, where any other name is a short form read as a sample (a
    trait under `contact`, a property under `event`)."""

    def __missing__(self, _key: str) -> Sample:
        return SAMPLE


def trigger_event_name(trigger: Trigger) -> str:
    """The name of the event that enters a contact by this trigger."""
    if isinstance(trigger, EventTrigger | ObjectEventTrigger):
        return trigger.event
    if isinstance(trigger, SegmentTrigger):
        return SEGMENT_ENTERED if trigger.on == "entered" else SEGMENT_LEFT
    if isinstance(trigger, TagAddedTrigger):
        return TAG_ADDED
    if isinstance(trigger, AttributeChangedTrigger):
        return ATTRIBUTE_CHANGED
    assert isinstance(trigger, AudienceTrigger)
    return AUDIENCE_SELECTED


def sample_variables(journey_file: JourneyFile) -> dict[str, Any]:
    """What a template of this journey reads, as `shared.rendering.template_variables` builds it
    at send time, with samples where only the data can tell."""
    journey = journey_file.journey
    # The trigger as the instance's context keeps it (`shared.conditions.event_facts`).
    trigger = {
        "name": trigger_event_name(journey.trigger),
        "type": "track",
        "message_id": "sample-message",
        "timestamp": _SAMPLE_TIME.isoformat(),
        "properties": SAMPLE,
        "traits": SAMPLE,
    }
    context: dict[str, Any] = dict.fromkeys(context_written(journey), SAMPLE)
    context.update(trigger=trigger, entered_at=_SAMPLE_TIME.isoformat())
    return {
        "traits": SAMPLE,
        "tags": SAMPLE,
        "segments": SAMPLE,
        "consent": SAMPLE,
        "aggregates": SAMPLE,
        "contact": WithShortForms(
            key="sample-contact",
            user_id="sample-contact",
            first_seen=_SAMPLE_TIME,
            last_seen=_SAMPLE_TIME,
            event_counts=SAMPLE,
        ),
        "event": WithShortForms(trigger),
        "context": context,
        "journey": {"id": journey.id, "version": journey.version},
    }


def template_sources(template: Mapping[str, Any]) -> Iterator[tuple[str, str, bool]]:
    """(field, Jinja2 source, HTML-escaped) of every field of a template the channels render."""
    for name in RENDERED_FIELDS:
        source = template.get(name)
        if isinstance(source, str) and source:
            yield name, source, name == "html"
    data = template.get("data")
    if isinstance(data, Mapping):
        for key, source in data.items():
            if isinstance(source, str) and source:
                yield f"data.{key}", source, False


def template_problems(
    journey_file: JourneyFile, stored: Mapping[str, Mapping[str, Any]]
) -> list[DefinitionProblem]:
    """A problem for every template a send step uses (shipped in the file, else `stored`) that
    reads an undefined variable or is not valid Jinja2; each template is checked once, under
    the first step that uses it."""
    journey = journey_file.journey
    variables = sample_variables(journey_file)
    problems: list[DefinitionProblem] = []
    checked: set[str] = set()
    for step in journey.steps:
        if not isinstance(step, SendStep):
            continue
        for choice in step.choices:
            if choice.template in checked:
                continue
            checked.add(choice.template)
            shipped = journey_file.templates.get(choice.template)
            template = shipped.model_dump() if shipped is not None else stored.get(choice.template)
            if template is None:
                continue  # a missing template is the readiness check's to report
            for field, source, html in template_sources(template):
                message = _refusal(source, variables, html)
                if message is not None:
                    problems.append(
                        DefinitionProblem(
                            journey=journey.id,
                            step=step.id,
                            rule="template-variables",
                            message=f"template '{choice.template}', {field}: {message}",
                        )
                    )
    return problems


def _refusal(source: str, variables: dict[str, Any], html: bool) -> str | None:
    try:
        render_text(source, variables, html=html, limit=EMAIL_RENDER_LIMIT)
    except UndefinedVariable as exc:
        return undefined_message(source, variables, exc)
    except TemplateSyntax as exc:
        return f"not a valid template: {exc}"
    except RenderError:
        return None  # a fault of the sample's values, not of the template's names
    return None


def undefined_message(source: str, variables: Mapping[str, Any], error: UndefinedVariable) -> str:
    """How a read of an undefined variable is worded, at publish and in the editor's preview:
    the dotted path it reads, and where the variables are listed."""
    path = undefined_path(source, variables)
    said = f"reads '{path}', which is not defined" if path is not None else str(error)
    return f"{said}; {VARIABLES_HINT}"


def undefined_path(source: str, variables: Mapping[str, Any]) -> str | None:
    """The first dotted path the template reads (`journey.name`) that `variables` lack below a
    root they have, to name it in the refusal (Jinja2 says only "'dict object' has no
    attribute 'name'"); None when none is found."""
    for chain in _chains(parse_template(source)):
        missing = _missing(chain, variables)
        if missing is not None:
            return missing
    return None


def _chains(tree: nodes.Template) -> Iterator[tuple[str, ...]]:
    """Every `name.attr['key']…` the template reads, as the names along it."""
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        parts: list[str] = []
        current: nodes.Node = node
        while isinstance(current, nodes.Getattr | nodes.Getitem):
            if isinstance(current, nodes.Getattr):
                parts.append(current.attr)
            elif isinstance(current.arg, nodes.Const) and isinstance(current.arg.value, str):
                parts.append(current.arg.value)
            else:
                parts.clear()  # an index computed at render time: read from there on
            current = current.node
        if isinstance(current, nodes.Name) and parts:
            yield (current.name, *reversed(parts))


def _missing(chain: tuple[str, ...], variables: Mapping[str, Any]) -> str | None:
    if chain[0] not in variables:
        return None  # a name the template sets itself, or a missing root Jinja2 names already
    value = variables[chain[0]]
    for depth, part in enumerate(chain[1:], start=2):
        if isinstance(value, Sample):
            return None
        if isinstance(value, Mapping) and (part in value or isinstance(value, WithShortForms)):
            value = value[part]
        elif hasattr(value, part):
            value = getattr(value, part)
        else:
            return ".".join(chain[:depth])
    return None
