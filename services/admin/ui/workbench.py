"""The UI's template editor with its live preview and test send, the segment builder with its
estimated count, and a segment's count-over-time chart. Like every page, they ask the admin's
JSON API in-process with the signed-in key (`pages.py`)."""

# No `from __future__ import annotations`: FastAPI reads the dependencies' annotations at runtime.

import asyncio
from datetime import datetime
from functools import partial
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Form, Request, status
from fastapi.responses import Response

from services.admin.domain.previews import variable_list
from services.admin.domain.segment_insight import count_chart
from services.admin.ui.pages import AdminUi, PageRole, Signed, _detail, _quote
from shared.bodies import BadInput, parse_json_text, parse_yaml
from shared.channels import CHANNELS

# What the builder opens with: one segment, its condition in the form segment files use.
STARTER_SEGMENT = """segments:
  - id: big-spenders
    name: Big spenders
    condition:
      all:
        - field: traits.plan
          op: eq
          value: pro
"""

Text = Annotated[str, Form(max_length=200_000)]


def mount_workbench(app: FastAPI, ui: AdminUi) -> None:
    viewer = Annotated[Signed, Depends(PageRole("viewer", ui))]
    editor = Annotated[Signed, Depends(PageRole("editor", ui))]
    get = partial(app.get, include_in_schema=False)
    post = partial(app.post, include_in_schema=False)

    # --- templates ----------------------------------------------------------------------

    @post("/templates/{template_id}/preview")
    async def preview(
        request: Request,
        template_id: str,
        signed: viewer,
        form: EditorForm,
    ) -> Response:
        return await template_page(ui, request, signed, template_id, form)

    @post("/templates/{template_id}/test-send")
    async def test_send(
        request: Request,
        template_id: str,
        signed: editor,
        form: EditorForm,
    ) -> Response:
        body, problem = _preview_body(form)
        if problem is None and not form["contact_key"]:
            problem = "contact_key: choose the contact to render the test for"
        sent = None
        if problem is None:
            answer = await ui.api(
                signed,
                "POST",
                f"/v1/templates/{_quote(template_id)}/test-send",
                {**body, "address": form["address"]},
            )
            if answer.status_code == 202:
                sent = answer.json()
            else:
                problem = _detail(answer)
        return await template_page(
            ui, request, signed, template_id, form, sent=sent, send_problem=problem
        )

    # --- segments -----------------------------------------------------------------------

    @get("/segment-builder")
    async def builder(request: Request, signed: viewer) -> Response:
        return ui.page(request, "segment_builder.html", signed, text=STARTER_SEGMENT, estimate=None)

    @post("/segment-builder")
    async def estimate(
        request: Request,
        signed: viewer,
        definition: Annotated[str, Form(max_length=500_000)] = "",
        publish: Annotated[str, Form(max_length=8)] = "",
    ) -> Response:
        def again(code: int, **found: Any) -> Response:
            return ui.page(
                request,
                "segment_builder.html",
                signed,
                code,
                text=definition,
                **{"estimate": None, "problems": None, "published": None, **found},
            )

        try:
            parsed = await asyncio.to_thread(parse_yaml, definition, "definition")
        except BadInput as exc:
            return again(422, problems=[{"segment": None, "rule": "yaml", "message": exc.message}])
        answer = await ui.api(signed, "POST", "/v1/segments/estimate", parsed)
        if answer.status_code == 422:
            found = answer.json().get("problems") or [
                {"segment": None, "rule": "body", "message": _detail(answer)}
            ]
            return again(422, problems=found)
        if answer.status_code != 200:
            return again(answer.status_code, problems=[_problem(_detail(answer))])
        if publish != "yes":
            return again(200, estimate=answer.json())
        if not signed.may("publisher"):
            return again(
                403,
                estimate=answer.json(),
                problems=[
                    _problem(
                        f"publishing needs the publisher role; the key '{signed.key.name}' has "
                        f"the {signed.key.role} role"
                    )
                ],
            )
        published = await ui.api(signed, "PUT", "/v1/segments", parsed)
        if published.status_code >= 300:
            return again(published.status_code, problems=[_problem(_detail(published))])
        return again(200, estimate=answer.json(), published=published.json())

    @get("/segments/{segment_id}/count-chart.svg")
    async def count_chart_svg(
        request: Request, segment_id: str, signed: viewer, hours: float = 24 * 7
    ) -> Response:
        found = await ui.read(signed, f"/v1/segments/{_quote(segment_id)}/history", hours=hours)
        readings = [(datetime.fromisoformat(r["at"]), int(r["members"])) for r in found["readings"]]
        chart = count_chart(readings)
        answer = ui.templates.TemplateResponse(
            request,
            "count_chart.svg",
            {"chart": chart, "segment_id": segment_id, "hours": hours},
            media_type="image/svg+xml",
        )
        answer.headers["Cache-Control"] = "no-store"
        return answer


