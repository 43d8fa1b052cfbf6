"""The journey lifecycle on the real stack: drafts, template readiness, immutable versions, pause,
resume and archive, through the admin API and the `waypost` CLI (S17)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.cli import DefinitionError, change_status, publish
from shared.settings import CommonSettings
from tests.e2e.helpers import outbox, post, unique, wait_for

pytestmark = pytest.mark.e2e
ADMIN = {"Authorization": "Bearer wp_dev_admin_key"}


def _admin(stack: Any, method: str, path: str, body: Any = None) -> httpx.Response:
    return httpx.request(method, f"{stack.admin_url}{path}", headers=ADMIN, json=body, timeout=30)


def _definition(
    journey_id: str,
    trigger: str,
    template: str,
    *,
    version: int = 1,
    name: str = "Lifecycle test",
    reentry: str = "never",
) -> dict[str, Any]:
    return {
        "journey": {
            "id": journey_id,
            "name": name,
            "version": version,
            "trigger": {"type": "event", "event": trigger},
            "entry": {"reentry": reentry},
            "steps": [{"id": "hello", "type": "send", "template": template}],
        }
    }


def _ready_template(stack: Any, template_id: str, subject: str) -> None:
    saved = _admin(
        stack, "PUT", f"/v1/templates/{template_id}", {"subject": subject, "text": "Hello"}
    )
    assert saved.status_code == 200, saved.text
    ready = _admin(stack, "POST", f"/v1/templates/{template_id}/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready"


def _publish(stack: Any, definition: dict[str, Any]) -> dict[str, Any]:
    journey_id = definition["journey"]["id"]
    draft = _admin(stack, "PUT", f"/v1/journeys/{journey_id}/draft", definition)
    assert draft.status_code == 200, draft.text
    published = _admin(stack, "POST", f"/v1/journeys/{journey_id}/publish")
    assert published.status_code == 201, published.text
    record: dict[str, Any] = published.json()
    return record


def _contact(stack: Any, name: str, **traits: str) -> tuple[str, str]:
    user = unique(name)
    email = f"{user}@example.com"
    answer = post(stack, "identify", {"userId": user, "traits": {"email": email, **traits}})
    assert answer.status_code == 200, answer.text
    return user, email


def _track(stack: Any, user: str, event: str, **properties: Any) -> None:
    answer = post(stack, "track", {"userId": user, "event": event, "properties": properties})
    assert answer.status_code == 200, answer.text


def _subjects(stack: Any, email: str) -> list[str]:
    return [m["subject"] for m in outbox(stack, to=email)]


def test_a_draft_with_a_problem_is_refused_naming_the_step_and_the_rule(stack: Any) -> None:
    journey_id, template = unique("draft"), unique("draft-tpl")
    _ready_template(stack, template, "Hi")
    broken = _definition(journey_id, "Draft Tested", template)
    broken["journey"]["steps"][0]["next"] = "nowhere"

    refused = _admin(stack, "PUT", f"/v1/journeys/{journey_id}/draft", broken)

    assert refused.status_code == 422
    assert {
        "journey": journey_id,
        "step": "hello",
        "rule": "next-exists",
    }.items() <= refused.json()["problems"][0].items()
    assert "step 'hello'" in refused.json()["detail"]
    assert _admin(stack, "GET", f"/v1/journeys/{journey_id}/draft").status_code == 404

    missing = _admin(
        stack, "PUT", f"/v1/journeys/{journey_id}/draft", _definition(journey_id, "E", "nope")
    )
    assert missing.status_code == 422
    assert [(p["step"], p["rule"]) for p in missing.json()["problems"]] == [
        ("hello", "template-exists")
    ]
    elsewhere = _admin(
        stack, "PUT", "/v1/journeys/other/draft", _definition(journey_id, "E", template)
    )
    assert [p["rule"] for p in elsewhere.json()["problems"]] == ["journey-id"]

    good = _definition(journey_id, "Draft Tested", template)
    assert _admin(stack, "PUT", f"/v1/journeys/{journey_id}/draft", good).status_code == 200
    stored = _admin(stack, "GET", f"/v1/journeys/{journey_id}/draft")
    assert stored.status_code == 200
    assert stored.json()["definition"] == good

    schema = _admin(stack, "GET", "/v1/journeys/schema")
    assert schema.status_code == 200
    assert "journey" in schema.json()["properties"]
    assert httpx.get(f"{stack.admin_url}/v1/journeys/schema", timeout=10).status_code == 401


def test_publishing_is_refused_until_every_template_is_ready(stack: Any) -> None:
    journey_id, template = unique("ready"), unique("ready-tpl")
    trigger = f"Enter {journey_id}"
    assert _admin(stack, "POST", f"/v1/journeys/{journey_id}/publish").status_code == 404

    saved = _admin(
        stack,
        "PUT",
        f"/v1/templates/{template}",
        {"subject": "Launch for {{ contact.first_name }}", "text": "It is here."},
    )
    assert saved.json()["status"] == "draft"
    definition = _definition(journey_id, trigger, template)
    assert _admin(stack, "PUT", f"/v1/journeys/{journey_id}/draft", definition).status_code == 200

    refused = _admin(stack, "POST", f"/v1/journeys/{journey_id}/publish")

    assert refused.status_code == 409
    [problem] = refused.json()["problems"]
    assert (problem["step"], problem["rule"]) == ("hello", "template-ready")
    assert f"template '{template}' is a draft" in problem["message"]
    assert _admin(stack, "GET", f"/v1/journeys/{journey_id}").status_code == 404

    assert _admin(stack, "POST", f"/v1/templates/{template}/ready").json()["status"] == "ready"
    published = _admin(stack, "POST", f"/v1/journeys/{journey_id}/publish")

    assert published.status_code == 201, published.text
    assert (published.json()["journey"]["version"], published.json()["status"]) == (1, "active")
    versions = _admin(stack, "GET", f"/v1/journeys/{journey_id}").json()["versions"]
    assert [v["journey"]["version"] for v in versions] == [1]

    # The template written through the admin is the one the dispatcher sends.
    user, email = _contact(stack, "ready", first_name="Kim")
    _track(stack, user, trigger)
    assert wait_for(lambda: _subjects(stack, email), what="the email") == ["Launch for Kim"]

    # Editing a ready template makes it a draft again while the ready content keeps sending.
    edit = _admin(stack, "PUT", f"/v1/templates/{template}", {"subject": "New", "text": "New"})
    assert edit.json()["status"] == "draft"
    assert edit.json()["sending"]["subject"] == "Launch for {{ contact.first_name }}"
    assert _admin(stack, "GET", f"/v1/templates/{template}").json()["content"]["subject"] == "New"
    broken = _admin(stack, "PUT", f"/v1/templates/{template}", {"text": "{% if %}"})
    assert broken.status_code == 422
    assert "template syntax" in broken.text


def test_a_template_reading_an_undefined_variable_is_refused_at_publish(stack: Any) -> None:
    journey_id, template = unique("variables"), unique("variables-tpl")
    trigger = f"Enter {journey_id}"
    # Written as a condition reads it, but without the `event` root: nobody could receive it.
    _ready_template(stack, template, "Your {{ properties.plan }} plan")
    definition = _definition(journey_id, trigger, template)
    assert _admin(stack, "PUT", f"/v1/journeys/{journey_id}/draft", definition).status_code == 200

    refused = _admin(stack, "POST", f"/v1/journeys/{journey_id}/publish")

    assert refused.status_code == 409, refused.text
    [problem] = refused.json()["problems"]
    assert (problem["step"], problem["rule"]) == ("hello", "template-variables")
    assert problem["message"].startswith(f"template '{template}', subject: 'properties' is")
    assert f"step 'hello': template '{template}'" in refused.json()["detail"]
    assert _admin(stack, "GET", f"/v1/journeys/{journey_id}").status_code == 404

    # The way conditions write it: published, and rendered at send time.
    _ready_template(stack, template, "Your {{ event.properties.plan }} plan")
    published = _admin(stack, "POST", f"/v1/journeys/{journey_id}/publish")
    assert published.status_code == 201, published.text
    user, email = _contact(stack, "variables")
    _track(stack, user, trigger, plan="pro")
    assert wait_for(lambda: _subjects(stack, email), what="the email") == ["Your pro plan"]


def test_a_published_version_cannot_be_changed(stack: Any) -> None:
    journey_id, template = unique("immutable"), unique("immutable-tpl")
    _ready_template(stack, template, "Hi")
    first = _definition(journey_id, "Immutable Tested", template)
    _publish(stack, first)

    again = _admin(stack, "POST", f"/v1/journeys/{journey_id}/publish")
    assert again.status_code == 200  # the same content: nothing new to publish

    changed = _definition(journey_id, "Immutable Tested", template, name="Renamed")
    assert _admin(stack, "PUT", f"/v1/journeys/{journey_id}/draft", changed).status_code == 200
    refused = _admin(stack, "POST", f"/v1/journeys/{journey_id}/publish")

    assert refused.status_code == 409
    assert [p["rule"] for p in refused.json()["problems"]] == ["version-immutable"]
    assert "published versions are immutable: raise `version`" in refused.json()["detail"]

    second = _publish(
        stack, _definition(journey_id, "Immutable Tested", template, version=2, name="Renamed")
    )
    assert second["journey"]["version"] == 2
    versions = _admin(stack, "GET", f"/v1/journeys/{journey_id}").json()["versions"]
    assert [(v["journey"]["version"], v["journey"]["name"]) for v in versions] == [
        (1, "Lifecycle test"),
        (2, "Renamed"),
    ]


def test_the_text_diff_between_two_versions_marks_the_lines_added_and_removed(
    stack: Any,
) -> None:
    journey_id, template = unique("diffed"), unique("diffed-tpl")
    _ready_template(stack, template, "Hi")
    _publish(stack, _definition(journey_id, "Diff Tested", template))
    _publish(stack, _definition(journey_id, "Diff Tested", template, version=2, name="Renamed"))

    answer = _admin(stack, "GET", f"/v1/journeys/{journey_id}/diff?from=1&to=2")

    assert answer.status_code == 200, answer.text
    diff = answer.json()
    assert (diff["from"], diff["to"], diff["added"], diff["removed"]) == (1, 2, 2, 2)
    changed = [(line["kind"], line["text"]) for line in diff["lines"]]
    assert ("removed", "-name: Lifecycle test") in changed
    assert ("added", "+name: Renamed") in changed
    assert diff["unified"].splitlines()[:2] == ["--- version 1", "+++ version 2"]
    backwards = _admin(stack, "GET", f"/v1/journeys/{journey_id}/diff?from=2&to=1").json()
    assert ("added", "+name: Lifecycle test") in [
        (x["kind"], x["text"]) for x in backwards["lines"]
    ]

    missing = _admin(stack, "GET", f"/v1/journeys/{journey_id}/diff?from=1&to=9")
    assert missing.status_code == 404
    assert missing.json()["detail"] == f"to: journey '{journey_id}' has no published version 9"
    for query, name in (("from=x&to=2", "from"), ("from=1", "to"), ("from=0&to=2", "from")):
        bad = _admin(stack, "GET", f"/v1/journeys/{journey_id}/diff?{query}")
        assert bad.status_code == 422
        assert [e["loc"] for e in bad.json()["detail"]] == [["query", name]]
    unknown = _admin(stack, "GET", f"/v1/journeys/{unique('nothing')}/diff?from=1&to=2")
    assert unknown.status_code == 404


def test_pause_stops_entries_and_resume_lets_them_in(stack: Any) -> None:
    paused_id, active_id = unique("paused"), unique("active")
    paused_trigger, active_trigger = f"Enter {paused_id}", f"Enter {active_id}"
    paused_tpl, active_tpl, active_v2_tpl = unique("p-tpl"), unique("a-tpl"), unique("a2-tpl")
    _ready_template(stack, paused_tpl, "Paused journey")
    _ready_template(stack, active_tpl, "Active round {{ event.round }}")
    _ready_template(stack, active_v2_tpl, "Active v2 round {{ event.round }}")

    _publish(stack, _definition(paused_id, paused_trigger, paused_tpl))
    paused = _admin(stack, "POST", f"/v1/journeys/{paused_id}/pause")
    assert paused.status_code == 200, paused.text
    assert paused.json()["status"] == "paused"
    listed = _admin(stack, "GET", "/v1/journeys").json()["journeys"]
    assert [j["status"] for j in listed if j["id"] == paused_id] == ["paused"]

    # Published after the pause on the one-partition definitions topic: once the orchestrator
    # runs this journey, it has read the pause as well.
    _publish(stack, _definition(active_id, active_trigger, active_tpl, reentry="after_exit"))
    user, email = _contact(stack, "pause")
    _track(stack, user, active_trigger, round=1)
    wait_for(lambda: "Active round 1" in _subjects(stack, email), what="the first active email")

    # One contact, so both events go through every stage in order: the paused journey's email
    # would arrive before the active journey's second one.
    _track(stack, user, paused_trigger)
    _track(stack, user, active_trigger, round=2)
    wait_for(lambda: "Active round 2" in _subjects(stack, email), what="the second active email")
    assert "Paused journey" not in _subjects(stack, email)

    resumed = _admin(stack, "POST", f"/v1/journeys/{paused_id}/resume")
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["status"] == "active"
    _publish(
        stack,
        _definition(active_id, active_trigger, active_v2_tpl, version=2, reentry="after_exit"),
    )
    _track(stack, user, active_trigger, round=3)
    wait_for(lambda: "Active v2 round 3" in _subjects(stack, email), what="the v2 email")

    _track(stack, user, paused_trigger)
    wait_for(lambda: "Paused journey" in _subjects(stack, email), what="the resumed journey")


def test_archive_is_final(stack: Any) -> None:
    journey_id, template = unique("archived"), unique("archived-tpl")
    _ready_template(stack, template, "Hi")
    _publish(stack, _definition(journey_id, "Archive Tested", template))
    assert _admin(stack, "POST", f"/v1/journeys/{journey_id}/pause").status_code == 200

    archived = _admin(stack, "POST", f"/v1/journeys/{journey_id}/archive")

    assert archived.status_code == 200, archived.text
    assert archived.json()["status"] == "archived"
    for change in ("pause", "resume", "archive"):
        refused = _admin(stack, "POST", f"/v1/journeys/{journey_id}/{change}")
        assert refused.status_code == 409, change
        assert refused.json()["problems"][0]["rule"] == "status-transition"
        assert "archived is final" in refused.json()["detail"]
    newer = _definition(journey_id, "Archive Tested", template, version=2)
    assert _admin(stack, "PUT", f"/v1/journeys/{journey_id}/draft", newer).status_code == 200
    refused = _admin(stack, "POST", f"/v1/journeys/{journey_id}/publish")
    assert refused.status_code == 409
    assert [p["rule"] for p in refused.json()["problems"]] == ["archived-is-final"]
    versions = _admin(stack, "GET", f"/v1/journeys/{journey_id}").json()["versions"]
    assert [v["status"] for v in versions] == ["archived"]
    assert _admin(stack, "POST", f"/v1/journeys/{unique('nope')}/pause").status_code == 404


def test_the_cli_applies_the_same_rules(stack: Any, tmp_path: Path) -> None:
    settings = CommonSettings(
        kafka_bootstrap=stack.bootstrap,
        mongo_url=stack.mongo_url,
        topic_partitions=stack.partitions,
    )
    journey_id, stored = unique("cli"), unique("cli-stored")
    saved = _admin(stack, "PUT", f"/v1/templates/{stored}", {"subject": "Stored", "text": "x"})
    assert saved.status_code == 200

    def write(shipped_status: str) -> Path:
        path = tmp_path / f"{journey_id}.yaml"
        path.write_text(
            f"""
