"""Admin API: a template's preview and its test send. The preview renders the editor's content
with the dispatcher's renderer for a stored contact and a sample trigger event; the test send
hands the same to the dispatcher, addressed to a marketer's own inbox or phone."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime.

from typing import Any

from fastapi import FastAPI, HTTPException, params, status
from pydantic import BaseModel, ConfigDict, Field

from services.admin.adapters.journeys import TemplateStore
from services.admin.adapters.segments import Contacts
from services.admin.adapters.test_sends import TestSends
from services.admin.domain import previews
from services.admin.domain.segments import contact_view
from shared.clock import Clock
from shared.contracts import Profile


class PreviewAsked(BaseModel):
    """`POST /v1/templates/{id}/preview`: the content (else the template's latest), the
    contact to render for (else a contact with nothing known) and a sample trigger event."""

    model_config = ConfigDict(extra="forbid")

    content: previews.PreviewContent | None = None
    contact_key: str | None = Field(default=None, min_length=1, max_length=1024)
    event: previews.SampleEvent | None = None


class TestSendAsked(PreviewAsked):
    """`POST /v1/templates/{id}/test-send`: as a preview, to `address` (an e-mail address for
    an email template, a phone number for an SMS one)."""

    __test__ = False  # not a pytest test class

    contact_key: str = Field(min_length=1, max_length=1024)
    address: str = Field(min_length=3, max_length=320)


def add_template_routes(
    app: FastAPI,
    viewer: list[params.Depends],
    editor: list[params.Depends],
    templates: TemplateStore,
    contacts: Contacts,
    test_sends: TestSends | None,
    clock: Clock,
) -> None:
    async def content_of(template_id: str, asked: PreviewAsked) -> previews.PreviewContent:
        if asked.content is not None:
            return asked.content
        document = await templates.get(template_id)
        if document is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no template '{template_id}'")
        latest = document.get("draft") or document
        return previews.PreviewContent.model_validate(
            {k: v for k, v in latest.items() if k in previews.PreviewContent.model_fields}
        )

    async def profile_of(contact_key: str | None) -> Profile:
        if contact_key is None:
            return previews.empty_profile("preview-contact", clock.now())
        document = await contacts.get(contact_key)
        if document is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"contact_key: no stored profile '{contact_key}'"
            )
        return Profile.model_validate(contact_view(document))

    @app.post(
        "/v1/templates/{template_id}/preview",
        dependencies=viewer,
        summary="Render a template for a contact and a sample trigger event (changes nothing)",
    )
    async def preview(template_id: str, asked: PreviewAsked) -> dict[str, Any]:
        content = await content_of(template_id, asked)
        profile = await profile_of(asked.contact_key)
        variables = previews.preview_variables(profile, asked.event, clock.now())
        fields = previews.render_fields(content.model_dump(), variables)
        return {
            "id": template_id,
            "channel": content.channel,
            "contact_key": asked.contact_key,
            "ok": not any("error" in f for f in fields),
            "fields": fields,
            "variables": previews.variable_list(),
        }

    @app.post(
        "/v1/templates/{template_id}/test-send",
        dependencies=editor,
        status_code=status.HTTP_202_ACCEPTED,
        summary="Send one test of a template to an address, through the dispatcher",
    )
    async def test_send(template_id: str, asked: TestSendAsked) -> dict[str, Any]:
        content = await content_of(template_id, asked)
        address = asked.address.strip()
        problem = previews.address_problem(content.channel, address)
        if problem is not None:
            field = "channel" if content.channel not in previews.TESTABLE else "address"
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"{field}: {problem}")
        profile = await profile_of(asked.contact_key)
        now = clock.now()
        failing = [
            f
            for f in previews.render_fields(
                content.model_dump(), previews.preview_variables(profile, asked.event, now)
            )
            if "error" in f
        ]
        if failing:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                "; ".join(f"{f['field']}: {f['error']}" for f in failing),
            )
        if test_sends is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "test sends are not set up")
        request = previews.send_request_for_test(
            template_id, content, profile, asked.event, address, now
        )
        await test_sends.send(request)
        return {
            "id": template_id,
            "message_id": request.message_id,
            "channel": request.channel,
            "contact_key": request.contact_key,
            "journey_id": request.journey_id,
        }