async def template_page(
    ui: AdminUi,
    request: Request,
    signed: Signed,
    template_id: str,
    form: dict[str, str] | None = None,
    *,
    sent: dict[str, Any] | None = None,
    send_problem: str | None = None,
) -> Response:
    """A template's page: its content, the editor (as last typed when `form` is given), the
    preview of that content, the variables a template reads and the test send."""
    found = await ui.read(signed, f"/v1/templates/{_quote(template_id)}")
    if form is None:
        content = found["content"]
        form = _template_form(
            content.get("channel") or "email",
            content.get("subject") or "",
            content.get("text") or "",
            content.get("html") or "",
            request.query_params.get("contact_key", ""),
            "",
            "",
        )
    body, problem = _preview_body(form)
    shown: dict[str, Any] | None = None
    if problem is None:
        answer = await ui.api(signed, "POST", f"/v1/templates/{_quote(template_id)}/preview", body)
        if answer.status_code == 200:
            shown = answer.json()
        else:
            problem = _detail(answer)
    # htmx swaps a 2xx only: the preview's own problems are its content.
    code = 200
    if (problem or send_problem) and "HX-Request" not in request.headers:
        code = status.HTTP_422_UNPROCESSABLE_CONTENT
    return ui.page(
        request,
        "template.html",
        signed,
        code,
        template=found,
        channels=CHANNELS,
        done=request.query_params.get("done"),
        form=form,
        preview=shown,
        preview_problem=problem,
        variables=variable_list(),
        sent=sent,
        send_problem=send_problem,
    )


def _posted_template_form(
    text: Text = "",
    channel: Annotated[str, Form(max_length=16)] = "email",
    subject: Annotated[str, Form(max_length=2_000)] = "",
    html: Annotated[str, Form(max_length=1_000_000)] = "",
    contact_key: Annotated[str, Form(max_length=1024)] = "",
    event: Annotated[str, Form(max_length=100_000)] = "",
    address: Annotated[str, Form(max_length=320)] = "",
) -> dict[str, str]:
    """The template editor's fields as the preview and the test send post them."""
    return _template_form(channel, subject, text, html, contact_key, event, address)


EditorForm = Annotated[dict[str, str], Depends(_posted_template_form)]


def _template_form(
    channel: str, subject: str, text: str, html: str, contact_key: str, event: str, address: str
) -> dict[str, str]:
    return {
        "channel": channel,
        "subject": subject,
        "text": text,
        "html": html,
        "contact_key": contact_key.strip(),
        "event": event,
        "address": address.strip(),
    }


def _preview_body(form: dict[str, str]) -> tuple[dict[str, Any], str | None]:
    """The preview API's body from the editor's fields, or the field at fault."""
    content: dict[str, Any] = {"channel": form["channel"], "text": form["text"]}
    if form["subject"]:
        content["subject"] = form["subject"]
    if form["html"]:
        content["html"] = form["html"]
    body: dict[str, Any] = {"content": content}
    if form["contact_key"]:
        body["contact_key"] = form["contact_key"]
    if form["event"].strip():
        try:
            event = parse_json_text(form["event"], "event")
        except BadInput as exc:
            return body, exc.message
        if not isinstance(event, dict):
            return body, 'event: a JSON object, such as {"event": "Order Completed"}'
        body["event"] = event
    return body, None


def _problem(message: str) -> dict[str, Any]:
    return {"segment": None, "rule": "api", "message": message}
