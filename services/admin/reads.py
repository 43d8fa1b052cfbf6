"""Read routes the admin web UI is built on, open to every viewer key so that what the pages
show can be scripted too: a journey's step figures, template list, contact search, a contact's
journeys and messages, delivery funnels, and the channels paused by a configuration error."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Query, status
from fastapi.params import Depends

from services.admin.adapters.insights import Insights
from services.admin.domain import segments as segment_views
from services.admin.domain import templates as template_rules
from services.admin.domain.figures import contact_positions, funnels, journey_figures
from services.admin.domain.timeline import contact_timeline
from services.admin.domain.versions import definition_diff, journey_changes
from services.admin.domain.why_paths import journey_paths
from shared.channel_pauses import PAUSED_ALERT_METRIC, paused_now
from shared.clock import Clock
from shared.definitions import PublishedJourneys
from shared.journeys import Journey


def add_read_routes(
    app: FastAPI,
    viewer: list[Depends],
    insights: Insights,
    journeys: PublishedJourneys,
    clock: Clock,
) -> None:

    @app.get(
        "/v1/journeys/{journey_id}/figures",
        dependencies=viewer,
        summary="Where a journey's instances stand, step by step, and its sends by state",
    )
    async def figures(journey_id: str) -> dict[str, Any]:
        if not any(p.journey.id == journey_id for p in journeys.all()):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no published journey '{journey_id}'")
        folded = journey_figures(await insights.journey_records(journey_id))
        sends: dict[str, dict[str, dict[str, int]]] = {}
        for row in await insights.delivery_counts(journey_id):
            step = sends.setdefault(str(row.get("step_id")), {"states": {}, "reasons": {}})
            state = str(row.get("state"))
            step["states"][state] = step["states"].get(state, 0) + row["count"]
            if row.get("reason") and state in ("skipped", "failed"):
                reason = f"{state}: {row['reason']}"
                step["reasons"][reason] = step["reasons"].get(reason, 0) + row["count"]
        return {"id": journey_id, **folded.as_dict(), "sends": sends}

    def version_pair(journey_id: str, older: int, newer: int) -> tuple[Journey, Journey]:
        """The two published versions, or a 404 naming the parameter of the missing one."""
        held = {p.journey.version: p.journey for p in journeys.all() if p.journey.id == journey_id}
        if not held:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no published journey '{journey_id}'")
        for name, version in (("from", older), ("to", newer)):
            if version not in held:
                raise HTTPException(
                    status.HTTP_404_NOT_FOUND,
                    f"{name}: journey '{journey_id}' has no published version {version}",
                )
        return held[older], held[newer]

    def as_json(journey: Journey) -> dict[str, Any]:
        return journey.model_dump(mode="json", by_alias=True, exclude_none=True)

    @app.get(
        "/v1/journeys/{journey_id}/changes",
        dependencies=viewer,
        summary="What changed between two published versions of a journey",
    )
    async def changes(
        journey_id: str,
        from_version: Annotated[int, Query(alias="from", ge=1, description="the older version")],
        to_version: Annotated[int, Query(alias="to", ge=1, description="the newer version")],
    ) -> dict[str, Any]:
        older, newer = version_pair(journey_id, from_version, to_version)
        found = journey_changes(as_json(older), as_json(newer))
        return {
            "id": journey_id,
            "from": from_version,
            "to": to_version,
            "changes": [c.as_dict() for c in found],
        }

    @app.get(
        "/v1/journeys/{journey_id}/diff",
        dependencies=viewer,
        summary="The text diff (unified, of the definitions as YAML) between two published "
        "versions of a journey",
    )
    async def diff(
        journey_id: str,
        from_version: Annotated[int, Query(alias="from", ge=1, description="one version")],
        to_version: Annotated[int, Query(alias="to", ge=1, description="the other version")],
    ) -> dict[str, Any]:
        older, newer = version_pair(journey_id, from_version, to_version)
        lines = definition_diff(
            as_json(older), as_json(newer), from_version=from_version, to_version=to_version
        )
        return {
            "id": journey_id,
            "from": from_version,
            "to": to_version,
            "added": sum(1 for line in lines if line.kind == "added"),
            "removed": sum(1 for line in lines if line.kind == "removed"),
            "unified": "\n".join(line.text for line in lines),
            "lines": [line.as_dict() for line in lines],
        }

    @app.get("/v1/templates", dependencies=viewer, summary="Every template")
    async def list_templates() -> dict[str, Any]:
        items = [
            template_rules.view(str(document["_id"]), document)
            for document in await insights.templates()
        ]
        return {"count": len(items), "templates": items}

    @app.get("/v1/contacts", dependencies=viewer, summary="Find contacts by key, e-mail or phone")
    async def find_contacts(
        q: Annotated[str, Query(min_length=1, max_length=320, description="key, e-mail, phone")],
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> dict[str, Any]:
        found = await insights.find_contacts(q.strip(), limit)
        return {"count": len(found), "contacts": [segment_views.contact_view(d) for d in found]}

    @app.get(
        "/v1/journey-log",
        dependencies=viewer,
        summary="A contact's journey instances: where each stands, its log records, and per "
        "journey its path with the why of every decision",
    )
    async def contact_journey_log(
        contact_key: Annotated[str, Query(min_length=1, max_length=1024)],
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    ) -> dict[str, Any]:
        records = await insights.contact_records(contact_key, limit)
        for record in records:
            record.pop("_id", None)
        step_orders = {
            (p.journey.id, p.journey.version): {s.id: n for n, s in enumerate(p.journey.steps)}
            for p in journeys.all()
        }
        return {
            "contact_key": contact_key,
            "instances": contact_positions(records),
            "records": records,
            "paths": journey_paths(records, step_orders),
        }

    @app.get(
        "/v1/contacts/{contact_key:path}/timeline",
        dependencies=viewer,
        summary="A contact's recent events, journey steps and messages with their delivery "
        "states, newest first",
    )
    async def contact_timeline_route(
        contact_key: str,
        limit: Annotated[int, Query(ge=1, le=500, description="lines at most")] = 100,
    ) -> dict[str, Any]:
        events = await insights.recent_events(contact_key)
        records = await insights.contact_records(contact_key, limit)
        found = await insights.messages(contact_key=contact_key, journey_id=None, limit=limit)
        messages = [{"message_id": d.pop("_id"), **d} for d in found]
        lines = contact_timeline(events, records, messages)[:limit]
        return {"contact_key": contact_key, "count": len(lines), "lines": lines}

    @app.get("/v1/messages", dependencies=viewer, summary="Messages from the ledger, newest first")
    async def messages(
        contact_key: Annotated[str | None, Query(min_length=1, max_length=1024)] = None,
        journey_id: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> dict[str, Any]:
        found = await insights.messages(contact_key=contact_key, journey_id=journey_id, limit=limit)
        items = [{"message_id": d.pop("_id"), **d} for d in found]
        return {"count": len(items), "messages": items}

    @app.get(
        "/v1/delivery/funnel",
        dependencies=viewer,
        summary="Requested → sent → delivered → opened → clicked, skips and failures by reason",
    )
    async def delivery_funnel(
        by: Literal["journey_id", "template_id", "channel"] = "journey_id",
    ) -> dict[str, Any]:
        return {"by": by, "funnels": funnels(await insights.delivery_counts(), by)}

    @app.get(
        "/v1/delivery/paused-channels",
        dependencies=viewer,
        summary="Channels paused now by a provider's configuration error, with the reason",
    )
    async def paused_channels() -> dict[str, Any]:
        paused = paused_now(await insights.channel_pauses(), clock.now())
        return {"count": len(paused), "paused": paused, "alert_metric": PAUSED_ALERT_METRIC}
