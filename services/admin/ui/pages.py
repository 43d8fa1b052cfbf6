"""The admin web UI: server-rendered pages over the admin's own JSON API.

Each page asks the API in-process, with the signed-in key, exactly as a script would: the role
checks and the audit log of the API hold for the UI as they are. The browser holds a signed
session cookie naming the key (never its secret); every form carries the session's CSRF token,
checked on every POST before anything else is done."""

# No `from __future__ import annotations`: FastAPI reads the dependencies' annotations at runtime.

import asyncio
import secrets
from datetime import timedelta
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import structlog
import yaml
from fastapi import Depends, FastAPI, Form, Query, Request, status
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from services.admin.access import AdminKeys
from services.admin.domain.figures import FUNNEL
from services.admin.domain.flow import flow, trigger_summary
from services.admin.domain.roles import AdminKey, Role, allows
from services.admin.domain.ui_session import (
    COOKIE,
    CSRF_FIELD,
    Session,
    csrf_holds,
    csrf_token,
    issue,
    read,
)
from services.admin.ui.dry_run_page import mount_dry_run_page
from shared.bodies import BadInput, parse_yaml
from shared.clock import Clock
from shared.journeys import Journey

log = structlog.get_logger(__name__)

HERE = Path(__file__).parent
NAV = ("Journeys", "Segments", "Templates", "Contacts", "Delivery")
# The vendored front-end kit (npm `htmx.org`, 0BSD): pages poll their live figures with it.
HTMX = "htmx-2.0.11.min.js"
# A journey's page lists what changed between its latest versions, this many pairs at most.
MAX_DIFFS = 10


class PageRefused(Exception):
    """Answered as a page: sign in first (303), or the role is too low / the form is forged."""

    def __init__(self, code: int, message: str, field: str | None = None) -> None:
        self.code = code
        self.message = message
        self.field = field
        super().__init__(message)


class Signed:
    """What a page knows of its caller: the key (name and role) and the session."""

    def __init__(self, key: AdminKey, session: Session, csrf: str) -> None:
        self.key = key
        self.session = session
        self.csrf = csrf

    def may(self, role: Role) -> bool:
        return allows(self.key.role, role)


class PageRole:
    """A page's dependency: a signed-in session whose key has at least `role`; on a POST, the
    form's CSRF token must be the session's."""

    def __init__(self, role: Role, ui: "AdminUi") -> None:
        self.role = role
        self._ui = ui

    def __repr__(self) -> str:
        return f"PageRole({self.role!r})"

    async def __call__(self, request: Request) -> Signed:
        session = self._ui.session_of(request)
        if request.method == "POST":
            form = await request.form()
            presented = form.get(CSRF_FIELD)
            if not csrf_holds(
                self._ui.secret, session, presented if isinstance(presented, str) else None
            ):
                raise PageRefused(
                    status.HTTP_403_FORBIDDEN,
                    "the form's csrf_token is missing or not this session's; reload the page "
                    "and try again",
                    CSRF_FIELD,
                )
        key = self._ui.key_named(session.key_name if session else None)
        if session is None or key is None:
            raise PageRefused(status.HTTP_303_SEE_OTHER, "sign in first")
        signed = Signed(key, session, csrf_token(self._ui.secret, session))
        if not signed.may(self.role):
            raise PageRefused(
                status.HTTP_403_FORBIDDEN,
                f"this needs the {self.role} role; the key '{key.name}' has the {key.role} role",
            )
        return signed


