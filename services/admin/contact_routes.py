"""Changes to contacts' tags and traits through the admin API, one contact at a time or many
from a CSV file (publishers: a tag or trait may start a journey or move the contact between
segments)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request, Response, status
from fastapi.params import Depends
from fastapi.responses import JSONResponse

from services.admin.access import audit_counts
from services.admin.adapters.segments import ContactCommands, Contacts
from services.admin.domain.contact_changes import ContactChanges, change_commands
from services.admin.domain.contact_import import (
    KEY_COLUMN,
    MAX_ROWS,
    TAG_SEPARATOR,
    TAGS_COLUMN,
    ImportProblem,
    read_import,
    unknown_contacts,
)
from shared.clock import Clock

CSV_TYPES = ("text/csv", "application/csv")

IMPORT_DESCRIPTION = f"""
The body is a CSV file, sent as `Content-Type: text/csv` (UTF-8, a byte-order mark allowed),
at most the admin's request body cap (`WAYPOST_ADMIN_MAX_BODY_BYTES`) and {MAX_ROWS:,} rows
after the header row.

- `{KEY_COLUMN}` (required): the contact, which must have a stored profile;
- `{TAGS_COLUMN}` (optional): tags to add, separated by `{TAG_SEPARATOR}`;
- any other column: a trait to set to the cell's text.

An empty cell leaves the contact unchanged. Rows of the same contact add up (a later row's
trait value wins). The whole file is checked before anything is sent: a problem answers 422
with `problems`, each naming its `row` (the header is row 1) and `column`. With
`dry_run=true` nothing is sent; the answer gives the counts the import would have.
Otherwise the commands go to the segmenter as those of `POST /v1/contacts/{{key}}/changes`
(announced as `Tag Added` and `Attribute Changed`), and the answer (202) comes once Kafka has
them all. The audit log keeps the counts, never the file.
"""


def add_contact_routes(
    app: FastAPI,
    publisher: list[Depends],
    contacts: Contacts,
    contact_commands: ContactCommands,
    clock: Clock,
) -> None:
    @app.post(
        "/v1/contacts/import",
        dependencies=publisher,
        status_code=status.HTTP_202_ACCEPTED,
        summary="Import tags and traits of many stored contacts from a CSV file",
        description=IMPORT_DESCRIPTION,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "text/csv": {
                        "schema": {"type": "string"},
                        "example": f"{KEY_COLUMN},{TAGS_COLUMN},plan\nu-1,vip;beta,gold\n",
                    }
                },
            }
        },
        responses={
            200: {"description": "a dry run: the counts, nothing sent"},
            415: {"description": "the body is not text/csv"},
            422: {"description": "problems, each with its row and column; nothing sent"},
        },
    )
    async def import_contacts(
        request: Request,
        response: Response,
        dry_run: Annotated[bool, Query(description="check and count, send nothing")] = False,
    ) -> Any:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type not in CSV_TYPES:
            raise HTTPException(
                status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                f"Content-Type: send the file as text/csv, not '{media_type or 'none'}'",
            )
        found = read_import(await request.body())
        if isinstance(found, list):
            return _refused(request, found)
        problems = unknown_contacts(found, await contacts.stored(list(found.first_rows)))
        if problems:
            return _refused(request, problems)
        counts = found.counts()
        audit_counts(request, counts)
        if dry_run:
            response.status_code = status.HTTP_200_OK
            return {"dry_run": True, **counts}
        commands = found.commands(clock.now())
        await contact_commands.send_all(commands)
        return {"dry_run": False, **counts, "commands": len(commands)}

    @app.post(
        "/v1/contacts/{contact_key:path}/changes",
        dependencies=publisher,
        status_code=status.HTTP_202_ACCEPTED,
        summary="Add or remove a stored contact's tags, set its traits (applied by the segmenter)",
    )
    async def change_contact(contact_key: str, changes: ContactChanges) -> dict[str, Any]:
        if await contacts.get(contact_key) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no stored profile '{contact_key}'")
        commands = change_commands(contact_key, changes, clock.now())
        for command in commands:
            await contact_commands.send(command)
        return {
            "contact_key": contact_key,
            "commands": [{"kind": c.kind, "command_id": c.command_id} for c in commands],
        }


def _refused(request: Request, problems: list[ImportProblem]) -> JSONResponse:
    audit_counts(request, {"problems": len(problems)})
    shown = "; ".join(str(p) for p in problems[:5])
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={
            "detail": f"the file has problems, nothing was imported: {shown}{more}",
            "problems": [p.as_dict() for p in problems],
        },
    )
