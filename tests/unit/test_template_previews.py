"""The template editor's pure parts: the preview's variables and field errors (worded as the
publish check words them), the variable list (held to docs/journeys.md), the test send's
request and the addresses a test may go to."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.admin.domain.previews import (
    TEST_JOURNEY,
    PreviewContent,
    SampleEvent,
    address_problem,
    empty_profile,
    preview_variables,
    render_fields,
    send_request_for_test,
    variable_list,
)
from shared.contracts import Profile, SendRequest
from shared.rendering import TEMPLATE_VARIABLES

NOW = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
DOCS = Path(__file__).parents[2] / "docs" / "journeys.md"


def ada() -> Profile:
    return Profile(
        contact_key="u-ada",
        user_id="u-ada",
        traits={"first_name": "Ada", "plan": "pro", "email": "ada@example.com"},
        tags=("vip",),
        first_seen=NOW,
        last_seen=NOW,
        updated_at=NOW,
    )


def test_the_docs_list_exactly_the_variables_the_editor_shows() -> None:
    section = DOCS.read_text().split("## Template variables")[1]
    table = section.split("| variable | what it holds |\n|---|---|\n")[1].split("\n\n")[0]
    rows = [
        tuple(cell.strip() for cell in line.strip().strip("|").split(" | "))
        for line in table.splitlines()
    ]

    assert rows == list(TEMPLATE_VARIABLES)
    assert {"variable": "journey.id, journey.version", "holds": TEMPLATE_VARIABLES[-1][1]} in (
        variable_list()
    )


def test_a_preview_renders_every_field_for_the_contact_and_the_sample_event() -> None:
    content = PreviewContent(
        channel="email",
        subject="Hi {{ traits.first_name }}",
        text="{{ contact.first_name }} on {{ traits.plan }}: {{ event.properties.total }}, "
        "{{ event.total }} ({{ event.name }})",
        html="<p>{{ traits.first_name }} {{ event.note }} {{ 'vip' in tags }}</p>",
    )
    event = SampleEvent(event="Order Completed", properties={"total": 120, "note": "<b>"})

    fields = render_fields(content.model_dump(), preview_variables(ada(), event, NOW))

    assert fields == [
        {"field": "subject", "output": "Hi Ada"},
        {"field": "text", "output": "Ada on pro: 120, 120 (Order Completed)"},
        {"field": "html", "output": "<p>Ada &lt;b&gt; True</p>"},
    ]


def test_an_undefined_variable_is_named_with_its_field_as_at_publish() -> None:
    content = PreviewContent(subject="Hi", text="Your plan: {{ journey.name }}")

    fields = render_fields(content.model_dump(), preview_variables(ada(), None, NOW))

    assert fields[0] == {"field": "subject", "output": "Hi"}
    assert fields[1]["field"] == "text"
    assert fields[1]["error"].startswith("reads 'journey.name', which is not defined; ")


def test_a_trait_the_contact_lacks_and_a_syntax_error_are_shown_per_field() -> None:
    content = PreviewContent(subject="{{ traits.nickname }}", text="{% if %}")

    fields = render_fields(content.model_dump(), preview_variables(ada(), None, NOW))

    # Publishing accepts the name (a trait); only this contact lacks it.
    assert fields[0]["error"].startswith("this contact or event has no 'traits.nickname': ")
    assert fields[1]["error"].startswith("not a valid template: ")


def test_a_contact_with_nothing_known_has_the_roots_but_no_traits() -> None:
    variables = preview_variables(empty_profile("preview-contact", NOW), None, NOW)

    fields = render_fields({"text": "{{ contact.key }} {{ tags|length }}"}, variables)
    missing = render_fields({"text": "{{ traits.first_name }}"}, variables)

    assert fields == [{"field": "text", "output": "preview-contact 0"}]
    assert "error" in missing[0]


def test_a_test_send_is_a_transactional_request_of_the_content_to_the_address() -> None:
    content = PreviewContent(subject="Hi {{ traits.first_name }}", text="Hello")

    request = send_request_for_test("welcome", content, ada(), None, "me@example.org", NOW)
    again = send_request_for_test("welcome", content, ada(), None, "me@example.org", NOW)
    later = send_request_for_test(
        "welcome", content, ada(), None, "me@example.org", NOW.replace(minute=31)
    )

    assert request.journey_id == TEST_JOURNEY
    assert request.transactional
    assert request.contact_key == "u-ada"
    assert request.test is not None
    assert request.test.address == "me@example.org"
    assert request.test.content == {
        "channel": "email",
        "subject": "Hi {{ traits.first_name }}",
        "text": "Hello",
    }
    assert request.message_id == again.message_id != later.message_id
    assert SendRequest.model_validate_json(request.to_wire()) == request


@pytest.mark.parametrize(
    ("channel", "address", "problem"),
    [
        ("email", "me@example.org", None),
        ("email", "me@example", "not an e-mail address"),
        ("email", "me@example.org\nBcc: x@y.z", "holds a line break"),
        ("sms", "+49 151 1234567", None),
        ("sms", "call me", "not a phone number"),
        ("push", "token", "a test send is for email and SMS templates"),
    ],
)
def test_the_addresses_a_test_may_go_to(channel: str, address: str, problem: str | None) -> None:
    found = address_problem(channel, address)  # type: ignore[arg-type]

    assert found == problem if problem is None else (found or "").startswith(problem)
