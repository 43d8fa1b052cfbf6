"""Definitions typed as YAML and events typed as JSON, through the admin API and the UI's forms:
text too deep to read, an alias bomb, or what JSON cannot hold is a 422 naming the field, never
a 500. Each refusal comes before any store is read, so the app runs with none."""

from __future__ import annotations

import html
from collections.abc import AsyncIterator

import httpx
import pytest

from services.admin.ui.workbench import _preview_body, _template_form
from tests.unit.test_admin_access import ED, MemoryTrail, bearer, build
from tests.unit.test_bodies import ALIAS_BOMB
from tests.unit.test_ui_session import _form_token, _sign_in

DEEP_YAML = "journey: " + "[" * 3000 + "]" * 3000
DEEP_JSON = "[" * 3000 + "]" * 3000
HOSTILE_YAML = [
    (DEEP_YAML, "definition: line 1: nested deeper than 32 levels"),
    (ALIAS_BOMB, "definition: line 2: an alias (*name) is not allowed"),
    ("journey: {at: .inf}", "definition: line 1: .inf is not a number JSON can hold"),
]
HOSTILE_IDS = ["3000-levels", "alias-bomb", "infinity"]


@pytest.fixture
async def api() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=build(MemoryTrail()))
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
        yield client


async def _editor(client: httpx.AsyncClient) -> str:
    """Signs the editor in; the token its forms carry."""
    return _form_token(await _sign_in(client, ED))


@pytest.mark.parametrize(("text", "said"), HOSTILE_YAML, ids=HOSTILE_IDS)
async def test_the_dry_run_api_refuses_hostile_yaml_naming_the_definition(
    api: httpx.AsyncClient, text: str, said: str
) -> None:
    answer = await api.post(
        "/v1/journeys/dry-run",
        json={"definition": text, "contact_key": "ada"},
        headers=bearer(ED),
    )

    assert answer.status_code == 422, answer.text
    (problem,) = answer.json()["problems"]
    assert problem["rule"] == "yaml"
    assert problem["message"].startswith(said)


@pytest.mark.parametrize(("text", "said"), HOSTILE_YAML, ids=HOSTILE_IDS)
@pytest.mark.parametrize(
    "page", ["/journeys/j1/draft", "/journeys/j1/draft/dry-run", "/segment-builder"]
)
async def test_the_ui_forms_refuse_hostile_yaml_naming_the_definition(
    api: httpx.AsyncClient, page: str, text: str, said: str
) -> None:
    token = await _editor(api)

    answer = await api.post(
        page, data={"csrf_token": token, "definition": text, "contact_key": "ada"}
    )

    assert answer.status_code == 422, answer.text[:500]
    assert said in html.unescape(answer.text)


@pytest.mark.parametrize(
    ("events", "said"),
    [
        (DEEP_JSON, "events: nested deeper than 32 levels"),
        ('[{"event": "\\ud800"}]', "events: not JSON"),
        ("[{", "events: not JSON"),
    ],
    ids=["3000-levels", "lone-surrogate", "syntax"],
)
async def test_the_ui_dry_run_refuses_hostile_events_naming_the_field(
    api: httpx.AsyncClient, events: str, said: str
) -> None:
    token = await _editor(api)

    answer = await api.post(
        "/journeys/j1/draft/dry-run",
        data={"csrf_token": token, "definition": "journey: {id: j1}", "events": events},
    )

    assert answer.status_code == 422, answer.text[:500]
    assert said in html.unescape(answer.text)


@pytest.mark.parametrize(
    ("event", "said"),
    [
        (DEEP_JSON, "event: nested deeper than 32 levels"),
        ('{"event": "\ud800"}', "event: not JSON"),
        ("[1]", "event: a JSON object"),
    ],
    ids=["3000-levels", "lone-surrogate", "not-an-object"],
)
def test_the_template_preview_refuses_a_hostile_event_naming_the_field(
    event: str, said: str
) -> None:
    form = _template_form("email", "", "Hi", "", "", event, "")

    _body, problem = _preview_body(form)

    assert problem is not None
    assert problem.startswith(said)
