"""The dead letters through the admin API: list them (newest first), and replay chosen ones to
the topics they came from (publishers: a replay is processed again, sends included)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, status
from fastapi.params import Depends
from pydantic import BaseModel, ConfigDict, Field

from services.admin.adapters.dead_letters import DeadLetterTopic

_POSITION = r"^[0-9]{1,6}:[0-9]{1,19}$"


class Replay(BaseModel):
    """`POST /v1/dead-letters/replay`: the letters to replay, by `partition:offset`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    positions: tuple[Annotated[str, Field(pattern=_POSITION)], ...] = Field(
        min_length=1, max_length=500
    )


def add_dead_letter_routes(
    app: FastAPI, viewer: list[Depends], publisher: list[Depends], topic: DeadLetterTopic
) -> None:
    @app.get("/v1/dead-letters", dependencies=viewer, summary="Dead letters, newest first")
    async def list_dead_letters(
        service: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ) -> dict[str, Any]:
        found = [s for s in await topic.letters() if service is None or s.letter.service == service]
        found.sort(key=lambda s: (s.letter.at, s.partition, s.offset), reverse=True)
        items = [
            {
                "position": s.position,
                "service": s.letter.service,
                "topic": s.letter.topic,
                "partition": s.letter.partition,
                "offset": s.letter.offset,
                "key": s.letter.key,
                "reason": s.letter.reason,
                "at": s.letter.at,
            }
            for s in found[:limit]
        ]
        return {"count": len(items), "total": len(found), "dead_letters": items}

    @app.post(
        "/v1/dead-letters/replay",
        dependencies=publisher,
        summary="Write chosen dead letters' records back to the topics they came from",
    )
    async def replay(chosen: Replay) -> dict[str, Any]:
        wanted = set(chosen.positions)
        letters = [s for s in await topic.letters() if s.position in wanted]
        missing = sorted(wanted - {s.position for s in letters})
        if missing:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"positions: no dead letter at {', '.join(missing[:10])}",
            )
        letters.sort(key=lambda s: (s.partition, s.offset))
        return {"replayed": await topic.replay(letters), "positions": sorted(wanted)}
