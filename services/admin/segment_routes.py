"""Admin API: a segment's estimated count before it is published (its conditions evaluated
against a sample of stored profiles, scaled to them all) and a published segment's count over
time, as the admin recorded it (`adapters/count_history.py`)."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime.

from typing import Annotated, Any

from fastapi import Body, FastAPI, HTTPException, Query, params, status
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from services.admin.adapters.count_history import CountHistory, since
from services.admin.adapters.segments import Contacts, SegmentCounts
from services.admin.domain.segment_insight import estimate, matches
from services.admin.domain.segments import contact_view, segment_totals
from shared.clock import Clock
from shared.contracts import Profile
from shared.definitions import PublishedJourneys
from shared.segment_checks import SegmentsRefused, decide_segments_publish, segment_file_from

DEFAULT_SAMPLE = 1000


def add_segment_builder_routes(
    app: FastAPI,
    viewer: list[params.Depends],
    journeys: PublishedJourneys,
    contacts: Contacts,
    segment_counts: SegmentCounts,
    count_history: CountHistory | None,
    clock: Clock,
) -> None:
    @app.post(
        "/v1/segments/estimate",
        dependencies=viewer,
        summary="Check a segment file as publishing would, and estimate each segment's count",
    )
    async def estimate_segments(
        definition: Annotated[Any, Body()],
        sample: Annotated[int, Query(ge=1, le=10_000)] = DEFAULT_SAMPLE,
    ) -> Any:
        parsed, problems = segment_file_from(definition)
        if parsed is None:
            return _refused(problems)
        now = clock.now()
        decision = decide_segments_publish(parsed, journeys.aggregates(), journeys.segments(), now)
        if isinstance(decision, SegmentsRefused):
            return _refused(decision.problems)
        documents, total = await contacts.sample(sample)
        profiles = []
        for document in documents:
            try:
                profiles.append(Profile.model_validate(contact_view(document)))
            except ValidationError:
                total -= 1  # a stored profile the contract no longer reads: not counted
        counted = matches(parsed.segments, profiles, now)
        published = {p.aggregate for p in journeys.aggregates()}
        unpublished = sorted(a.id for a in parsed.aggregates if a not in published)
        return {
            "estimated_at": now,
            "sampled": len(profiles),
            "total": total,
            "segments": [
                {
                    "id": s.id,
                    "name": s.name,
                    **estimate(counted[s.id], len(profiles), total).as_dict(),
                }
                for s in parsed.segments
            ],
            # Stored profiles hold only published aggregates' values: these read as absent.
            "aggregates_not_yet_computed": unpublished,
        }

    @app.get(
        "/v1/segments/{segment_id}/history",
        dependencies=viewer,
        summary="A segment's member count over time, one reading per interval",
    )
    async def segment_history(
        segment_id: str, hours: Annotated[float, Query(gt=0, le=24 * 90)] = 24 * 7
    ) -> dict[str, Any]:
        if all(p.segment.id != segment_id for p in journeys.segments()):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no published segment '{segment_id}'")
        readings = (
            await count_history.readings(segment_id, since(clock.now(), hours))
            if count_history is not None
            else []
        )
        total = segment_totals(segment_counts.latest()).get(segment_id)
        return {
            "id": segment_id,
            "hours": hours,
            "interval_seconds": count_history.interval if count_history is not None else None,
            "readings": [{"at": at, "members": members} for at, members in readings],
            "members_now": total.members if total is not None else 0,
        }


def _refused(problems: Any) -> JSONResponse:
    listed = list(problems)
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={
            "detail": "the segment file has problems: " + "; ".join(str(p) for p in listed),
            "problems": [p.model_dump() for p in listed],
        },
    )
