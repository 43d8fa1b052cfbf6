"""Changes to a contact's tags and traits through the admin API (publishers: a tag or trait may
start a journey or move the contact between segments)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, status
from fastapi.params import Depends

from services.admin.adapters.segments import ContactCommands, Contacts
from services.admin.domain.contact_changes import ContactChanges, change_commands
from shared.clock import Clock


def add_contact_routes(
    app: FastAPI,
    publisher: list[Depends],
    contacts: Contacts,
    contact_commands: ContactCommands,
    clock: Clock,
) -> None:
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
