"""`POST /v1/journeys/dry-run` (editors): play a journey draft for one contact in virtual time,
through the engine the orchestrator runs, and answer its path with the why of each decision.

Nothing leaves the admin: no Kafka, no store write; the stored profile is only read."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, HTTPException, status
from fastapi.params import Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.admin.adapters.journeys import TemplateStore
from services.admin.adapters.segments import Contacts
from services.admin.domain.segments import contact_view
from shared.bodies import BadInput, parse_yaml
from shared.clock import Clock
from shared.contracts import Profile
from shared.journey_checks import DefinitionProblem
from shared.journey_engine.dry_run import MAX_EVENTS, PastedEvent, dry_run
from shared.lifecycle import validate_draft

# With pasted events and no contact key, the run's contact is called this.
PASTED_CONTACT = "dry-run-contact"


class DryRunAsk(BaseModel):
    """A draft (the journey file as an object, or its YAML text) and who plays it: a stored
    contact, events to paste, or both (the events then start from the contact's profile)."""

    model_config = ConfigDict(extra="forbid")

    definition: Any = Field(description="The journey file: an object, or its YAML text")
    contact_key: str | None = Field(default=None, min_length=1, max_length=1024)
    events: list[PastedEvent] = Field(default_factory=list, max_length=MAX_EVENTS)


def add_dry_run_routes(
    app: FastAPI, editor: list[Depends], contacts: Contacts, templates: TemplateStore, clock: Clock
) -> None:
    @app.post(
        "/v1/journeys/dry-run",
        dependencies=editor,
        summary="Play a draft for one contact in virtual time: its path, step by step, and why",
        description=(
            "Runs the journey engine on the draft, for a stored contact (its profile is the "
            "starting point; with no events the trigger itself is played) and/or pasted events "
            "(`after` a duration since the previous one, or `at` a time). Nothing is sent, "
            "changed or called: sends and contact changes come back as 'would …' lines, "
            "webhooks are answered 200 by the dry run, waits move the virtual clock. A draft "
            "with problems is refused as publishing refuses it: 422 naming step and rule."
        ),
    )
    async def dry_run_draft(ask: DryRunAsk) -> Any:
        if ask.contact_key is None and not ask.events:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                "contact_key or events: give a contact to start from, events to play, or both",
            )
        definition = ask.definition
        if isinstance(definition, str):
            try:  # on a thread: a long text takes a while, and the loop serves others meanwhile
                definition = await asyncio.to_thread(parse_yaml, definition, "definition")
            except BadInput as exc:
                problem = DefinitionProblem(
                    journey="(draft)", step=None, rule="yaml", message=exc.message
                )
                return _problems([problem])
        parsed, problems = validate_draft(definition, await templates.ids())
        if parsed is None or problems:
            return _problems(problems)
        profile: Profile | None = None
        if ask.contact_key is not None:
            document = await contacts.get(ask.contact_key)
            if document is None:
                raise HTTPException(
                    status.HTTP_404_NOT_FOUND, f"contact_key: no stored profile '{ask.contact_key}'"
                )
            try:
                profile = Profile.model_validate(_aware(contact_view(document)))
            except ValidationError as exc:
                raise HTTPException(
                    status.HTTP_422_UNPROCESSABLE_CONTENT,
                    f"contact_key: the stored profile can't be read ({exc.error_count()} errors)",
                ) from exc
        try:
            result = dry_run(
                parsed.journey,
                clock.now(),
                contact_key=ask.contact_key or PASTED_CONTACT,
                profile=profile,
                events=tuple(ask.events),
            )
        except ValidationError as exc:  # an event the pipeline itself would refuse
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, f"events: {where}: {first['msg']}"
            ) from exc
        return result.model_dump(mode="json")


def _problems(problems: list[DefinitionProblem]) -> JSONResponse:
    """The answer publishing gives a draft with problems: each names the step and the rule."""
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={
            "detail": "the draft has problems: " + "; ".join(str(p) for p in problems),
            "problems": [p.model_dump() for p in problems],
        },
    )


def _aware(value: Any) -> Any:
    """The store hands datetimes back without a zone; they were written in UTC."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    if isinstance(value, dict):
        return {k: _aware(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_aware(v) for v in value]
    return value