class AdminUi:
    def __init__(
        self,
        app: FastAPI,
        keys: AdminKeys,
        named: dict[str, AdminKey],
        secret: bytes,
        clock: Clock,
        *,
        session_hours: float,
        secure_cookie: bool,
    ) -> None:
        self.secret = secret
        self._keys = keys
        self._named = named
        self._clock = clock
        self._lifetime = timedelta(hours=session_hours)
        self._secure = secure_cookie
        self._api = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://admin", timeout=30
        )
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.globals.update(nav=NAV, funnel_stages=FUNNEL, quote=_quote)

    # --- sessions ---------------------------------------------------------------------

    def session_of(self, request: Request) -> Session | None:
        return read(self.secret, request.cookies.get(COOKIE), self._clock.now())

    def key_named(self, name: str | None) -> AdminKey | None:
        return self._named.get(name) if name else None

    def new_session(self, key: AdminKey | None) -> Session:
        return Session(
            secrets.token_urlsafe(18), key.name if key else None, self._clock.now() + self._lifetime
        )

    def set_cookie(self, response: Response, session: Session) -> None:
        response.set_cookie(
            COOKIE,
            issue(self.secret, session),
            max_age=int(self._lifetime.total_seconds()),
            httponly=True,
            samesite="strict",
            secure=self._secure,
            path="/",
        )

    def find_key(self, presented: str) -> AdminKey | None:
        return self._keys.find(presented)

    # --- the API, as the signed-in key ------------------------------------------------

    async def api(
        self, signed: Signed, method: str, path: str, body: Any = None, **params: Any
    ) -> httpx.Response:
        return await self._api.request(
            method,
            path,
            json=body,
            params={k: v for k, v in params.items() if v is not None},
            headers={"Authorization": f"Bearer {signed.key.secret}"},
        )

    async def upload(
        self, signed: Signed, path: str, content: bytes, media_type: str, **params: Any
    ) -> httpx.Response:
        """A POST of a file as the body (a CSV import), not JSON."""
        return await self._api.post(
            path,
            content=content,
            params={k: v for k, v in params.items() if v is not None},
            headers={"Authorization": f"Bearer {signed.key.secret}", "Content-Type": media_type},
        )

    async def change(
        self, signed: Signed, method: str, path: str, body: Any = None
    ) -> httpx.Response:
        """A change asked of the API; a refusal is answered as a page naming what was wrong."""
        answer = await self.api(signed, method, path, body)
        if answer.status_code >= 300:
            raise PageRefused(answer.status_code, _detail(answer))
        return answer

    async def read(self, signed: Signed, path: str, **params: Any) -> dict[str, Any]:
        answer = await self.api(signed, "GET", path, **params)
        if answer.status_code != 200:
            raise PageRefused(answer.status_code, _detail(answer))
        body: dict[str, Any] = answer.json()
        return body

    def page(
        self,
        request: Request,
        name: str,
        signed: Signed | None,
        code: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        return self.templates.TemplateResponse(
            request,
            name,
            {"signed": signed, "csrf_field": CSRF_FIELD, **context},
            status_code=code,
        )


def _detail(answer: httpx.Response) -> str:
    """The API's refusal in a line: its detail, or each field at fault with what is wrong."""
    try:
        detail = answer.json().get("detail")
    except ValueError:
        detail = None
    if isinstance(detail, list):  # the API's validation errors, one per field
        return "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', [])[1:]) or 'body'}: {item.get('msg')}"
            for item in detail
            if isinstance(item, dict)
        )
    return str(detail or f"the admin API answered {answer.status_code}")


def _quote(value: Any) -> str:
    return quote(str(value), safe="")


