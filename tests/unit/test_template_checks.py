"""The publish check of templates: each is rendered by the dispatcher's renderer against a
sample of its trigger and profile, and an undefined variable refuses the journey, naming the
step and the template; the sample has the shape the dispatcher renders with."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.cli import load_journey_file, main
from shared.conditions import event_facts
from shared.contracts import Event, Profile
from shared.journeys import JourneyFile
from shared.lifecycle import Publish, Refused, decide_publish
from shared.rendering import template_variables
from shared.template_checks import (
    SAMPLE,
    Sample,
    sample_variables,
    template_problems,
    undefined_path,
)

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "journeys"


def journey(text: str, *, html: str | None = None, stored: bool = False) -> JourneyFile:
    """A trial journey: a coupon, then a send of template `offer` (shipped unless `stored`)."""
    return JourneyFile.model_validate(raw_journey(text, html=html, stored=stored))


def raw_journey(text: str, *, html: str | None = None, stored: bool = False) -> dict[str, Any]:
    template: dict[str, Any] = {"subject": "Your trial", "text": text}
    if html is not None:
        template["html"] = html
    raw: dict[str, Any] = {
        "journey": {
            "id": "trial",
            "name": "Trial",
            "trigger": {"type": "event", "event": "Trial Started", "where": {"plan": "pro"}},
            "steps": [
                {"id": "code", "type": "coupon", "prefix": "TRY", "save_as": "coupon"},
                {"id": "offer-mail", "type": "send", "template": "offer"},
            ],
        }
    }
    if not stored:
        raw["templates"] = {"offer": template}
    return raw


@pytest.mark.parametrize(
    "text",
    [
        # The shape conditions read, and the short forms.
        "{{ event.properties.plan }} {{ event.plan }} {{ event.name }} {{ event.timestamp[:10] }}",
        "{{ traits.first_name }} {{ contact.first_name }} {{ contact.key }} {{ tags | join(',') }}",
        "{% if 'vip' in segments %}{{ aggregates.orders + 1 }}{% endif %} {{ consent.email }}",
        "{{ context.coupon.code }} {{ context.trigger.properties.plan }} {{ context.entered_at }}",
        "{{ journey.id }} v{{ journey.version }}",
        # Any use of a value the data decides: numbers, lists, mappings, filters, methods.
        "{% for line in event.products | default([event.properties]) %}{{ line.name }}{% endfor %}",
        "{{ 100 // contact.orders }} {{ '*' * contact.stars }} {{ event.price | round(2) }}",
        "{{ '%.2f' | format(event.price) }} {{ event.plan.upper() }} {{ contact.first_seen.year }}",
        "{% set name = contact.first_name | default('there') %}Hi {{ name }}",
        # A fault of the sample's values is not the template's: only names are judged.
        "{{ contact | tojson }}",
    ],
)
def test_templates_reading_what_the_dispatcher_passes_are_accepted(text: str) -> None:
    assert template_problems(journey(text), {}) == []


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("Hi {{ first_name }}", "'first_name' is undefined"),
        ("Hi {{ user.name }}", "'user' is undefined"),
        ("{{ journey.name }}", "reads 'journey.name', which is not defined"),
        ("{{ context.discount.code }}", "reads 'context.discount', which is not defined"),
        ("{{ context.trigger.plan }}", "reads 'context.trigger.plan', which is not defined"),
        ("{{ event.name.first }}", "reads 'event.name.first', which is not defined"),
    ],
)
def test_an_undefined_variable_refuses_naming_the_step_the_template_and_the_variable(
    text: str, named: str
) -> None:
    [problem] = template_problems(journey(text), {})

    assert (problem.journey, problem.step, problem.rule) == (
        "trial",
        "offer-mail",
        "template-variables",
    )
    assert problem.message.startswith(f"template 'offer', text: {named}; ")
    assert "docs/journeys.md" in problem.message
    assert str(problem).startswith("journey 'trial', step 'offer-mail': template 'offer', text")


def test_every_field_is_checked_html_too() -> None:
    [problem] = template_problems(journey("fine", html="<p>{{ profile.name }}</p>"), {})
    assert problem.message.startswith("template 'offer', html: 'profile' is undefined")


def test_a_stored_template_is_checked_from_its_document() -> None:
    stored = {"offer": {"channel": "email", "subject": "Hi", "text": "{{ usr.plan }}"}}

    [problem] = template_problems(journey("", stored=True), stored)

    assert problem.message.startswith("template 'offer', text: 'usr' is undefined")
    assert template_problems(journey("", stored=True), {}) == []  # missing: readiness says so


def test_data_values_are_checked_by_name() -> None:
    raw = {
        "journey": {
            "id": "drop",
            "name": "Drop",
            "trigger": {"type": "event", "event": "Price Dropped"},
            "steps": [{"id": "tell", "type": "send", "channel": "push", "template": "p"}],
        },
        "templates": {
            "p": {
                "channel": "push",
                "subject": "{{ event.properties.name }}",
                "text": "now {{ event.new_price }}",
                "data": {"sku": "{{ event.product_id }}", "who": "{{ recipient }}"},
            }
        },
    }

    [problem] = template_problems(JourneyFile.model_validate(raw), {})

    assert problem.message.startswith("template 'p', data.who: 'recipient' is undefined")


def test_publishing_refuses_a_journey_whose_template_reads_an_undefined_variable() -> None:
    decision = decide_publish(journey("{{ contact.first_name }} {{ plan }}"), [], {}, T0)

    assert isinstance(decision, Refused)
    assert decision.rules() == {"template-variables"}
    assert isinstance(decide_publish(journey("{{ event.properties.plan }}"), [], {}, T0), Publish)


def test_waypost_check_refuses_the_file_naming_the_step_and_the_template(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "trial.yaml"
    path.write_text(yaml.safe_dump(raw_journey("Enjoy {{ event.properties.plan }}, {{ name }}")))

    assert main(["check", str(path)]) == 2

    said = capsys.readouterr().err
    assert said.startswith(f"{path}: journey 'trial', step 'offer-mail': template 'offer', text:")
    assert "'name' is undefined" in said
    path.write_text(yaml.safe_dump(raw_journey("Enjoy {{ event.properties.plan }}")))
    assert main(["check", str(path)]) == 0


def test_every_example_journey_passes_the_check() -> None:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        assert template_problems(load_journey_file(path), {}) == [], path.name


def test_the_sample_has_the_shape_the_dispatcher_renders_with() -> None:
    """The check and the dispatcher cannot drift apart: same roots, same fields of `contact`,
    `event`, `context.trigger` and `journey`."""
    event = Event.model_validate(
        {
            "type": "track",
            "event": "Trial Started",
            "userId": "ada",
            "messageId": "m-1",
            "timestamp": T0,
            "receivedAt": T0,
            "properties": {},
        }
    )
    profile = Profile(contact_key="ada", first_seen=T0, last_seen=T0, updated_at=T0)
    context = {"trigger": event_facts(event), "entered_at": T0.isoformat()}
    sent = template_variables(profile, context, "trial", 1)
    sample = sample_variables(journey("x"))

    assert set(sample) == set(sent)
    for root in ("contact", "event", "journey"):
        assert set(sample[root]) == set(sent[root]), root
    assert set(sample["context"]["trigger"]) == set(sent["context"]["trigger"])
    assert set(sent["context"]) <= set(sample["context"])
    assert sample["event"]["name"] == "Trial Started"


def test_a_sample_stands_for_any_value() -> None:
    assert isinstance(SAMPLE.anything["key"](1).more, Sample)
    assert list(SAMPLE) == [SAMPLE]
    assert (int(SAMPLE), float(SAMPLE), str(SAMPLE), len(SAMPLE)) == (1, 1.0, "sample", 1)
    assert 3 + SAMPLE is SAMPLE
    with pytest.raises(AttributeError):
        _ = SAMPLE._private


def test_the_undefined_path_is_found_below_a_known_root() -> None:
    variables = {"journey": {"id": "j"}, "event": {"name": "E"}}
    assert undefined_path("{{ journey['name'] }}", variables) == "journey.name"
    assert undefined_path("{{ event.name.lower() }}{{ journey.x.y }}", variables) == "journey.x"
    assert undefined_path("{% for j in list %}{{ j.x }}{% endfor %}", variables) is None
