"""The journey lifecycle rules (draft, publish, pause, resume, archive) and template editing.

Every refusal must name the journey, the step when there is one, and the rule.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from services.admin.domain.templates import TemplateContent, edited, readied, view
from shared.journeys import JourneyFile, PublishedJourney
from shared.lifecycle import (
    Publish,
    Refused,
    StatusChange,
    Unchanged,
    decide_publish,
    decide_status_change,
    shipped_template_document,
    template_status,
    templates_used,
    validate_draft,
)

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
LATER = T0 + timedelta(hours=1)


def _raw(version: int = 1, name: str = "Product launch", **template: Any) -> dict[str, Any]:
    return {
        "journey": {
            "id": "launch",
            "name": name,
            "version": version,
            "trigger": {"type": "event", "event": "Launch Seen"},
            "steps": [
                {"id": "announce", "type": "send", "template": "announcement"},
                {"id": "nudge", "type": "send", "channel": "sms", "template": "launch-sms"},
            ],
        },
        "templates": {"announcement": {"subject": "Hi", "text": "News", **template}},
    }


def _file(version: int = 1, name: str = "Product launch", **template: Any) -> JourneyFile:
    parsed, problems = validate_draft(_raw(version, name, **template), {"launch-sms"})
    assert parsed is not None, problems
    return parsed


def _published(version: int, status: str = "active") -> PublishedJourney:
    return PublishedJourney.model_validate(
        {
            "journey": _file(version).journey.model_dump(),
            "status": status,
            "published_at": T0,
        }
    )


# The stored documents of the templates the journey uses but does not ship.
READY: dict[str, dict[str, Any]] = {
    "launch-sms": {
        "channel": "sms",
        "text": "Launch day, {{ contact.first_name }}!",
        "status": "ready",
    }
}


# --- drafts ---------------------------------------------------------------------------------


def test_a_draft_reports_each_problem_with_its_step_and_rule() -> None:
    raw = _raw()
    raw["journey"]["steps"][0]["next"] = "missing"

    parsed, problems = validate_draft(raw, {"launch-sms"}, "launch")

    assert parsed is None
    assert [(p.journey, p.step, p.rule) for p in problems] == [
        ("launch", "announce", "next-exists")
    ]


def test_a_draft_must_use_only_templates_that_exist() -> None:
    parsed, problems = validate_draft(_raw(), set())

    assert parsed is None
    assert [(p.step, p.rule) for p in problems] == [("nudge", "template-exists")]


def test_a_draft_stored_under_another_journey_id_is_refused() -> None:
    parsed, problems = validate_draft(_raw(), {"launch-sms"}, "other")

    assert parsed is None
    assert [(p.journey, p.rule) for p in problems] == [("other", "journey-id")]
    assert "'launch'" in problems[0].message


def test_templates_used_are_those_of_every_send_step() -> None:
    assert templates_used(_file()) == {"announcement", "launch-sms"}


# --- publishing -----------------------------------------------------------------------------


def test_a_first_version_is_published_active_with_its_shipped_templates() -> None:
    decision = decide_publish(_file(), [], READY, T0)

    assert isinstance(decision, Publish)
    assert decision.record.status == "active"
    assert decision.record.published_at == T0
    assert decision.record.key == "journey:launch:1"
    assert set(decision.templates) == {"announcement"}


@pytest.mark.parametrize(
    "stored", [{"launch-sms": {"channel": "sms", "text": "Launch", "status": "draft"}}, {}]
)
def test_publishing_is_refused_while_a_stored_template_is_not_ready(
    stored: dict[str, dict[str, Any]],
) -> None:
    decision = decide_publish(_file(), [], stored, T0)

    assert isinstance(decision, Refused)
    [problem] = decision.problems
    assert (problem.journey, problem.step, problem.rule) == ("launch", "nudge", "template-ready")
    assert "'launch-sms'" in problem.message


def test_publishing_is_refused_while_a_shipped_template_is_a_draft() -> None:
    decision = decide_publish(_file(status="draft"), [], READY, T0)

    assert isinstance(decision, Refused)
    assert [(p.step, p.rule) for p in decision.problems] == [("announce", "template-ready")]
    assert "is a draft: mark it ready" in str(decision)


def test_a_shipped_draft_template_that_no_step_uses_is_not_written() -> None:
    journey_file = _file()
    extra = journey_file.templates["announcement"].model_copy(update={"status": "draft"})
    journey_file = journey_file.model_copy(
        update={"templates": {**journey_file.templates, "spare": extra}}
    )

    decision = decide_publish(journey_file, [], READY, T0)

    assert isinstance(decision, Publish)
    assert set(decision.templates) == {"announcement"}


def test_republishing_the_same_content_changes_nothing() -> None:
    published = [_published(1, "paused")]
    stored = {**READY, "announcement": {"subject": "Hi", "text": "News", "status": "ready"}}

    decision = decide_publish(_file(1), published, stored, LATER)

    assert decision == Unchanged(published[0])


def test_republishing_puts_back_shipped_templates_the_store_lost() -> None:
    published = [_published(1)]

    decision = decide_publish(_file(1), published, READY, LATER)

    assert isinstance(decision, Unchanged)
    assert decision.record == published[0]
    assert set(decision.templates) == {"announcement"}


def test_a_published_version_cannot_be_changed() -> None:
    decision = decide_publish(_file(1, name="Renamed"), [_published(1)], READY, T0)

    assert isinstance(decision, Refused)
    assert decision.rules() == {"version-immutable"}
    assert "published versions are immutable: raise `version`" in str(decision)


def test_a_new_version_must_be_newer_than_every_published_one() -> None:
    decision = decide_publish(_file(2), [_published(1), _published(3)], READY, T0)

    assert isinstance(decision, Refused)
    assert decision.rules() == {"version-newer"}
    assert "use `version: 4`" in str(decision)


def test_every_reason_is_reported_at_once() -> None:
    decision = decide_publish(_file(1, name="Renamed"), [_published(1)], {}, T0)

    assert isinstance(decision, Refused)
    assert decision.rules() == {"version-immutable", "template-ready"}


@pytest.mark.parametrize("status", ["active", "paused"])
def test_a_new_version_keeps_the_journeys_status(status: str) -> None:
    decision = decide_publish(_file(2), [_published(1, status)], READY, LATER)

    assert isinstance(decision, Publish)
    assert decision.record.status == status
    assert decision.record.journey.version == 2


def test_an_archived_journey_takes_no_new_version() -> None:
    decision = decide_publish(_file(2), [_published(1, "archived")], READY, T0)

    assert isinstance(decision, Refused)
    assert decision.rules() == {"archived-is-final"}


def test_versions_of_other_journeys_do_not_count() -> None:
    other = _published(5).model_copy(
        update={"journey": _published(5).journey.model_copy(update={"id": "other"})}
    )

    assert isinstance(decide_publish(_file(1), [other], READY, T0), Publish)


# --- status changes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "change", "expected"),
    [
        ("active", "pause", "paused"),
        ("paused", "resume", "active"),
        ("active", "archive", "archived"),
        ("paused", "archive", "archived"),
    ],
)
def test_allowed_changes_rewrite_the_newest_version(
    current: str, change: StatusChange, expected: str
) -> None:
    published = [_published(1, "active"), _published(2, current)]

    decision = decide_status_change("launch", published, change)

    assert isinstance(decision, PublishedJourney)
    assert decision.key == "journey:launch:2"
    assert decision.status == expected
    assert decision.journey == published[1].journey
    assert decision.published_at == T0


@pytest.mark.parametrize(
    ("current", "change"),
    [
        ("active", "resume"),
        ("paused", "pause"),
        ("archived", "pause"),
        ("archived", "resume"),
        ("archived", "archive"),
    ],
)
def test_other_changes_are_refused_naming_the_current_status(
    current: str, change: StatusChange
) -> None:
    decision = decide_status_change("launch", [_published(1, current)], change)

    assert isinstance(decision, Refused)
    assert decision.rules() == {"status-transition"}
    assert current in str(decision)
    if current == "archived":
        assert "archived is final" in str(decision)


def test_an_unpublished_journey_has_no_status_to_change() -> None:
    decision = decide_status_change("launch", [], "pause")

    assert isinstance(decision, Refused)
    assert decision.rules() == {"journey-published"}


# --- stored templates -----------------------------------------------------------------------


def test_a_stored_template_is_ready_only_without_a_pending_edit() -> None:
    assert template_status({"status": "ready"}) == "ready"
    assert template_status({"status": "draft"}) == "draft"
    assert template_status({"status": "ready", "draft": {"text": "x"}}) == "draft"
    assert template_status({}) == "draft"


def test_a_shipped_template_is_stored_ready() -> None:
    document = shipped_template_document(_file().templates["announcement"], T0)

    assert document == {
        "channel": "email",
        "subject": "Hi",
        "text": "News",
        "html": None,
        "url": None,
        "image_url": None,
        "wechat_template_id": None,
        "data": None,
        "status": "ready",
        "updated_at": T0,
        "ready_at": T0,
    }


def test_a_new_template_is_saved_as_a_draft_and_marked_ready() -> None:
    saved = edited(None, TemplateContent(subject="Hi", text="Hello"), T0)
    assert saved["status"] == "draft"
    assert view("t", saved)["sending"] is None

    ready = readied(saved, LATER)

    assert ready["status"] == "ready"
    assert ready["ready_at"] == LATER
    assert view("t", ready)["status"] == "ready"
    assert view("t", ready)["sending"]["text"] == "Hello"


def test_editing_a_ready_template_keeps_it_sending_until_the_edit_is_ready() -> None:
    live = readied(edited(None, TemplateContent(subject="Hi", text="Hello"), T0), T0)

    pending = edited(live, TemplateContent(subject="Hi", text="Hello again"), LATER)

    assert pending["text"] == "Hello"  # what the dispatcher reads
    assert pending["status"] == "ready"
    assert template_status(pending) == "draft"
    assert view("t", pending)["content"]["text"] == "Hello again"
    assert view("t", pending)["sending"]["text"] == "Hello"

    promoted = readied(pending, LATER + timedelta(minutes=1))
    assert promoted["text"] == "Hello again"
    assert "draft" not in promoted
    assert template_status(promoted) == "ready"


def test_editing_back_to_the_live_content_leaves_nothing_pending() -> None:
    live = readied(edited(None, TemplateContent(text="Hello"), T0), T0)
    pending = edited(live, TemplateContent(text="Changed"), LATER)

    assert template_status(edited(pending, TemplateContent(text="Hello"), LATER)) == "ready"


def test_a_template_with_broken_jinja_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError) as caught:
        TemplateContent(subject="Hi {{ contact.name", text="Hello")

    [error] = caught.value.errors()
    assert error["loc"] == ("subject",)
    assert "template syntax, line 1" in error["msg"]


def test_shipped_templates_travel_with_a_new_version_only() -> None:
    decision = decide_publish(_file(1, text="Other news"), [_published(1)], READY, T0)

    assert isinstance(decision, Unchanged)