journey:
  id: {journey_id}
  name: CLI test
  trigger: {{event: CLI Tested}}
  steps:
    - {{id: shipped, type: send, template: {journey_id}-mail}}
    - {{id: stored, type: send, template: {stored}}}
templates:
  {journey_id}-mail: {{subject: Hi, text: Hello, status: {shipped_status}}}
"""
        )
        return path

    with pytest.raises(DefinitionError) as refused:
        publish(settings, [write("draft")])
    assert f"step 'shipped': template '{journey_id}-mail' is a draft" in str(refused.value)
    assert f"step 'stored': template '{stored}' is a draft" in str(refused.value)
    assert "[template-ready]" in str(refused.value)

    assert _admin(stack, "POST", f"/v1/templates/{stored}/ready").status_code == 200
    assert publish(settings, [write("ready")]) == 0
    assert change_status(settings, journey_id, "pause") == 0

    def status() -> str | None:
        answer = _admin(stack, "GET", f"/v1/journeys/{journey_id}")
        return answer.json()["versions"][-1]["status"] if answer.status_code == 200 else None

    wait_for(lambda: status() == "paused", what="the pause in the admin")
    with pytest.raises(DefinitionError, match="it is paused"):
        change_status(settings, journey_id, "pause")
    assert change_status(settings, journey_id, "archive") == 0
    with pytest.raises(DefinitionError, match="archived is final"):
        change_status(settings, journey_id, "resume")
