"""Admin API: templates and journey drafts, the journey lifecycle (publish, pause, resume,
archive), published journeys, segments and aggregates with live member counts, contacts (look up,
forget), live figures read from the system itself, and the audit log of changes.

Routes decode, call the rules in `shared.lifecycle` and `domain/`, and hand the result to adapters.
Each route names the role it needs (`viewer`, `editor`, `publisher`; `access.py`): viewers read,
editors also save drafts, publishers also change what is sent or erased.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, HTTPException, Query, Request, Response, status
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict

from services.admin.access import AdminKeys, AuditedChanges, RoleRefused, role_refused_answer
from services.admin.adapters.analytics import JourneyLogStore
from services.admin.adapters.audit import AuditTrail
from services.admin.adapters.count_history import CountHistory
from services.admin.adapters.dead_letters import DeadLetterTopic
from services.admin.adapters.insights import Insights
from services.admin.adapters.journeys import Definitions, JourneyDrafts, TemplateStore
from services.admin.adapters.segments import (
    ContactCommands,
    Contacts,
    SegmentCounts,
    SegmentDefinitions,
)
from services.admin.adapters.test_sends import TestSends
from services.admin.contact_routes import add_contact_routes
from services.admin.dead_letter_routes import add_dead_letter_routes
from services.admin.domain import segments as segment_views
from services.admin.domain import templates as template_rules
from services.admin.domain.conversion import conversion_report
from services.admin.domain.templates import TemplateContent
from services.admin.domain.ui_session import session_secret
from services.admin.dry_run_routes import add_dry_run_routes
from services.admin.reads import add_read_routes
from services.admin.segment_routes import add_segment_builder_routes
from services.admin.settings import AdminSettings
from services.admin.template_routes import add_template_routes
from services.admin.ui.pages import mount_ui
from shared.bodies import BadInput, BodyReader, check_depth, parse_json
from shared.clock import Clock
from shared.definitions import PublishedJourneys
from shared.journey_checks import DefinitionProblem
from shared.journeys import journey_json_schema
from shared.lifecycle import (
    Refused,
    StatusChange,
    Unchanged,
    decide_publish,
    decide_status_change,
    templates_used,
    validate_draft,
)
from shared.segment_checks import (
    SegmentProblem,
    SegmentsRefused,
    decide_segment_delete,
    decide_segments_publish,
    segment_file_from,
)
from shared.segments import PublishedSegment
from shared.settings import api_docs_urls

MessageCounts = Callable[[], Awaitable[dict[str, int]]]
EventCount = Callable[[], int]


class Problems(Exception):
    """Answered as a 4xx whose `problems` each name the journey and the step, or the segment or
    aggregate, and the rule."""

    def __init__(
        self, code: int, summary: str, problems: Iterable[DefinitionProblem | SegmentProblem]
    ) -> None:
        self.code = code
        self.problems = list(problems)
        super().__init__(f"{summary}: " + "; ".join(str(p) for p in self.problems))


async def _problems_answer(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problems)
    return JSONResponse(
        status_code=exc.code,
        content={"detail": str(exc), "problems": [p.model_dump() for p in exc.problems]},
    )


class ConsentChange(BaseModel):
    """`PUT /v1/contacts/{key}/consent`: give or withdraw consent to one channel, or all."""

    model_config = ConfigDict(extra="forbid")

    channel: segment_views.ConsentChannel
    subscribed: bool


def create_app(
    settings: AdminSettings,
    journeys: PublishedJourneys,
    journey_log: JourneyLogStore,
    message_counts: MessageCounts,
    events_in_log: EventCount,
    *,
    drafts: JourneyDrafts,
    templates: TemplateStore,
    definitions: Definitions,
    segment_definitions: SegmentDefinitions,
    segment_counts: SegmentCounts,
    contacts: Contacts,
    contact_commands: ContactCommands,
    audit_trail: AuditTrail,
    clock: Clock,
    insights: Insights,
    dead_letters: DeadLetterTopic,
    test_sends: TestSends | None = None,
    count_history: CountHistory | None = None,
) -> FastAPI:
    app = FastAPI(title="Waypost admin", version="1", **api_docs_urls(settings.serves_api_docs()))
    app.add_exception_handler(Problems, _problems_answer)
    app.add_exception_handler(RoleRefused, role_refused_answer)
    app.add_middleware(JsonBodies, limit=settings.admin_max_body_bytes)
    digest = settings.contact_digest()
    app.add_middleware(AuditedChanges, trail=audit_trail, clock=clock, digest=digest)
    configured = settings.admin_keys()
    keys = AdminKeys(configured)
    # The role each route needs, in its decorator: reads, draft edits, what sends or erases.
    viewer = [Depends(keys.require("viewer"))]
    editor = [Depends(keys.require("editor"))]
    publisher = [Depends(keys.require("publisher"))]
    # One definition change at a time: each decides on what the previous one wrote.
    lifecycle = asyncio.Lock()

    @app.get("/health", summary="Liveness")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    # Before the routes below whose path parameters would capture them.
    add_read_routes(app, viewer, insights, journeys, clock)
    add_contact_routes(app, publisher, contacts, contact_commands, clock)
    add_dead_letter_routes(app, viewer, publisher, dead_letters)
    add_dry_run_routes(app, editor, contacts, templates, clock)
    add_template_routes(app, viewer, editor, templates, contacts, test_sends, clock)
    add_segment_builder_routes(
        app, viewer, journeys, contacts, segment_counts, count_history, clock
    )

    @app.get("/v1/journeys", dependencies=viewer, summary="Published journey versions")
    async def list_journeys() -> dict[str, Any]:
        items = [
            {
                "id": p.journey.id,
                "version": p.journey.version,
                "name": p.journey.name,
                "status": p.status,
                "trigger": p.journey.trigger.model_dump(),
                "steps": len(p.journey.steps),
                "published_at": p.published_at,
            }
            for p in journeys.all()
        ]
        return {"count": len(items), "journeys": items}

    # Declared before /v1/journeys/{journey_id}, which would otherwise capture it.
    @app.get("/v1/journeys/schema", dependencies=viewer, summary="JSON Schema of a definition")
    async def journey_schema() -> dict[str, Any]:
        return journey_json_schema()

    @app.get("/v1/journeys/{journey_id}", dependencies=viewer, summary="One journey's versions")
    async def get_journey(journey_id: str) -> dict[str, Any]:
        versions = [p.model_dump(mode="json") for p in journeys.all() if p.journey.id == journey_id]
        if not versions:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no published journey '{journey_id}'")
        return {"id": journey_id, "versions": versions}

    # --- templates: draft -> ready ------------------------------------------------------------

    async def _template(template_id: str) -> dict[str, Any]:
        document = await templates.get(template_id)
        if document is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no template '{template_id}'")
        return document

    @app.put("/v1/templates/{template_id}", dependencies=editor, summary="Save as a draft")
    async def put_template(template_id: str, content: TemplateContent) -> dict[str, Any]:
        document = template_rules.edited(await templates.get(template_id), content, clock.now())
        await templates.replace(template_id, document)
        return template_rules.view(template_id, document)

    @app.post("/v1/templates/{template_id}/ready", dependencies=publisher, summary="Mark ready")
    async def ready_template(template_id: str) -> dict[str, Any]:
        document = template_rules.readied(await _template(template_id), clock.now())
        await templates.replace(template_id, document)
        return template_rules.view(template_id, document)

    @app.get("/v1/templates/{template_id}", dependencies=viewer, summary="One template")
    async def get_template(template_id: str) -> dict[str, Any]:
        return template_rules.view(template_id, await _template(template_id))

    # --- journeys: draft -> published -> paused / active -> archived ----------------------

    @app.put("/v1/journeys/{journey_id}/draft", dependencies=editor, summary="Save a draft")
    async def put_draft(journey_id: str, definition: Annotated[Any, Body()]) -> dict[str, Any]:
        _parsed, problems = validate_draft(definition, await templates.ids(), journey_id)
        if problems:
            raise Problems(422, "the draft has problems", problems)
        now = clock.now()
        await drafts.put(journey_id, definition, now)
        return {"id": journey_id, "definition": definition, "updated_at": now}

    @app.get("/v1/journeys/{journey_id}/draft", dependencies=viewer, summary="The draft")
    async def get_draft(journey_id: str) -> dict[str, Any]:
        draft = await drafts.get(journey_id)
        if draft is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no draft of journey '{journey_id}'")
        return {"id": journey_id, **draft}

    @app.post(
        "/v1/journeys/{journey_id}/publish",
        dependencies=publisher,
        status_code=status.HTTP_201_CREATED,
        summary="Publish the draft as a new, immutable version",
    )
    async def publish(journey_id: str, response: Response) -> dict[str, Any]:
        draft = await drafts.get(journey_id)
        if draft is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"no draft of journey '{journey_id}': PUT /v1/journeys/{journey_id}/draft first",
            )
        async with lifecycle:
            parsed, problems = validate_draft(
                draft["definition"], await templates.ids(), journey_id
            )
            if parsed is None:
                raise Problems(422, "the draft has problems", problems)
            stored = await templates.documents(templates_used(parsed))
            decision = decide_publish(parsed, definitions.all(), stored, clock.now())
            if isinstance(decision, Refused):
                raise Problems(409, "not published", decision.problems)
            if isinstance(decision, Unchanged):
                response.status_code = status.HTTP_200_OK
                await templates.write_shipped(decision.templates, clock.now())
                return decision.record.model_dump(mode="json")
            # Templates first, so the dispatcher finds them when the first instance sends.
            await templates.write_shipped(decision.templates, decision.record.published_at)
            await definitions.write(decision.record)
            return decision.record.model_dump(mode="json")

    async def change_status(journey_id: str, change: StatusChange) -> dict[str, Any]:
        async with lifecycle:
            decision = decide_status_change(journey_id, definitions.all(), change)
            if isinstance(decision, Refused):
                if "journey-published" in decision.rules():
                    raise HTTPException(
                        status.HTTP_404_NOT_FOUND, f"no published journey '{journey_id}'"
                    )
                raise Problems(409, f"not {change}d", decision.problems)
            await definitions.write(decision)
            return decision.model_dump(mode="json")

    @app.post("/v1/journeys/{journey_id}/pause", dependencies=publisher, summary="Stop entries")
    async def pause(journey_id: str) -> dict[str, Any]:
        return await change_status(journey_id, "pause")

    @app.post("/v1/journeys/{journey_id}/resume", dependencies=publisher, summary="Let them in")
    async def resume(journey_id: str) -> dict[str, Any]:
        return await change_status(journey_id, "resume")

    @app.post(
        "/v1/journeys/{journey_id}/archive", dependencies=publisher, summary="End it, finally"
    )
    async def archive(journey_id: str) -> dict[str, Any]:
        return await change_status(journey_id, "archive")

    @app.get(
        "/v1/journeys/{journey_id}/conversion",
        dependencies=viewer,
        summary="Conversion of treated contacts against the holdout group",
    )
    async def conversion(journey_id: str) -> dict[str, Any]:
        report = conversion_report(await journey_log.conversion_counts(journey_id))
        return {"id": journey_id, **report.as_dict()}

    # --- segments and aggregates ------------------------------------------------------------

    def _published_segment(segment_id: str) -> PublishedSegment:
        found = next((p for p in journeys.segments() if p.segment.id == segment_id), None)
        if found is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no published segment '{segment_id}'")
        return found

    @app.get("/v1/segments", dependencies=viewer, summary="Published segments, live counts")
    async def list_segments() -> dict[str, Any]:
        totals = segment_views.segment_totals(segment_counts.latest())
        items = [
            segment_views.segment_view(p, totals.get(p.segment.id, segment_views.SegmentTotal()))
            for p in journeys.segments()
        ]
        return {"count": len(items), "segments": items}

    @app.put(
        "/v1/segments",
        dependencies=publisher,
        status_code=status.HTTP_201_CREATED,
        summary="Publish a segment file (aggregates and segments)",
    )
    async def put_segments(
        definition: Annotated[Any, Body()], response: Response
    ) -> dict[str, Any]:
        parsed, problems = segment_file_from(definition)
        if parsed is None:
            raise Problems(422, "the segment file has problems", problems)
        async with lifecycle:
            decision = decide_segments_publish(
                parsed, journeys.aggregates(), journeys.segments(), clock.now()
            )
            if isinstance(decision, SegmentsRefused):
                raise Problems(422, "the segment file has problems", decision.problems)
            await segment_definitions.publish(decision.records)
        if not decision.records:
            response.status_code = status.HTTP_200_OK
        return {
            "published": [r.key for r in decision.records],
            "unchanged": [r.key for r in decision.unchanged],
        }

    @app.get("/v1/segments/{segment_id}", dependencies=viewer, summary="One segment")
    async def get_segment(segment_id: str) -> dict[str, Any]:
        published = _published_segment(segment_id)
        totals = segment_views.segment_totals(segment_counts.latest())
        return segment_views.segment_view(
            published, totals.get(segment_id, segment_views.SegmentTotal())
        )

    @app.get(
        "/v1/segments/{segment_id}/members",
        dependencies=viewer,
        summary="A sample of a segment's members, from the stored profiles",
    )
    async def segment_members(
        segment_id: str, limit: Annotated[int, Query(ge=1, le=500)] = 20
    ) -> dict[str, Any]:
        _published_segment(segment_id)
        documents = await contacts.in_segment(segment_id, limit)
        return {
            "id": segment_id,
            "limit": limit,
            "members": [segment_views.contact_view(d) for d in documents],
        }

    @app.delete("/v1/segments/{segment_id}", dependencies=publisher, summary="Delete a segment")
    async def delete_segment(segment_id: str) -> dict[str, Any]:
        async with lifecycle:
            decision = decide_segment_delete(segment_id, journeys.segments(), journeys.all())
            if isinstance(decision, SegmentsRefused):
                if {p.rule for p in decision.problems} == {"segment-published"}:
                    raise HTTPException(
                        status.HTTP_404_NOT_FOUND, f"no published segment '{segment_id}'"
                    )
                raise Problems(409, "not deleted", decision.problems)
            await segment_definitions.delete(decision)
        return {"id": segment_id, "deleted": True}

    @app.get("/v1/aggregates", dependencies=viewer, summary="Published aggregates")
    async def list_aggregates() -> dict[str, Any]:
        segments = journeys.segments()
        items = [segment_views.aggregate_view(p, segments) for p in journeys.aggregates()]
        return {"count": len(items), "aggregates": items}

    # --- contacts -------------------------------------------------------------------------

    @app.get("/v1/contacts/{contact_key:path}", dependencies=viewer, summary="A stored profile")
    async def get_contact(contact_key: str) -> dict[str, Any]:
        document = await contacts.get(contact_key)
        if document is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no stored profile '{contact_key}'")
        return segment_views.contact_view(document)

    @app.delete(
        "/v1/contacts/{contact_key:path}",
        dependencies=publisher,
        status_code=status.HTTP_202_ACCEPTED,
        summary="Forget a contact: the segmenter erases its profile and announces it",
    )
    async def forget_contact(contact_key: str) -> dict[str, Any]:
        command = segment_views.forget_command(contact_key, clock.now())
        await contact_commands.send(command)
        return {"contact_key": contact_key, "command_id": command.command_id, "kind": "forget"}

    @app.put(
        "/v1/contacts/{contact_key:path}/consent",
        dependencies=publisher,
        summary="Record a contact's consent to a channel (the only way besides signed links)",
    )
    async def set_consent(contact_key: str, change: ConsentChange) -> dict[str, Any]:
        document = await contacts.get(contact_key)
        if document is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no stored profile '{contact_key}'")
        event = segment_views.consent_event(
            document, change.channel, change.subscribed, clock.now()
        )
        await contact_commands.record(event)
        return {"contact_key": contact_key, "event": event.event, "channel": change.channel}

    @app.get("/v1/stats", dependencies=viewer, summary="Figures read from Kafka and the store")
    async def stats() -> dict[str, Any]:
        by_journey = await journey_log.counts()
        return {
            "events_in_log": await asyncio.to_thread(events_in_log),
            "journeys": by_journey,
            "journeys_entered": sum(kinds.get("entered", 0) for kinds in by_journey.values()),
            "messages": await message_counts(),
        }

    # --- the audit log ----------------------------------------------------------------------

    # Publishers only: the log shows what every key did, and which contacts they changed.
    @app.get("/v1/audit", dependencies=publisher, summary="Changes asked of the API, newest first")
    async def audit(
        key: Annotated[str | None, Query(max_length=64, description="a key's name")] = None,
        contact: Annotated[
            str | None,
            Query(
                min_length=1,
                max_length=1024,
                description="a contact's key: the entries about it (found by its digest)",
            ),
        ] = None,
        since: Annotated[AwareDatetime | None, Query(description="entries at or after")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    ) -> dict[str, Any]:
        found = await audit_trail.page(
            key=key,
            contact=digest(contact) if contact is not None else None,
            since=since,
            limit=limit + 1,
            offset=offset,
        )
        entries = found[:limit]
        return {
            "count": len(entries),
            "entries": entries,
            "next_offset": offset + limit if len(found) > limit else None,
        }

    # The web UI at `/`: pages over the routes above (services/admin/ui, docs/ui.md).
    secret = settings.admin_session_secret
    mount_ui(
        app,
        keys,
        {key.name: key for key in configured},
        session_secret(
            secret.get_secret_value() if secret else None, (k.secret for k in configured)
        ),
        clock,
        session_hours=settings.admin_session_hours,
        secure_cookie=settings.admin_session_cookie_secure,
    )
    return app


class JsonBodies:
    """ASGI middleware: a request body is read under a byte cap as it streams (413 past it), and
    a JSON body must parse (no lone surrogates) and nest no deeper than 32 levels (400 naming
    the field), before any route sees it. Every refusal is `{"detail": …, "field": …}`."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        try:
            reader = BodyReader(
                self.limit, headers.get(b"content-length"), headers.get(b"content-encoding")
            )
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                reader.feed(message.get("body", b""))
                more = message.get("more_body", False)
            body = reader.body()
            if body and b"json" in headers.get(b"content-type", b"").lower():
                value = parse_json(body)
                check_depth(value if isinstance(value, dict) else {"body": value})
        except BadInput as exc:
            answer = JSONResponse(
                status_code=exc.status, content={"detail": exc.message, "field": exc.field}
            )
            await answer(scope, receive, send)
            return
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if replayed:
                return await receive()  # the app waits for a disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        if reader.compressed:  # the app reads the body decompressed
            scope = {**scope, "headers": _without(scope["headers"], _BODY_FRAMING)}
        await self.app(scope, replay, send)


_BODY_FRAMING = (b"content-encoding", b"content-length")


def _without(headers: list[tuple[bytes, bytes]], names: tuple[bytes, ...]) -> list[Any]:
    return [(name, value) for name, value in headers if name not in names]