def mount_ui(
    app: FastAPI,
    keys: AdminKeys,
    named: dict[str, AdminKey],
    secret: bytes,
    clock: Clock,
    *,
    session_hours: float = 12.0,
    secure_cookie: bool = False,
) -> None:
    """Add the UI's pages to `app` (they are not part of the API's OpenAPI document)."""
    ui = AdminUi(
        app, keys, named, secret, clock, session_hours=session_hours, secure_cookie=secure_cookie
    )
    # The template editor and the segment builder live in their own module, which reads this one.
    from services.admin.ui.workbench import mount_workbench, template_page

    viewer = Annotated[Signed, Depends(PageRole("viewer", ui))]
    editor = Annotated[Signed, Depends(PageRole("editor", ui))]
    publisher = Annotated[Signed, Depends(PageRole("publisher", ui))]
    # Pages are not part of the API's OpenAPI document.
    get = partial(app.get, include_in_schema=False)
    post = partial(app.post, include_in_schema=False)

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, PageRefused)
        if exc.code == status.HTTP_303_SEE_OTHER:
            target = quote(request.url.path) if request.method == "GET" else "/"
            return RedirectResponse(f"/sign-in?next={target}", status.HTTP_303_SEE_OTHER)
        session = ui.session_of(request)
        key = ui.key_named(session.key_name if session else None)
        signed = Signed(key, session, csrf_token(ui.secret, session)) if key and session else None
        return ui.page(
            request, "refused.html", signed, exc.code, message=exc.message, field=exc.field
        )

    app.add_exception_handler(PageRefused, refused)

    @get("/ui/style.css")
    async def style() -> FileResponse:
        return FileResponse(HERE / "static" / "style.css", media_type="text/css")

    @get("/ui/htmx.min.js")
    async def htmx() -> FileResponse:
        return FileResponse(HERE / "static" / "vendor" / HTMX, media_type="text/javascript")

    @get("/")
    async def home(request: Request) -> Response:
        session = ui.session_of(request)
        signed_in = session is not None and ui.key_named(session.key_name) is not None
        return RedirectResponse("/journeys" if signed_in else "/sign-in", status.HTTP_303_SEE_OTHER)

    @get("/sign-in")
    async def sign_in_form(request: Request, next: str = "/journeys") -> Response:
        session = ui.session_of(request)
        if session is not None and ui.key_named(session.key_name) is not None:
            return RedirectResponse(_local(next), status.HTTP_303_SEE_OTHER)  # signed in already
        if session is None or session.signed_in:
            session = ui.new_session(None)
        answer = ui.page(
            request,
            "sign_in.html",
            None,
            csrf=csrf_token(ui.secret, session),
            next=_local(next),
            problem=None,
        )
        ui.set_cookie(answer, session)
        return answer

    @post("/sign-in")
    async def sign_in(
        request: Request,
        key: Annotated[str, Form(max_length=4096)] = "",
        csrf_token_field: Annotated[str, Form(alias=CSRF_FIELD, max_length=512)] = "",
        next: Annotated[str, Form(max_length=2048)] = "/journeys",
    ) -> Response:
        session = ui.session_of(request)
        if not csrf_holds(ui.secret, session, csrf_token_field):
            raise PageRefused(
                status.HTTP_403_FORBIDDEN,
                "the form's csrf_token is missing or not this session's; reload the sign-in "
                "page and try again",
                CSRF_FIELD,
            )
        assert session is not None
        found = ui.find_key(key) if key else None
        if found is None:
            log.info("admin.ui_sign_in_refused")
            return ui.page(
                request,
                "sign_in.html",
                None,
                status.HTTP_401_UNAUTHORIZED,
                csrf=csrf_token(ui.secret, session),
                next=_local(next),
                problem="key: not a configured admin key",
            )
        signed = ui.new_session(found)  # a new session id: nothing from before sign-in carries on
        log.info("admin.ui_signed_in", key=found.name, role=found.role)
        answer = RedirectResponse(_local(next), status.HTTP_303_SEE_OTHER)
        ui.set_cookie(answer, signed)
        return answer

    @post("/sign-out")
    async def sign_out(signed: viewer) -> Response:
        answer = RedirectResponse("/sign-in", status.HTTP_303_SEE_OTHER)
        answer.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        log.info("admin.ui_signed_out", key=signed.key.name)
        return answer

    # --- journeys ---------------------------------------------------------------------

    @get("/journeys")
    async def journeys(request: Request, signed: viewer) -> Response:
        listed = (await ui.read(signed, "/v1/journeys"))["journeys"]
        stats = (await ui.read(signed, "/v1/stats"))["journeys"]
        latest: dict[str, dict[str, Any]] = {}
        for item in listed:
            if item["id"] not in latest or item["version"] > latest[item["id"]]["version"]:
                latest[item["id"]] = item
        rows = []
        for journey_id, item in sorted(latest.items()):
            kinds = stats.get(journey_id, {})
            entered = int(kinds.get("entered", 0))
            rows.append(
                {
                    **item,
                    "versions": sum(1 for i in listed if i["id"] == journey_id),
                    "entered": entered,
                    "active": max(entered - int(kinds.get("exited", 0)), 0),
                    "converted": int(kinds.get("converted", 0)),
                }
            )
        return ui.page(request, "journeys.html", signed, journeys=rows)

    @get("/journeys/{journey_id}")
    async def journey(request: Request, journey_id: str, signed: viewer) -> Response:
        versions = (await ui.read(signed, f"/v1/journeys/{_quote(journey_id)}"))["versions"]
        versions.sort(key=lambda v: v["journey"]["version"], reverse=True)
        current = versions[0]
        definition = Journey.model_validate(current["journey"])
        figures = await ui.read(signed, f"/v1/journeys/{_quote(journey_id)}/figures")
        conversion = await ui.read(signed, f"/v1/journeys/{_quote(journey_id)}/conversion")
        draft = await ui.api(signed, "GET", f"/v1/journeys/{_quote(journey_id)}/draft")
        numbers = sorted(v["journey"]["version"] for v in versions)
        changes = {}
        diffs = {}
        for older, newer in list(pairwise(numbers))[-MAX_DIFFS:]:
            pair = {"from": older, "to": newer}
            found = await ui.read(signed, f"/v1/journeys/{_quote(journey_id)}/changes", **pair)
            changes[newer] = (older, found["changes"])
            diffs[newer] = await ui.read(signed, f"/v1/journeys/{_quote(journey_id)}/diff", **pair)
        return ui.page(
            request,
            "journey.html",
            signed,
            current=current,
            journey=definition,
            trigger=trigger_summary(definition),
            boxes=flow(definition),
            figures=figures,
            conversion=conversion,
            versions=versions,
            draft=draft.json() if draft.status_code == 200 else None,
            changes=changes,
            diffs=diffs,
            numbers=numbers,
            diff_from=numbers[-2] if len(numbers) > 1 else numbers[-1],
            diff_to=numbers[-1],
            done=request.query_params.get("done"),
        )

    @get("/journeys/{journey_id}/diff")
    async def journey_diff(
        request: Request,
        journey_id: str,
        signed: viewer,
        from_version: Annotated[str | None, Query(alias="from", max_length=12)] = None,
        to_version: Annotated[str | None, Query(alias="to", max_length=12)] = None,
    ) -> Response:
        """The text diff of any two published versions, chosen with two selects (a plain GET
        form); by default the newest against the one before it."""
        versions = (await ui.read(signed, f"/v1/journeys/{_quote(journey_id)}"))["versions"]
        numbers = sorted(v["journey"]["version"] for v in versions)
        newer = to_version or str(numbers[-1])
        older = from_version or str(numbers[-2] if len(numbers) > 1 else numbers[-1])
        diff = await ui.read(
            signed, f"/v1/journeys/{_quote(journey_id)}/diff", **{"from": older, "to": newer}
        )
        return ui.page(
            request,
            "journey_diff.html",
            signed,
            journey_id=journey_id,
            numbers=numbers,
            diff=diff,
            diff_from=diff["from"],
            diff_to=diff["to"],
        )

    @get("/new-draft")
    async def new_draft(
        signed: editor, journey_id: Annotated[str, Query(min_length=1, max_length=64)]
    ) -> Response:
        return RedirectResponse(
            f"/journeys/{_quote(journey_id.strip())}/draft", status.HTTP_303_SEE_OTHER
        )

    @get("/journeys/{journey_id}/draft")
    async def draft_editor(request: Request, journey_id: str, signed: editor) -> Response:
        text = await _draft_text(ui, signed, journey_id)
        return ui.page(
            request,
            "draft.html",
            signed,
            journey_id=journey_id,
            text=text,
            problems=None,
            saved=request.query_params.get("saved") is not None,
        )

    @post("/journeys/{journey_id}/draft")
    async def save_draft(
        request: Request,
        journey_id: str,
        signed: editor,
        definition: Annotated[str, Form(max_length=500_000)] = "",
    ) -> Response:
        def again(problems: list[dict[str, Any]]) -> Response:
            return ui.page(
                request,
                "draft.html",
                signed,
                422,
                journey_id=journey_id,
                text=definition,
                problems=problems,
                saved=False,
            )

        try:
            parsed = await asyncio.to_thread(parse_yaml, definition, "definition")
        except BadInput as exc:
            return again([{"step": None, "rule": "yaml", "message": exc.message}])
        answer = await ui.api(signed, "PUT", f"/v1/journeys/{_quote(journey_id)}/draft", parsed)
        if answer.status_code == 422:
            body = answer.json()
            problems = body.get("problems") or [
                {"step": None, "rule": "body", "message": _detail(answer)}
            ]
            return again(problems)
        if answer.status_code != 200:
            raise PageRefused(answer.status_code, _detail(answer))
        return RedirectResponse(
            f"/journeys/{_quote(journey_id)}/draft?saved", status.HTTP_303_SEE_OTHER
        )

    mount_dry_run_page(post, ui, editor, _detail)

    @post("/journeys/{journey_id}/{action}")
    async def journey_action(
        request: Request, journey_id: str, action: str, signed: publisher
    ) -> Response:
        if action not in ("publish", "pause", "resume", "archive"):
            raise PageRefused(
                status.HTTP_404_NOT_FOUND, f"action: no such action '{action}'", "action"
            )
        await ui.change(signed, "POST", f"/v1/journeys/{_quote(journey_id)}/{action}")
        return RedirectResponse(
            f"/journeys/{_quote(journey_id)}?done={action}", status.HTTP_303_SEE_OTHER
        )

    # --- segments ---------------------------------------------------------------------

    @get("/segments")
    async def segments(request: Request, signed: viewer) -> Response:
        listed = (await ui.read(signed, "/v1/segments"))["segments"]
        return ui.page(request, "segments.html", signed, segments=listed, refresh=5)

    @get("/segments/{segment_id}")
    async def segment(request: Request, segment_id: str, signed: viewer) -> Response:
        found = await ui.read(signed, f"/v1/segments/{_quote(segment_id)}")
        members = await ui.read(signed, f"/v1/segments/{_quote(segment_id)}/members", limit=25)
        return ui.page(
            request, "segment.html", signed, segment=found, members=members["members"], refresh=10
        )

    # --- contacts ---------------------------------------------------------------------

    @get("/contacts")
    async def contacts(request: Request, signed: viewer, q: str = "") -> Response:
        text = q.strip()
        if len(text) > 320:
            raise PageRefused(422, "q: at most 320 characters", "q")
        found = (await ui.read(signed, "/v1/contacts", q=text))["contacts"] if text else None
        return ui.page(
            request,
            "contacts.html",
            signed,
            q=text,
            found=found,
            forgotten="forgotten" in request.query_params,
        )

    @get("/contacts/{contact_key:path}")
    async def contact(request: Request, contact_key: str, signed: viewer) -> Response:
        profile = await ui.read(signed, f"/v1/contacts/{_quote(contact_key)}")
        log_ = await ui.read(signed, "/v1/journey-log", contact_key=contact_key)
        sent = await ui.read(signed, "/v1/messages", contact_key=contact_key, limit=100)
        timeline = await ui.read(signed, f"/v1/contacts/{_quote(contact_key)}/timeline")
        return ui.page(
            request,
            "contact.html",
            signed,
            profile=profile,
            instances=log_["instances"],
            records=log_["records"],
            paths=log_.get("paths", []),
            messages=sent["messages"],
            timeline=timeline["lines"],
            done=request.query_params.get("done"),
        )

    @post("/contacts/change")
    async def change_contact(
        signed: publisher,
        contact_key: Annotated[str, Form(min_length=1, max_length=1024)],
        add_tag: Annotated[str, Form(max_length=64)] = "",
        remove_tag: Annotated[str, Form(max_length=64)] = "",
        trait_name: Annotated[str, Form(max_length=200)] = "",
        trait_value: Annotated[str, Form(max_length=1024)] = "",
    ) -> Response:
        changes: dict[str, Any] = {}
        if add_tag.strip():
            changes["add_tags"] = [add_tag.strip()]
        if remove_tag:
            changes["remove_tags"] = [remove_tag]
        if trait_name.strip():
            changes["set_traits"] = {trait_name.strip(): trait_value}
        if not changes:
            raise PageRefused(
                422, "add_tag: give a tag to add, or a trait name and value", "add_tag"
            )
        await ui.change(signed, "POST", f"/v1/contacts/{_quote(contact_key)}/changes", changes)
        return RedirectResponse(
            f"/contacts/{_quote(contact_key)}?done=changed", status.HTTP_303_SEE_OTHER
        )

    @post("/contacts/import")
    async def import_contacts(request: Request, signed: publisher) -> Response:
        form = await request.form()
        upload = form.get("file")
        dry_run = form.get("dry_run") == "yes"
        if isinstance(upload, str) or upload is None or not upload.filename:
            raise PageRefused(422, "file: choose a CSV file to import", "file")
        answer = await ui.upload(
            signed,
            "/v1/contacts/import",
            await upload.read(),
            "text/csv",
            dry_run=str(dry_run).lower(),
        )
        if answer.status_code == 422 and "problems" in answer.json():
            return ui.page(
                request,
                "contacts.html",
                signed,
                422,
                q="",
                found=None,
                forgotten=False,
                import_problems=answer.json()["problems"],
                file_name=upload.filename,
            )
        if answer.status_code >= 300:
            raise PageRefused(answer.status_code, _detail(answer))
        return ui.page(
            request,
            "contacts.html",
            signed,
            q="",
            found=None,
            forgotten=False,
            imported=answer.json(),
            file_name=upload.filename,
        )

    @post("/contacts/forget")
    async def forget(
        signed: publisher,
        contact_key: Annotated[str, Form(min_length=1, max_length=1024)],
        confirm: Annotated[str, Form(max_length=16)] = "",
    ) -> Response:
        if confirm != "yes":
            raise PageRefused(
                422,
                "confirm: tick the box to confirm that the contact is to be forgotten",
                "confirm",
            )
        await ui.change(signed, "DELETE", f"/v1/contacts/{_quote(contact_key)}")
        # The confirmation names no one: the address of the next page reaches the access log.
        return RedirectResponse("/contacts?forgotten=1", status.HTTP_303_SEE_OTHER)

    # --- templates, delivery, audit ---------------------------------------------------

    @get("/templates")
    async def templates(request: Request, signed: viewer) -> Response:
        listed = (await ui.read(signed, "/v1/templates"))["templates"]
        return ui.page(request, "templates.html", signed, templates=listed)

    @get("/templates/{template_id}")
    async def template(request: Request, template_id: str, signed: viewer) -> Response:
        return await template_page(ui, request, signed, template_id)

    @post("/templates/{template_id}")
    async def save_template(
        template_id: str,
        signed: editor,
        text: Annotated[str, Form(max_length=200_000)] = "",
        channel: Annotated[str, Form(max_length=16)] = "email",
        subject: Annotated[str, Form(max_length=2_000)] = "",
        html: Annotated[str, Form(max_length=1_000_000)] = "",
    ) -> Response:
        content = {
            "channel": channel,
            "text": text,
            **({"subject": subject} if subject else {}),
            **({"html": html} if html else {}),
        }
        await ui.change(signed, "PUT", f"/v1/templates/{_quote(template_id)}", content)
        return RedirectResponse(
            f"/templates/{_quote(template_id)}?done=saved", status.HTTP_303_SEE_OTHER
        )

    @post("/templates/{template_id}/ready")
    async def ready_template(template_id: str, signed: publisher) -> Response:
        await ui.change(signed, "POST", f"/v1/templates/{_quote(template_id)}/ready")
        return RedirectResponse(
            f"/templates/{_quote(template_id)}?done=marked ready", status.HTTP_303_SEE_OTHER
        )

    @get("/delivery")
    async def delivery(request: Request, signed: viewer, by: str = "journey_id") -> Response:
        if by not in ("journey_id", "template_id", "channel"):
            raise PageRefused(422, "by: one of journey_id, template_id, channel", "by")
        found = await ui.read(signed, "/v1/delivery/funnel", by=by)
        paused = await ui.read(signed, "/v1/delivery/paused-channels")
        return ui.page(
            request,
            "delivery.html",
            signed,
            by=by,
            funnels=found["funnels"],
            paused=paused["paused"],
        )

    @get("/dead-letters")
    async def dead_letters(request: Request, signed: viewer) -> Response:
        found = await ui.read(signed, "/v1/dead-letters", limit=200)
        return ui.page(
            request,
            "dead_letters.html",
            signed,
            letters=found["dead_letters"],
            total=found["total"],
            replayed=request.query_params.get("replayed"),
        )

    @post("/dead-letters/replay")
    async def replay(request: Request, signed: publisher) -> Response:
        positions = [p for p in (await request.form()).getlist("position") if isinstance(p, str)]
        if not positions:
            raise PageRefused(422, "position: tick at least one dead letter to replay", "position")
        answer = await ui.change(
            signed, "POST", "/v1/dead-letters/replay", {"positions": positions}
        )
        return RedirectResponse(
            f"/dead-letters?replayed={answer.json()['replayed']}", status.HTTP_303_SEE_OTHER
        )

    @get("/audit")
    async def audit(request: Request, signed: publisher) -> Response:
        found = await ui.read(signed, "/v1/audit", limit=100)
        return ui.page(request, "audit.html", signed, entries=found["entries"])

    mount_workbench(app, ui)


