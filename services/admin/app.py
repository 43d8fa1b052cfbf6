"""Admin API: published journeys and live figures read from the system itself.

It grows into the marketers' workspace (drafts, templates, segments) in later versions.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.admin.adapters.analytics import JourneyLogStore
from services.admin.settings import AdminSettings
from shared.definitions import PublishedJourneys

# Module level: route annotations are resolved against module globals.
_bearer = HTTPBearer(auto_error=False)

MessageCounts = Callable[[], Awaitable[dict[str, int]]]
EventCount = Callable[[], int]


def create_app(
    settings: AdminSettings,
    journeys: PublishedJourneys,
    journey_log: JourneyLogStore,
    message_counts: MessageCounts,
    events_in_log: EventCount,
) -> FastAPI:
    app = FastAPI(title="Waypost admin", version="1")
    keys = settings.api_keys()

    def authorised(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        presented = credentials.credentials if credentials else ""
        if not any(secrets.compare_digest(presented, key) for key in keys):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "missing or unknown admin API key (Authorization: Bearer <key>)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    guarded = [Depends(authorised)]

    @app.get("/health", summary="Liveness")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/journeys", dependencies=guarded, summary="Published journey versions")
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

    @app.get("/v1/journeys/{journey_id}", dependencies=guarded, summary="One journey's versions")
    async def get_journey(journey_id: str) -> dict[str, Any]:
        versions = [p.model_dump(mode="json") for p in journeys.all() if p.journey.id == journey_id]
        if not versions:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no published journey '{journey_id}'")
        return {"id": journey_id, "versions": versions}

    @app.get("/v1/stats", dependencies=guarded, summary="Figures read from Kafka and the store")
    async def stats() -> dict[str, Any]:
        by_journey = await journey_log.counts()
        return {
            "events_in_log": await asyncio.to_thread(events_in_log),
            "journeys": by_journey,
            "journeys_entered": sum(kinds.get("entered", 0) for kinds in by_journey.values()),
            "messages": await message_counts(),
        }

    return app
