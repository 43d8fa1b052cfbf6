"""The draft editor's Dry run panel: the editor's text, a contact key and/or pasted events, posted
as a plain form (a second submit button of the editor's form) to `POST /v1/journeys/dry-run`."""

# No `from __future__ import annotations`: FastAPI reads the `editor` dependency at runtime.
import asyncio
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Form, Request
from fastapi.responses import Response

from shared.bodies import BadInput, parse_json_text, parse_yaml

Route = Callable[..., Any]


def mount_dry_run_page(
    post: Callable[[str], Callable[[Route], Route]], ui: Any, editor: Any, detail: Any
) -> None:
    """`post` is the UI's form-route decorator, `editor` its role dependency, `detail` the way
    it words an API refusal."""

    @post("/journeys/{journey_id}/draft/dry-run")
    async def dry_run_draft(
        request: Request,
        journey_id: str,
        signed: editor,
        definition: Annotated[str, Form(max_length=500_000)] = "",
        contact_key: Annotated[str, Form(max_length=1024)] = "",
        events: Annotated[str, Form(max_length=200_000)] = "",
    ) -> Response:
        def page(code: int, problems: Any = None, result: Any = None) -> Response:
            return ui.page(  # type: ignore[no-any-return]
                request,
                "draft.html",
                signed,
                code,
                journey_id=journey_id,
                text=definition,
                problems=problems,
                problems_title="Dry run not possible",
                saved=False,
                dry_run=result,
                dry_contact_key=contact_key,
                dry_events=events,
            )

        def refused(rule: str, message: str) -> Response:
            return page(422, [{"step": None, "rule": rule, "message": message}])

        try:
            parsed = await asyncio.to_thread(parse_yaml, definition, "definition")
        except BadInput as exc:
            return refused("yaml", exc.message)
        body: dict[str, Any] = {"definition": parsed}
        if contact_key.strip():
            body["contact_key"] = contact_key.strip()
        if events.strip():
            try:
                pasted = parse_json_text(events, "events")
            except BadInput as exc:
                return refused("events", exc.message)
            if not isinstance(pasted, list):
                return refused("events", "events: a JSON list of events, [{...}, ...]")
            body["events"] = pasted
        answer = await ui.api(signed, "POST", "/v1/journeys/dry-run", body)
        if answer.status_code == 200:
            return page(200, result=answer.json())
        problems = answer.json().get("problems") if answer.status_code == 422 else None
        if not problems:
            problems = [{"step": None, "rule": "dry-run", "message": detail(answer)}]
        return page(answer.status_code if answer.status_code < 500 else 502, problems)