async def _draft_text(ui: AdminUi, signed: Signed, journey_id: str) -> str:
    """What the editor opens with: the saved draft, else the newest version as the next one,
    else a small journey to start from."""
    draft = await ui.api(signed, "GET", f"/v1/journeys/{_quote(journey_id)}/draft")
    if draft.status_code == 200:
        return yaml.safe_dump(draft.json()["definition"], sort_keys=False, allow_unicode=True)
    published = await ui.api(signed, "GET", f"/v1/journeys/{_quote(journey_id)}")
    if published.status_code == 200:
        newest = max(published.json()["versions"], key=lambda v: v["journey"]["version"])
        journey = Journey.model_validate(newest["journey"]).model_dump(
            mode="json", by_alias=True, exclude_none=True, exclude_defaults=True
        )
        journey["version"] = newest["journey"]["version"] + 1
        return yaml.safe_dump({"journey": journey}, sort_keys=False, allow_unicode=True)
    starter = {
        "journey": {
            "id": journey_id,
            "name": journey_id.replace("-", " ").capitalize(),
            "trigger": {"type": "event", "event": "Signed Up"},
            "steps": [{"id": "welcome", "type": "send", "channel": "email", "template": "welcome"}],
        }
    }
    return yaml.safe_dump(starter, sort_keys=False, allow_unicode=True)


def _local(target: str) -> str:
    """Only a path of this site: never an open redirect to another."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/journeys"
    return target
