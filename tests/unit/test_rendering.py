"""Dispatcher rendering in the Jinja2 sandbox, the variables a template reads (the shape
conditions read), and what to do with a replayed send request."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from services.dispatcher.domain.outcomes import resume_action
from shared.conditions import condition_from, evaluate, event_facts, facts_of
from shared.contracts import Event, Profile, SendRequest
from shared.rendering import (
    EmailTemplate,
    RenderError,
    TemplateSyntax,
    UndefinedVariable,
    render_email,
    render_text,
    render_variables,
    template_variables,
)

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)


def send_request(traits: dict[str, Any], properties: dict[str, Any] | None = None) -> SendRequest:
    profile = Profile(
        contact_key="user-1", traits=traits, first_seen=T0, last_seen=T0, updated_at=T0
    )
    return SendRequest(
        message_id="msg-1",
        contact_key="user-1",
        channel="email",
        template_id="welcome",
        journey_id="welcome",
        journey_version=1,
        instance_id="inst-1",
        step_id="welcome-email",
        requested_at=T0,
        profile=profile,
        context={"trigger": {"event": "Registered", "properties": properties or {}}},
    )


def render(template: EmailTemplate, traits: dict[str, Any], **properties: Any) -> Any:
    return render_email(template, render_variables(send_request(traits, properties)))


def test_contact_traits_and_trigger_properties_fill_the_template() -> None:
    template = EmailTemplate(
        subject="Welcome, {{ contact.first_name }}!",
        text="Hi {{ contact.first_name }}, enjoy the {{ event.plan }} plan.",
    )

    email = render(template, {"first_name": "Ada"}, plan="pro")

    assert email.subject == "Welcome, Ada!"
    assert email.text == "Hi Ada, enjoy the pro plan."
    assert email.html is None


def _entered_by(properties: dict[str, Any], traits: dict[str, Any]) -> tuple[Event, Profile]:
    event = Event.model_validate(
        {
            "type": "track",
            "event": "Trial Started",
            "userId": "user-1",
            "messageId": "m-1",
            "timestamp": T0,
            "receivedAt": T0,
            "properties": properties,
        }
    )
    profile = Profile(
        contact_key="user-1",
        user_id="user-1",
        traits=traits,
        tags=("vip",),
        segments=("trials",),
        first_seen=T0,
        last_seen=T0,
        updated_at=T0,
    )
    return event, profile


def test_a_template_reads_the_paths_a_condition_reads() -> None:
    event, profile = _entered_by({"plan": "pro", "seats": 3}, {"first_name": "Ada"})
    context = {"trigger": event_facts(event), "entered_at": T0.isoformat()}
    variables = template_variables(profile, context, "trial", 2)
    facts = facts_of(profile, event=event, context=context)
    paths = [
        "event.name",
        "event.properties.plan",
        "event.properties.seats",
        "traits.first_name",
        "tags",
        "segments",
        "contact.key",
        "contact.user_id",
        "context.trigger.properties.plan",
    ]

    for path in paths:
        found, value = facts.read(path)
        assert found, path
        assert render_text("{{ " + path + " }}", variables) == str(value), path
    # A condition written the same way holds.
    holds = condition_from({"field": "event.properties.plan", "op": "eq", "value": "pro"})
    assert evaluate(holds, facts, T0)


def test_short_forms_read_properties_and_traits_where_no_field_has_the_name() -> None:
    event, profile = _entered_by(
        {"plan": "pro", "name": "Lamp", "type": "x"}, {"first_name": "Ada", "key": "k"}
    )
    variables = template_variables(profile, {"trigger": event_facts(event)}, "trial", 1)

    rendered = render_text(
        "{{ event.plan }} {{ contact.first_name }} | {{ event.name }} {{ event.type }}"
        " {{ contact.key }} | {{ event.properties.name }} {{ traits.key }}",
        variables,
    )

    assert rendered == "pro Ada | Trial Started track user-1 | Lamp k"


def test_the_roots_are_those_of_the_conditions_plus_journey() -> None:
    event, profile = _entered_by({}, {})
    context = {"trigger": event_facts(event)}
    variables = template_variables(profile, context, "trial", 1)
    facts = facts_of(profile, event=event, context=context)
    roots = {"traits", "tags", "segments", "consent", "aggregates", "contact", "event", "context"}

    assert all(facts.read(root)[0] for root in roots)
    assert set(variables) == roots | {"journey"}


def test_an_undefined_variable_and_a_syntax_error_are_told_apart() -> None:
    with pytest.raises(UndefinedVariable, match="'user' is undefined"):
        render_text("{{ user.name }}", {})
    with pytest.raises(TemplateSyntax):
        render_text("{{ user.name ", {})
    with pytest.raises(RenderError, match="ZeroDivisionError") as caught:
        render_text("{{ 1 // 0 }}", {})
    assert not isinstance(caught.value, UndefinedVariable | TemplateSyntax)


def test_jinja_globals_are_there_and_a_variable_of_the_same_name_wins() -> None:
    # The environment hands each template its globals as one dict (`make_globals`).
    looped = "{% for n in range(3) %}{{ n }}{% endfor %}{% set ns = namespace(x=2) %}{{ ns.x }}"
    assert render_text(looped, {}) == "0122"
    assert render_text("{{ range }}", {"range": "from the data"}) == "from the data"
    assert render_text("{{ range(2) | list }}", {}) == "[0, 1]"


def test_template_can_read_contact_key_and_journey() -> None:
    template = EmailTemplate(
        subject="s", text="{{ contact.key }} {{ journey.id }}/{{ journey.version }}"
    )

    assert render(template, {}).text == "user-1 welcome/1"


def test_subject_is_stripped_of_surrounding_whitespace() -> None:
    email = render(EmailTemplate(subject="  Hello  \n", text="t"), {})

    assert email.subject == "Hello"


def test_a_missing_variable_is_a_render_error() -> None:
    template = EmailTemplate(subject="Hi {{ contact.first_name }}", text="t")

    with pytest.raises(RenderError, match="first_name"):
        render(template, {"email": "ada@example.com"})


def test_a_missing_variable_in_html_is_a_render_error() -> None:
    template = EmailTemplate(subject="s", text="t", html="<p>{{ contact.nickname }}</p>")

    with pytest.raises(RenderError, match="nickname"):
        render(template, {})


@pytest.mark.parametrize(
    "expression",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ contact.__class__ }}",
        "{{ contact.__init__.__globals__ }}",
        "{{ event.items.__self__ }}",
    ],
)
def test_the_sandbox_refuses_unsafe_attribute_access(expression: str) -> None:
    with pytest.raises(RenderError):
        render(EmailTemplate(subject="s", text=expression), {})


def test_a_syntax_error_in_a_template_is_a_render_error() -> None:
    with pytest.raises(RenderError):
        render(EmailTemplate(subject="s", text="{% if %}"), {})


def test_html_escapes_a_trait_holding_markup() -> None:
    template = EmailTemplate(subject="s", text="t", html="<p>Hi {{ contact.first_name }}</p>")

    email = render(template, {"first_name": "<script>alert(1)</script>"})

    assert email.html == "<p>Hi &lt;script&gt;alert(1)&lt;/script&gt;</p>"


def test_the_text_part_is_not_escaped() -> None:
    template = EmailTemplate(subject="s", text="Hi {{ contact.first_name }}")

    assert render(template, {"first_name": "Tom & Jerry"}).text == "Hi Tom & Jerry"


def test_a_subject_rendering_to_several_lines_is_a_render_error() -> None:
    template = EmailTemplate(subject="Hi {{ contact.first_name }}", text="t")

    with pytest.raises(RenderError, match="more than one line"):
        render(template, {"first_name": "Ada\nBcc: everyone@example.com"})


@pytest.mark.parametrize(
    ("state", "transactional", "action"),
    [
        ("requested", False, "send"),
        ("requested", True, "send"),
        ("sending", False, "unknown"),
        ("sending", True, "send"),
        ("sent", False, "done"),
        ("sent", True, "done"),
        ("failed", False, "done"),
        ("failed", True, "done"),
        ("skipped", False, "done"),
        ("skipped", True, "done"),
        ("unknown", False, "done"),
        ("unknown", True, "done"),
    ],
)
def test_resume_action_for_a_replayed_request(state: str, transactional: bool, action: str) -> None:
    assert resume_action(state, transactional) == action
