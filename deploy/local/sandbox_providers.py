# Provider APIs of the local sandbox, served next to the outbox API by deploy/local/sandbox.py:
#
#   * SMS, Twilio style:  POST /2010-04-01/Accounts/{sid}/Messages.json (+ signed status callbacks)
#   * email events, Mailgun style: GET /v3/{domain}/events (and the page URLs it answers with),
#                         the `accepted` event of each recipient of each email the SMTP server took
#   * FCM HTTP v1:        POST /token (service-account JWT grant),
#                         POST /v1/projects/{project}/messages:send
#   * WeChat OA:          GET /cgi-bin/token, POST /cgi-bin/stable_token,
#                         POST /cgi-bin/message/template/send, POST /cgi-bin/message/custom/send
#   * control:            /control/failures, /control/latency, /control/fcm/revoke, /control/wechat
#
# Every accepted message lands in the shared Outbox (channel sms, push or wechat), so tests and
# benchmarks drive the dispatcher's real HTTP clients against real sockets and then look at what
# "arrived". Failure rules (per channel and recipient) make the providers answer with the errors
# the dispatcher must classify: retryable, permanent for the recipient or the configuration, and
# "unknown" (the message arrived but the answer never came back in time), and the listings a
# dispatcher asks to settle such an unknown (SMS by number, email events by Message-ID) can fail
# the same way (`"action": "list"`).
#
# Where the shared sandbox protocol says nothing, the answers copy the real providers: status
# codes, error bodies and error codes are the documented ones, so a client written against the
# sandbox also works against the provider.
from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import email.utils
import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import quote

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from starlette.datastructures import FormData
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("waypost.sandbox")

Record = dict[str, Any]


class OutboxStore(Protocol):
    """The part of sandbox.Outbox the providers use (kept as a protocol: no import cycle)."""

    # The accepted events of the emails the outbox holds (the email events API reads them).
    email_events: EmailEvents

    def add(self, record: Record) -> Record: ...


def utc_now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

DEFAULT_SMS_ACCOUNT_SID = "ACwaypostsandbox"
DEFAULT_SMS_AUTH_TOKEN = "waypost-sandbox-sms-token"  # noqa: S105  (a public sandbox default)
DEFAULT_WECHAT_APP_ID = "wxwaypostsandbox"
DEFAULT_WECHAT_APP_SECRET = "waypost-sandbox-wechat-secret"  # noqa: S105  (ditto)
DEFAULT_EMAIL_EVENTS_API_KEY = "waypost-sandbox-email-events-key"  # a public sandbox default
DEFAULT_WECHAT_TEMPLATES = "tpl-announcement,tpl-order,tpl-generic"
DEFAULT_FCM_PROJECT = "waypost-sandbox"
DEFAULT_FCM_CLIENT_EMAIL = "dispatcher@waypost-sandbox.iam.gserviceaccount.com"


@dataclass(frozen=True)
class ProviderConfig:
    """Credentials and timings the provider APIs run with (from the command line)."""

    sms_account_sid: str = DEFAULT_SMS_ACCOUNT_SID
    sms_auth_token: str = DEFAULT_SMS_AUTH_TOKEN
    sms_callback_delay: float = 0.2
    fcm_service_account_file: Path | None = None
    fcm_token_ttl: int = 3600
    wechat_app_id: str = DEFAULT_WECHAT_APP_ID
    wechat_app_secret: str = DEFAULT_WECHAT_APP_SECRET
    wechat_token_ttl: int = 7200
    wechat_token_overlap: float = 300.0
    wechat_templates: frozenset[str] = frozenset(DEFAULT_WECHAT_TEMPLATES.split(","))
    # Password of the email events API's Basic auth (user "api"), as a Mailgun API key is.
    email_events_api_key: str = DEFAULT_EMAIL_EVENTS_API_KEY
    latency: float = 0.0


class Pauses:
    """Sleeps that end early once the sandbox stops, so a held answer never delays shutdown.

    Each sleep is a future with a timer, not an `asyncio.wait_for` (a task, a timeout and a
    cancellation for every answer): every provider call under benchmark load sleeps here."""

    def __init__(self) -> None:
        self._stopping = False
        self._sleeping: set[asyncio.Future[None]] = set()

    async def wait(self, seconds: float) -> None:
        if seconds <= 0 or self._stopping:
            return
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(seconds, _wake, woken)
        self._sleeping.add(woken)
        try:
            await woken
        finally:
            timer.cancel()
            self._sleeping.discard(woken)

    def release(self) -> None:
        self._stopping = True
        for woken in list(self._sleeping):
            _wake(woken)


def _wake(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)


class Latency:
    """Extra delay before every provider API answer, to make benchmarks see a network."""

    def __init__(self, seconds: float, pauses: Pauses) -> None:
        self.default = seconds
        self.seconds = seconds
        self._pauses = pauses

    async def wait(self) -> None:
        await self._pauses.wait(self.seconds)

    def reset(self) -> None:
        self.seconds = self.default


class Background:
    """Fire-and-forget tasks (status callbacks) the server owns, so they can be cancelled."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)  # the loop only keeps weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --------------------------------------------------------------------------------------------
# Failure rules
# --------------------------------------------------------------------------------------------

CHANNELS = ("sms", "push", "wechat", "email")
# Errors every HTTP channel understands; each provider answers them in its own way.
HOLD_ERRORS = ("timeout", "slow")
COMMON_ERRORS = (*HOLD_ERRORS, "429", "500", "503")
SMS_REJECTIONS = ("21211", "21610", "21614")
# Accepted (201) but the status callback reports the failure: code -> final status.
SMS_CALLBACK_FAILURES = {
    "30001": "failed",  # queue overflow: never left Twilio
    "30003": "undelivered",  # unreachable handset
    "30006": "undelivered",  # landline or unreachable carrier
    "30007": "undelivered",  # carrier filtering
}
FCM_ERRORS = (
    "UNREGISTERED",
    "INVALID_ARGUMENT",
    "SENDER_ID_MISMATCH",
    "THIRD_PARTY_AUTH_ERROR",
    "QUOTA_EXCEEDED",
    "UNAVAILABLE",
    "INTERNAL",
)
WECHAT_ERRMSG = {
    -1: "system error",
    40001: "invalid credential, access_token is invalid or not latest",
    40003: "invalid openid",
    40037: "invalid template_id",
    42001: "access_token expired",
    43004: "require subscribe",
    45009: "reach max api daily quota limit",
    45015: "response out of time limit or subscription is canceled",
    47003: "argument invalid!",
}
CHANNEL_ERRORS: dict[str, tuple[str, ...]] = {
    "sms": (*COMMON_ERRORS, *SMS_REJECTIONS, *SMS_CALLBACK_FAILURES),
    "push": (*COMMON_ERRORS, *FCM_ERRORS),
    "wechat": (*COMMON_ERRORS, *(str(code) for code in WECHAT_ERRMSG)),
}
# What a rule on the email events query (`"action": "list"`, keyed by Message-ID or by an
# address the message went to) can answer.
EMAIL_LIST_ERRORS = COMMON_ERRORS
SMTP_CODE = re.compile(r"^[45]\d\d$")
DEFAULT_HOLD_SECONDS = {"timeout": 30.0, "slow": 2.0}


def is_smtp_code(error: str) -> bool:
    return SMTP_CODE.match(error) is not None


class FailureRuleIn(BaseModel):
    """Body of POST /control/failures."""

    model_config = ConfigDict(extra="forbid")

    channel: str
    recipient: str = Field(min_length=1)
    # What the rule answers: a send (the default), or the listing the dispatcher reconciles a
    # send without an answer by: for SMS the number's (`GET …/Messages.json?To=`), for email the
    # events of a Message-ID (`GET /v3/{domain}/events?message-id=`; `recipient` is then the
    # Message-ID, without its angle brackets). Before `error`, whose validator reads it.
    action: Literal["send", "list"] = "send"
    error: str = Field(min_length=1)
    retry_after: float | None = Field(default=None, ge=0)
    seconds: float | None = Field(default=None, ge=0)
    times: int | None = Field(default=None, ge=1)

    @field_validator("channel")
    @classmethod
    def _known_channel(cls, value: str) -> str:
        if value not in CHANNELS:
            raise ValueError(f"channel must be one of {', '.join(CHANNELS)}")
        return value

    @field_validator("error")
    @classmethod
    def _known_error(cls, value: str, info: ValidationInfo) -> str:
        channel = info.data.get("channel")
        if channel is None:  # the channel itself was invalid; that error is reported already
            return value
        if channel == "push" and value.upper() in FCM_ERRORS:
            value = value.upper()  # FCM codes are upper case; accept "unregistered" too
        if channel == "email":
            action = info.data.get("action")
            if action is None:  # an invalid action, reported already
                return value
            if action == "list":
                if value in EMAIL_LIST_ERRORS:
                    return value
                raise ValueError(
                    "an email list rule (the events query of a Message-ID) answers one of "
                    f"{', '.join(EMAIL_LIST_ERRORS)}"
                )
            if value in HOLD_ERRORS or is_smtp_code(value):
                return value
            raise ValueError("email error must be timeout, slow or an SMTP code 400-599")
        allowed = CHANNEL_ERRORS[channel]
        if value not in allowed:
            raise ValueError(f"{channel} error must be one of {', '.join(allowed)}")
        return value


@dataclass
class FailureRule:
    id: int
    channel: str
    recipient: str
    error: str
    retry_after: float | None
    seconds: float | None
    times: int | None  # answers still to give; None = forever
    action: str = "send"

    @property
    def hold(self) -> float:
        """How long to hold the answer: the rule's `seconds`, or the error's default."""
        if self.seconds is not None:
            return self.seconds
        return DEFAULT_HOLD_SECONDS.get(self.error, 0.0)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "channel": self.channel,
            "recipient": self.recipient,
            "error": self.error,
            "retry_after": self.retry_after,
            "seconds": self.seconds,
            "times": self.times,
            "action": self.action,
        }


def _recipient_key(channel: str, recipient: str) -> str:
    recipient = recipient.strip()
    if channel == "email":  # mailboxes compare case-insensitively, as the SMTP refusals do
        return recipient.strip("<>").casefold()
    return recipient


class FailureRules:
    """Ordered failure rules; the oldest rule for a recipient answers first and is used up."""

    def __init__(self, pauses: Pauses | None = None) -> None:
        self._rules: list[FailureRule] = []
        self._ids = itertools.count(1)
        self._pauses = pauses or Pauses()

    async def hold(self, seconds: float) -> None:
        """Hold an answer (a rule's `hold`), ending early if the sandbox stops."""
        await self._pauses.wait(seconds)

    def add(self, rule: FailureRuleIn) -> FailureRule:
        stored = FailureRule(
            id=next(self._ids),
            channel=rule.channel,
            recipient=rule.recipient,
            error=rule.error,
            retry_after=rule.retry_after,
            seconds=rule.seconds,
            times=rule.times,
            action=rule.action,
        )
        self._rules.append(stored)
        return stored

    def take(
        self,
        channel: str,
        recipient: str,
        when: Callable[[str], bool] | None = None,
        *,
        action: str = "send",
    ) -> FailureRule | None:
        """The first rule for (channel, recipient, action), counting one use, if `when(error)`
        holds.

        `when` lets the SMTP server take refusal codes at RCPT time and holds at DATA time
        without one step using up a rule meant for the other.
        """
        key = _recipient_key(channel, recipient)
        for rule in self._rules:
            if rule.channel != channel or _recipient_key(channel, rule.recipient) != key:
                continue
            if rule.action != action:
                continue
            if when is not None and not when(rule.error):
                return None
            if rule.times is not None:
                rule.times -= 1
                if rule.times <= 0:
                    self._rules.remove(rule)
            log.info("failure rule %d: %s %s -> %s", rule.id, channel, recipient, rule.error)
            return rule
        return None

    def list(self) -> list[FailureRule]:
        return list(self._rules)

    def remove(self, rule_id: int) -> bool:
        for rule in self._rules:
            if rule.id == rule_id:
                self._rules.remove(rule)
                return True
        return False

    def clear(self) -> int:
        count = len(self._rules)
        self._rules.clear()
        return count


def retry_after_header(seconds: float | None) -> dict[str, str]:
    """A Retry-After header; whole seconds as HTTP says, fractions kept for fast test loops."""
    if seconds is None:
        return {}
    value = str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"
    return {"Retry-After": value}


# --------------------------------------------------------------------------------------------
# Fast routes
# --------------------------------------------------------------------------------------------

FastHandler = Callable[..., Coroutine[Any, Any, Response]]


@dataclass(frozen=True)
class FastRoute:
    """A provider call a benchmark sends by the thousand. `path` is a regular expression of the
    whole path; its named groups are the handler's path parameters, after the request."""

    method: str
    path: re.Pattern[str]
    handler: FastHandler


class FastRoutes:
    """The sandbox's HTTP app: the fast routes straight from ASGI, every other request by `app`.

    Through FastAPI, a provider call took its middleware stack and dependency solving, about
    as much of the sandbox's one event loop as the call's own work. Under a dispatcher's burst
    of calls every answer waits behind the others', so that cost became latency no provider
    shows (docs/delivery.md, "The sandbox's provider calls")."""

    def __init__(self, app: ASGIApp, routes: Iterable[FastRoute]) -> None:
        self.app = app
        self._routes = tuple(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route in self._routes:
                found = route.path.fullmatch(scope["path"])
                if found is None or scope["method"] != route.method:
                    continue
                try:
                    response = await route.handler(Request(scope, receive), **found.groupdict())
                except ClientDisconnect:  # gone before its body was read: nobody to answer
                    log.debug("%s %s: the client left", scope["method"], scope["path"])
                    return
                except Exception:
                    log.exception("%s %s failed", scope["method"], scope["path"])
                    response = PlainTextResponse("Internal Server Error", status_code=500)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_form(request: Request) -> FormData | None:
    """The form body, or None when it cannot be parsed (a non-form body reads as empty)."""
    try:
        return await request.form()
    except Exception:  # noqa: BLE001  (malformed multipart/urlencoded body: a 400, not a crash)
        return None


def form_text(form: FormData, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


# --------------------------------------------------------------------------------------------
# SMS (Twilio style)
# --------------------------------------------------------------------------------------------

E164 = re.compile(r"^\+[1-9]\d{6,14}$")
TWILIO_API_VERSION = "2010-04-01"
SMS_MAX_BODY = 1600  # Twilio's limit for a concatenated message body
SMS_ERRORS: dict[str, tuple[int, int, str]] = {  # rule error -> (HTTP status, code, message)
    "429": (429, 20429, "Too Many Requests"),
    "500": (500, 20500, "Internal Server Error"),
    "503": (503, 20503, "Service Unavailable"),
    "21610": (400, 21610, "Attempt to send to unsubscribed recipient"),
    "21614": (400, 21614, "'To' number is not a valid mobile number"),
}


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """Twilio's request signature: base64 HMAC-SHA1 over the URL plus sorted name+value pairs."""
    payload = url + "".join(name + params[name] for name in sorted(params))
    digest = hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def twilio_error(
    status: int, code: int, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def sms_segments(body: str) -> int:
    """Segments a body is billed as: GSM-7 (approximated as ASCII) 160/153, else UCS-2 70/67."""
    single, multi = (160, 153) if body.isascii() else (70, 67)
    return 1 if len(body) <= single else math.ceil(len(body) / multi)


class SmsProvider:
    def __init__(
        self,
        config: ProviderConfig,
        outbox: OutboxStore,
        rules: FailureRules,
        latency: Latency,
        background: Background,
        http_client: Callable[[], httpx.AsyncClient],
    ) -> None:
        self.config = config
        self._outbox = outbox
        self._rules = rules
        self._latency = latency
        self._background = background
        self._http_client = http_client
        self._messages: dict[str, Record] = {}  # sid -> outbox record, for the GET resources
        # number -> its records, oldest first: a listing by `To` (how the dispatcher reconciles)
        # reads only that number's messages, not every message the sandbox ever took
        self._to: dict[str, list[Record]] = {}
        # How long a message waits before its status callbacks (`/control/sms/callbacks`).
        self.callback_delay = config.sms_callback_delay

    def reset(self) -> None:
        self._messages.clear()
        self._to.clear()
        self.callback_delay = self.config.sms_callback_delay

    def _authorized(self, request: Request) -> bool:
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).partition(b":")
        except binascii.Error:
            return False
        # bytes, not str: compare_digest refuses str with non-ASCII characters
        return hmac.compare_digest(
            user, self.config.sms_account_sid.encode()
        ) and hmac.compare_digest(password, self.config.sms_auth_token.encode())

    async def _guard(self, request: Request, account_sid: str) -> JSONResponse | None:
        """Latency, Basic auth and the account in the path: the checks every route shares."""
        await self._latency.wait()
        if not self._authorized(request):
            return twilio_error(
                401, 20003, "Authenticate", {"WWW-Authenticate": 'Basic realm="Twilio API"'}
            )
        if account_sid != self.config.sms_account_sid:
            return twilio_error(
                404, 20404, f"The requested resource {request.url.path} was not found"
            )
        return None

    def _resource(self, record: Record) -> dict[str, Any]:
        """The Message resource as Twilio renders it."""
        sid = record["sid"]
        base = f"/{TWILIO_API_VERSION}/Accounts/{self.config.sms_account_sid}/Messages/{sid}"
        return {
            "account_sid": self.config.sms_account_sid,
            "api_version": TWILIO_API_VERSION,
            "body": record["body"],
            "date_created": record["date_created"],
            "date_sent": record.get("date_sent"),
            "date_updated": record["date_updated"],
            "direction": "outbound-api",
            "error_code": record.get("error_code"),
            "error_message": None,
            "from": record["from_number"],
            "messaging_service_sid": record["messaging_service_sid"],
            "num_media": "0",
            "num_segments": str(sms_segments(record["body"])),
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": record["status"],
            "subresource_uris": {"media": f"{base}/Media.json"},
            "to": record["to"][0],
            "uri": f"{base}.json",
        }

    async def create_message(self, request: Request, account_sid: str) -> Response:
        refused = await self._guard(request, account_sid)
        if refused is not None:
            return refused
        form = await read_form(request)
        if form is None:
            return twilio_error(400, 20001, "Unable to parse the request body")
        return await self._create(form)

    def fast_routes(self) -> list[FastRoute]:
        path = re.compile(r"/2010-04-01/Accounts/(?P<account_sid>[^/]+)/Messages\.json")
        return [FastRoute("POST", path, self.create_message)]

    def routes(self, app: FastAPI) -> None:
        messages_path = "/2010-04-01/Accounts/{account_sid}/Messages.json"

        @app.get(messages_path, include_in_schema=False)
        async def list_messages(account_sid: str, request: Request) -> Response:
            refused = await self._guard(request, account_sid)
            if refused is not None:
                return refused
            to = request.query_params.get("To")
            sender = request.query_params.get("From")
            rule = None if to is None else self._rules.take("sms", to, action="list")
            if rule is not None:
                await self._rules.hold(rule.hold)  # "timeout" and "slow" answer late, then list
                if rule.error not in HOLD_ERRORS:
                    status, code, message = SMS_ERRORS.get(rule.error, SMS_ERRORS["500"])
                    headers = retry_after_header(rule.retry_after) if status in (429, 503) else {}
                    return twilio_error(status, code, message, headers)
            records = self._messages.values() if to is None else self._to.get(to, [])
            found = [
                self._resource(record)
                for record in reversed(list(records))  # Twilio lists newest first
                if (to is None or record["to"][0] == to)
                and (sender is None or record["from_number"] == sender)
            ]
            return JSONResponse({"messages": found, "page": 0, "page_size": len(found)})

        @app.get("/2010-04-01/Accounts/{account_sid}/Messages/{sid}.json", include_in_schema=False)
        async def fetch_message(account_sid: str, sid: str, request: Request) -> Response:
            refused = await self._guard(request, account_sid)
            if refused is not None:
                return refused
            record = self._messages.get(sid)
            if record is None:
                return twilio_error(
                    404, 20404, f"The requested resource {request.url.path} was not found"
                )
            return JSONResponse(self._resource(record))

    async def _create(self, form: FormData) -> Response:
        to = (form_text(form, "To") or "").strip()
        sender = form_text(form, "From") or None
        service = form_text(form, "MessagingServiceSid") or None
        body = form_text(form, "Body")
        callback = form_text(form, "StatusCallback") or None
        if not to:
            return twilio_error(400, 21604, "A 'To' phone number is required.")
        if not E164.match(to):
            return twilio_error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if sender is None and service is None:
            return twilio_error(
                400, 21603, "A 'From' or 'MessagingServiceSid' parameter is required"
            )
        if not body:
            return twilio_error(400, 21602, "Message body is required.")
        if len(body) > SMS_MAX_BODY:
            return twilio_error(
                400, 21617, "The concatenated message body exceeds the 1600 character limit."
            )
        if callback is not None and not re.match(r"^https?://[^\s/]+", callback):
            return twilio_error(400, 21609, f"The StatusCallback URL {callback} is not valid.")

        rule = self._rules.take("sms", to)
        final, error_code = "delivered", None
        if rule is not None and rule.error not in HOLD_ERRORS:
            if rule.error in SMS_CALLBACK_FAILURES:
                final, error_code = SMS_CALLBACK_FAILURES[rule.error], int(rule.error)
            else:  # rejected outright: never processed, nothing stored
                await self._rules.hold(rule.hold)
                if rule.error == "21211":
                    return twilio_error(
                        400, 21211, f"The 'To' number {to} is not a valid phone number."
                    )
                status, code, message = SMS_ERRORS[rule.error]
                headers = retry_after_header(rule.retry_after) if status in (429, 503) else {}
                return twilio_error(status, code, message, headers)

        now = email.utils.format_datetime(utc_now())
        sid = "SM" + secrets.token_hex(16)
        record = self._outbox.add(
            {
                "channel": "sms",
                "to": [to],
                "from": sender or service,
                "body": body,
                "sid": sid,
                "status_callback": callback,
                "status": "queued",
                "error_code": None,
                "callbacks": [],
                # Twilio resource fields (the outbox record doubles as the Message resource)
                "from_number": sender,
                "messaging_service_sid": service,
                "date_created": now,
                "date_updated": now,
            }
        )
        self._messages[sid] = record
        self._to.setdefault(record["to"][0], []).append(record)
        log.debug("stored sms sid=%s to=%s", sid, to)
        self._background.spawn(self._progress(record, final, error_code))
        answer = self._resource(record)
        if rule is not None and rule.error in HOLD_ERRORS:
            await self._rules.hold(rule.hold)  # it arrived; the answer is late (or never seen)
        return JSONResponse(answer, status_code=201)

    async def _progress(self, record: Record, final: str, error_code: int | None) -> None:
        """Move the message to its final status and report each step to its StatusCallback."""
        await asyncio.sleep(self.callback_delay)
        steps = [final] if final == "failed" else ["sent", final]  # "failed" never left Twilio
        for status in steps:
            record["status"] = status
            record["date_updated"] = email.utils.format_datetime(utc_now())
            if status == "sent":
                record["date_sent"] = record["date_updated"]
            if status in ("undelivered", "failed"):
                record["error_code"] = error_code
            if record["status_callback"] is not None:
                await self._callback(record, status, error_code)

    async def _callback(self, record: Record, status: str, error_code: int | None) -> None:
        url: str = record["status_callback"]
        params = {
            "AccountSid": self.config.sms_account_sid,
            "ApiVersion": TWILIO_API_VERSION,
            "From": record["from"],
            "MessageSid": record["sid"],
            "MessageStatus": status,
            "SmsSid": record["sid"],
            "SmsStatus": status,
            "To": record["to"][0],
        }
        if record["messaging_service_sid"] is not None:
            params["MessagingServiceSid"] = record["messaging_service_sid"]
        if status in ("undelivered", "failed") and error_code is not None:
            params["ErrorCode"] = str(error_code)
        signature = twilio_signature(self.config.sms_auth_token, url, params)
        attempt: Record = {"url": url, "params": params, "signature": signature}
        try:
            answer = await self._http_client().post(
                url,
                data=params,
                headers={"X-Twilio-Signature": signature, "User-Agent": "TwilioProxy/1.1"},
            )
            attempt["answer_status"] = answer.status_code
        except httpx.HTTPError as exc:  # the receiver is down or slow: log it, carry on
            attempt["answer_status"] = None
            attempt["error"] = f"{type(exc).__name__}: {exc}"
            log.warning("status callback %s for %s failed: %s", url, record["sid"], exc)
        record["callbacks"].append(attempt)


# --------------------------------------------------------------------------------------------
# FCM HTTP v1
# --------------------------------------------------------------------------------------------

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_SCOPES = frozenset(
    {
        "https://www.googleapis.com/auth/firebase.messaging",
        "https://www.googleapis.com/auth/cloud-platform",  # Google accepts the wide scope too
    }
)
FCM_MAX_PAYLOAD = 4096
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
# FCM error code -> (HTTP status, Google status, message)
FCM_STATUS: dict[str, tuple[int, str, str]] = {
    "UNREGISTERED": (404, "NOT_FOUND", "Requested entity was not found."),
    "INVALID_ARGUMENT": (
        400,
        "INVALID_ARGUMENT",
        "The registration token is not a valid FCM registration token",
    ),
    "SENDER_ID_MISMATCH": (403, "PERMISSION_DENIED", "SenderId mismatch"),
    "THIRD_PARTY_AUTH_ERROR": (401, "UNAUTHENTICATED", "Auth error from APNS or Web Push Service"),
    "QUOTA_EXCEEDED": (429, "RESOURCE_EXHAUSTED", "Quota exceeded for sending messages."),
    "UNAVAILABLE": (503, "UNAVAILABLE", "The service is currently unavailable."),
    "INTERNAL": (500, "INTERNAL", "Internal error encountered."),
}
FCM_RULE_CODES = {"429": "QUOTA_EXCEEDED", "500": "INTERNAL", "503": "UNAVAILABLE"}
FCM_RULE_RETRYABLE = frozenset({"QUOTA_EXCEEDED", "UNAVAILABLE", "INTERNAL"})  # get Retry-After
# Fields of a v1 Message (JSON accepts the proto name and its lowerCamel form).
FCM_MESSAGE_FIELDS = frozenset(
    {"name", "token", "notification", "data", "android", "apns", "webpush"}
    | {"fcm_options", "fcmOptions"}
)
FCM_RESERVED_DATA_KEYS = frozenset({"from", "message_type", "notification"})


def fcm_error(
    fcm_code: str,
    message: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    status, google_status, default_message = FCM_STATUS[fcm_code]
    body = {
        "error": {
            "code": status,
            "message": message or default_message,
            "status": google_status,
            "details": [{"@type": FCM_ERROR_TYPE, "errorCode": fcm_code}],
        }
    }
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def google_error(status: int, google_status: str, message: str, **extra: Any) -> JSONResponse:
    """A Google API error that is not an FCM error (authentication, permissions)."""
    body = {"error": {"code": status, "message": message, "status": google_status, **extra}}
    return JSONResponse(body, status_code=status)


def oauth_error(error: str, description: str) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status_code=400)


@dataclass(frozen=True)
class ServiceAccount:
    """The Google service account the sandbox's OAuth endpoint trusts."""

    info: dict[str, Any]  # the JSON file's content
    public_key: rsa.RSAPublicKey

    @property
    def project_id(self) -> str:
        return str(self.info["project_id"])

    @property
    def client_email(self) -> str:
        return str(self.info["client_email"])

    @property
    def token_uri(self) -> str:
        return str(self.info["token_uri"])

    @property
    def private_key_id(self) -> str:
        return str(self.info.get("private_key_id", ""))


def _write_private_file(path: Path, info: Mapping[str, Any]) -> None:
    """Write the JSON atomically and owner-only (it holds a private key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(info, handle, indent=2)
        handle.write("\n")
    os.replace(temporary, path)


def new_service_account(token_uri: str) -> tuple[dict[str, Any], rsa.RSAPublicKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    info = {
        "type": "service_account",
        "project_id": DEFAULT_FCM_PROJECT,
        "private_key_id": secrets.token_hex(20),
        "private_key": pem,
        "client_email": DEFAULT_FCM_CLIENT_EMAIL,
        "client_id": str(secrets.randbelow(10**21 - 10**20) + 10**20),
        "token_uri": token_uri,
    }
    return info, key.public_key()


def load_service_account(path: Path | None, token_uri: str) -> ServiceAccount:
    """Load the service-account file (creating it if missing) and point it at this sandbox.

    Raises ValueError with a readable reason when an existing file is unusable.
    """
    if path is None:
        info, public_key = new_service_account(token_uri)
        return ServiceAccount(info, public_key)
    if not path.exists():
        info, public_key = new_service_account(token_uri)
        _write_private_file(path, info)
        log.info("wrote a new FCM service account to %s", path)
        return ServiceAccount(info, public_key)
    try:
        info = json.loads(path.read_text())
        if not isinstance(info, dict) or info.get("type") != "service_account":
            raise ValueError("not a service-account JSON file")
        for name in ("project_id", "client_email", "private_key"):
            if not isinstance(info.get(name), str) or not info[name]:
                raise ValueError(f"missing {name!r}")
        private_key = serialization.load_pem_private_key(info["private_key"].encode(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"cannot use FCM service account {path}: {exc}") from exc
    if not isinstance(private_key, rsa.RSAPrivateKey):
        raise ValueError(f"cannot use FCM service account {path}: the key is not RSA")
    if info.get("token_uri") != token_uri:
        info["token_uri"] = token_uri  # the sandbox's port changes between runs
        _write_private_file(path, info)
        log.info("pointed token_uri of %s at %s", path, token_uri)
    return ServiceAccount(info, private_key.public_key())


class FcmProvider:
    def __init__(
        self, config: ProviderConfig, outbox: OutboxStore, rules: FailureRules, latency: Latency
    ) -> None:
        self.config = config
        self._outbox = outbox
        self._rules = rules
        self._latency = latency
        self.account: ServiceAccount | None = None  # set once the HTTP port is known
        self._tokens: dict[str, float] = {}  # access token -> expiry (monotonic)

    def revoke(self) -> int:
        count = len(self._tokens)
        self._tokens.clear()
        return count

    def reset(self) -> None:
        self.revoke()

    def _issue(self) -> str:
        now = time.monotonic()
        self._tokens = {token: until for token, until in self._tokens.items() if until > now}
        token = "ya29." + secrets.token_urlsafe(48)
        self._tokens[token] = now + self.config.fcm_token_ttl
        return token

    def _check_assertion(self, assertion: str, account: ServiceAccount) -> str | None:
        """Why a JWT grant is refused, or None when it is good."""
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(
                assertion,
                account.public_key,
                algorithms=["RS256"],
                audience=account.token_uri,
                issuer=account.client_email,
                # exp/iat get Google's own checks below (short-lived, sane clock)
                options={"require": ["iss", "aud", "iat", "exp"], "verify_exp": False},
                leeway=300,
            )
        except jwt.InvalidSignatureError:
            return "Invalid JWT Signature."
        except jwt.InvalidAudienceError:
            return f"Invalid JWT: aud must be {account.token_uri}"
        except jwt.InvalidIssuerError:
            return "Invalid JWT: iss is not the service account's client_email"
        except jwt.PyJWTError as exc:
            return f"Invalid JWT: {exc}"
        kid = header.get("kid")
        if kid is not None and kid != account.private_key_id:
            return "Invalid JWT Signature."  # Google checks against the key kid names
        iat, exp = claims.get("iat"), claims.get("exp")
        now = time.time()
        if (
            not isinstance(iat, int | float)
            or not isinstance(exp, int | float)
            or exp <= iat
            or exp - iat > 3600
            or iat > now + 300
            or exp < now
        ):
            return (
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                "reasonable timeframe. Check your iat and exp values in the JWT claim."
            )
        scope = claims.get("scope")
        if not isinstance(scope, str) or not FCM_SCOPES & set(scope.split()):
            return (
                "Invalid JWT: scope must include https://www.googleapis.com/auth/firebase.messaging"
            )
        return None

    def _bearer_ok(self, request: Request) -> bool | None:
        """True for a live token, False for a bad one, None when there is no bearer token."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        until = self._tokens.get(token.strip())
        return until is not None and until > time.monotonic()

    def routes(self, app: FastAPI) -> None:
        @app.post("/token", include_in_schema=False)
        async def token(request: Request) -> Response:
            await self._latency.wait()
            account = self.account
            if account is None:
                return JSONResponse({"error": "temporarily_unavailable"}, status_code=503)
            form = await read_form(request)
            if form is None:
                return oauth_error("invalid_request", "Unable to parse the request body")
            grant_type = form_text(form, "grant_type")
            if grant_type != JWT_BEARER:
                return oauth_error("unsupported_grant_type", f"Invalid grant_type: {grant_type}")
            assertion = form_text(form, "assertion")
            if not assertion:
                return oauth_error("invalid_request", "Missing required parameter: assertion")
            problem = self._check_assertion(assertion, account)
            if problem is not None:
                log.info("refused FCM token grant: %s", problem)
                return oauth_error("invalid_grant", problem)
            return JSONResponse(
                {
                    "access_token": self._issue(),
                    "expires_in": self.config.fcm_token_ttl,
                    "token_type": "Bearer",
                }
            )

    async def send(self, request: Request, project: str) -> Response:
        await self._latency.wait()
        return await self._send(project, request)

    def fast_routes(self) -> list[FastRoute]:
        path = re.compile(r"/v1/projects/(?P<project>[^/]+)/messages:send")
        return [FastRoute("POST", path, self.send)]

    async def _send(self, project: str, request: Request) -> Response:
        authenticated = self._bearer_ok(request)
        if authenticated is None:
            return google_error(
                401,
                "UNAUTHENTICATED",
                "Request is missing required authentication credential. Expected OAuth 2 "
                "access token, login cookie or other valid authentication credential.",
            )
        if not authenticated:
            return google_error(
                401, "UNAUTHENTICATED", "Request had invalid authentication credentials."
            )
        account = self.account
        if account is None or project != account.project_id:
            # What Google answers for a project the service account may not use.
            return google_error(
                403,
                "PERMISSION_DENIED",
                f"Permission 'cloudmessaging.messages.create' denied on resource "
                f"'//cloudresourcemanager.googleapis.com/projects/{project}' "
                f"(or it may not exist).",
                details=[
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "IAM_PERMISSION_DENIED",
                        "domain": "cloudresourcemanager.googleapis.com",
                    }
                ],
            )
        try:
            payload = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            return fcm_error("INVALID_ARGUMENT", "Invalid JSON payload received.")
        problem, message = validate_fcm_request(payload)
        if problem is not None or message is None:
            return fcm_error("INVALID_ARGUMENT", problem)
        device = message["token"]
        if payload.get("validate_only") or payload.get("validateOnly"):
            # A dry run: validated like a send, stored nowhere, failure rules left alone.
            return JSONResponse({"name": f"projects/{project}/messages/fake_message_id"})

        rule = self._rules.take("push", device)
        if rule is not None and rule.error not in HOLD_ERRORS:
            await self._rules.hold(rule.hold)
            code = FCM_RULE_CODES.get(rule.error, rule.error)
            headers = retry_after_header(rule.retry_after) if code in FCM_RULE_RETRYABLE else {}
            return fcm_error(code, headers=headers)
        name = f"projects/{project}/messages/0:{time.time_ns() // 1000}%{secrets.token_hex(8)}"
        notification = message.get("notification") or {}
        self._outbox.add(
            {
                "channel": "push",
                "to": [device],
                "title": notification.get("title"),
                "body": notification.get("body"),
                "image": notification.get("image"),
                "data": message.get("data") or {},
                "android": message.get("android"),
                "apns": message.get("apns"),
                "webpush": message.get("webpush"),
                "project": project,
                "name": name,
            }
        )
        log.debug("stored push name=%s", name)
        if rule is not None:  # timeout / slow: it arrived, the answer is late
            await self._rules.hold(rule.hold)
        return JSONResponse({"name": name})


def _string_map(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(key, str) and isinstance(item, str) for key, item in value.items()
    )


def validate_fcm_request(payload: Any) -> tuple[str | None, dict[str, Any] | None]:
    """(why the send request is invalid, None) or (None, the message)."""
    if not isinstance(payload, dict):
        return "Invalid JSON payload received. Expected an object.", None
    unknown = set(payload) - {"message", "validate_only", "validateOnly"}
    if unknown:
        return f'Invalid JSON payload received. Unknown name "{sorted(unknown)[0]}".', None
    message = payload.get("message")
    if not isinstance(message, dict):
        return "Request contains an invalid argument: message is required.", None
    unknown = set(message) - FCM_MESSAGE_FIELDS
    if unknown:
        name = sorted(unknown)[0]
        return f"Invalid JSON payload received. Unknown name \"{name}\" at 'message'.", None
    for name in ("validate_only", "validateOnly"):
        if name in payload and not isinstance(payload[name], bool):
            return f"Invalid value at '{name}' (TYPE_BOOL).", None
    token = message.get("token")
    if not isinstance(token, str) or not token:
        return "Recipient of the message is not set.", None
    notification = message.get("notification")
    if notification is not None and not _string_map(notification):
        return "Invalid value at 'message.notification': fields must be strings.", None
    if notification is not None and set(notification) - {"title", "body", "image"}:
        return "Invalid JSON payload received. Unknown name at 'message.notification'.", None
    data = message.get("data")
    if data is not None:
        if not _string_map(data):
            return "Invalid value at 'message.data': every value must be a string.", None
        for key in data:
            if key in FCM_RESERVED_DATA_KEYS or key.startswith(("google.", "gcm.")):
                return f"Invalid data payload key: {key}", None
    for name in ("android", "apns", "webpush"):
        if name in message and not isinstance(message[name], dict):
            return f"Invalid value at 'message.{name}': expected an object.", None
    # The size limit covers what the device receives: the message without its address.
    content = {key: value for key, value in message.items() if key != "token"}
    size = len(json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode())
    if size > FCM_MAX_PAYLOAD:
        return f"Message is too big: {size} bytes, the limit is {FCM_MAX_PAYLOAD}.", None
    return None, message


# --------------------------------------------------------------------------------------------
# WeChat Official Account
# --------------------------------------------------------------------------------------------


def wechat(errcode: int, errmsg: str | None = None, **extra: Any) -> JSONResponse:
    """WeChat answers everything with HTTP 200 and an errcode."""
    body = {"errcode": errcode, "errmsg": errmsg or WECHAT_ERRMSG.get(errcode, "error"), **extra}
    return JSONResponse(body)


@dataclass
class WeChatToken:
    expires_at: float  # monotonic
    superseded_until: float | None = None  # after a newer token: valid until then, then 40001


@dataclass
class WeChatState:
    tokens: dict[str, WeChatToken] = field(default_factory=dict)
    current: str | None = None
    issued: int = 0
    sent_by_client_msg_id: dict[str, int] = field(default_factory=dict)


class WeChatProvider:
    def __init__(
        self, config: ProviderConfig, outbox: OutboxStore, rules: FailureRules, latency: Latency
    ) -> None:
        self.config = config
        self._outbox = outbox
        self._rules = rules
        self._latency = latency
        self.state = WeChatState()
        # msgids look like WeChat's: large 64-bit integers, increasing
        self._msgids = itertools.count(2_800_000_000_000_000_000 + secrets.randbelow(10**15))

    def reset(self) -> None:
        self.state = WeChatState()

    def _issue(self) -> str:
        now = time.monotonic()
        state = self.state
        previous = state.tokens.get(state.current or "")
        if previous is not None:  # the old token keeps working for the overlap, then not
            previous.superseded_until = min(
                previous.expires_at, now + self.config.wechat_token_overlap
            )
        stale = [t for t, s in state.tokens.items() if s.expires_at < now - 3600]
        for token in stale:  # keep a recent history only, to tell 42001 from 40001
            del state.tokens[token]
        token = secrets.token_urlsafe(96).replace("-", "_")
        state.tokens[token] = WeChatToken(expires_at=now + self.config.wechat_token_ttl)
        state.current = token
        state.issued += 1
        log.info("issued WeChat access token #%d", state.issued)
        return token

    def _current_expires_in(self) -> int | None:
        state = self.state
        current = state.tokens.get(state.current or "")
        if current is None:
            return None
        return max(0, int(current.expires_at - time.monotonic()))

    def token_problem(self, token: str | None) -> JSONResponse | None:
        """The errcode answer for a missing, unknown, superseded or expired token."""
        if not token:
            return wechat(41001, "access_token missing")
        known = self.state.tokens.get(token)
        now = time.monotonic()
        if known is None:
            return wechat(40001)
        if known.superseded_until is not None and now >= known.superseded_until:
            if now >= known.expires_at:
                return wechat(42001)
            return wechat(40001)
        if now >= known.expires_at:
            return wechat(42001)
        return None

    def _credentials_problem(self, appid: Any, secret: Any) -> JSONResponse | None:
        if not appid:
            return wechat(41002, "appid missing")
        if not secret:
            return wechat(41004, "appsecret missing")
        if not isinstance(appid, str) or not hmac.compare_digest(appid, self.config.wechat_app_id):
            return wechat(40013, "invalid appid")
        if not isinstance(secret, str) or not hmac.compare_digest(
            secret, self.config.wechat_app_secret
        ):
            return wechat(40125, "invalid appsecret")
        return None

    def status(self) -> dict[str, Any]:
        return {
            "tokens_issued": self.state.issued,
            "current_token_expires_in": self._current_expires_in(),
        }

    def routes(self, app: FastAPI) -> None:
        @app.get("/cgi-bin/token", include_in_schema=False)
        async def token(request: Request) -> Response:
            await self._latency.wait()
            query = request.query_params
            if query.get("grant_type") != "client_credential":
                return wechat(40002, "invalid grant_type")
            problem = self._credentials_problem(query.get("appid"), query.get("secret"))
            if problem is not None:
                return problem
            return JSONResponse(
                {"access_token": self._issue(), "expires_in": self.config.wechat_token_ttl}
            )

        @app.post("/cgi-bin/stable_token", include_in_schema=False)
        async def stable_token(request: Request) -> Response:
            await self._latency.wait()
            body = await self._json_body(request)
            if not isinstance(body, dict):
                return wechat(47001, "data format error")
            if body.get("grant_type") != "client_credential":
                return wechat(40002, "invalid grant_type")
            problem = self._credentials_problem(body.get("appid"), body.get("secret"))
            if problem is not None:
                return problem
            force = body.get("force_refresh", False)
            if not isinstance(force, bool):
                return wechat(47001, "data format error")
            expires_in = self._current_expires_in()
            if force or not expires_in:
                self._issue()
                expires_in = self._current_expires_in()
            return JSONResponse({"access_token": self.state.current, "expires_in": expires_in})

        @app.post("/cgi-bin/message/template/send", include_in_schema=False)
        async def template_send(request: Request) -> Response:
            await self._latency.wait()
            return await self._template_send(request)

        @app.post("/cgi-bin/message/custom/send", include_in_schema=False)
        async def custom_send(request: Request) -> Response:
            await self._latency.wait()
            return await self._custom_send(request)

    @staticmethod
    async def _json_body(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            return None

    async def _rule_answer(self, openid: str) -> tuple[JSONResponse | None, FailureRule | None]:
        """(an error answer to give now, or None) and the rule that applied, if any."""
        rule = self._rules.take("wechat", openid)
        if rule is None or rule.error in HOLD_ERRORS:
            return None, rule
        await self._rules.hold(rule.hold)
        errcode = -1 if rule.error in ("429", "500", "503") else int(rule.error)
        return wechat(errcode), rule

    async def _template_send(self, request: Request) -> Response:
        problem = self.token_problem(request.query_params.get("access_token"))
        if problem is not None:
            return problem
        body = await self._json_body(request)
        if not isinstance(body, dict):
            return wechat(47001, "data format error")
        openid = body.get("touser")
        if not isinstance(openid, str) or not openid:
            return wechat(40003)
        template_id = body.get("template_id")
        if template_id not in self.config.wechat_templates:
            return wechat(40037)
        data = body.get("data")
        bad_key = template_data_problem(data)
        if bad_key is not None:
            return wechat(47003, f"argument invalid! data.{bad_key}.value invalid")
        url = body.get("url")
        client_msg_id = body.get("client_msg_id")
        if (url is not None and not isinstance(url, str)) or (
            client_msg_id is not None and not isinstance(client_msg_id, str)
        ):
            return wechat(47001, "data format error")

        if client_msg_id and client_msg_id in self.state.sent_by_client_msg_id:
            # WeChat's anti-duplicate: the same client_msg_id is sent once, answered alike.
            return wechat(0, "ok", msgid=self.state.sent_by_client_msg_id[client_msg_id])
        answer, rule = await self._rule_answer(openid)
        if answer is not None:
            return answer
        msgid = next(self._msgids)
        if client_msg_id:
            self.state.sent_by_client_msg_id[client_msg_id] = msgid
        self._outbox.add(
            {
                "channel": "wechat",
                "to": [openid],
                "kind": "template",
                "template_id": template_id,
                "url": url,
                "miniprogram": body.get("miniprogram"),
                "data": data,
                "client_msg_id": client_msg_id,
                "msgid": msgid,
            }
        )
        log.debug("stored wechat template msgid=%d to=%s", msgid, openid)
        if rule is not None:
            await self._rules.hold(rule.hold)
        return wechat(0, "ok", msgid=msgid)

    async def _custom_send(self, request: Request) -> Response:
        problem = self.token_problem(request.query_params.get("access_token"))
        if problem is not None:
            return problem
        body = await self._json_body(request)
        if not isinstance(body, dict):
            return wechat(47001, "data format error")
        openid = body.get("touser")
        if not isinstance(openid, str) or not openid:
            return wechat(40003)
        msgtype = body.get("msgtype")
        record: Record = {"channel": "wechat", "to": [openid], "kind": msgtype}
        if msgtype == "text":
            text = body.get("text")
            content = text.get("content") if isinstance(text, dict) else None
            if not isinstance(content, str) or not content:
                return wechat(44004, "empty content")
            record["content"] = content
        elif msgtype == "news":
            news = body.get("news")
            articles = news.get("articles") if isinstance(news, dict) else None
            if not isinstance(articles, list) or not articles:
                return wechat(44003, "empty news data")
            if len(articles) > 1:  # customer-service news carries one article since 2018
                return wechat(45008, "article size out of limit")
            article = articles[0]
            fields = ("title", "description", "url", "picurl")
            if not isinstance(article, dict) or not all(
                isinstance(article.get(name, ""), str) for name in fields
            ):
                return wechat(47001, "data format error")
            record.update({name: article.get(name) for name in fields})
        else:
            return wechat(40008, "invalid message type")

        answer, rule = await self._rule_answer(openid)
        if answer is not None:
            return answer
        self._outbox.add(record)
        log.debug("stored wechat %s to=%s", msgtype, openid)
        if rule is not None:
            await self._rules.hold(rule.hold)
        return wechat(0, "ok")


def template_data_problem(data: Any) -> str | None:
    """The first template data key that is not {"value": str[, "color": str]}, or None."""
    if not isinstance(data, dict):
        return "*"
    for key, item in data.items():
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("value"), str)
            or not isinstance(item.get("color", ""), str)
            or set(item) - {"value", "color"}
        ):
            return str(key)
    return None


# --------------------------------------------------------------------------------------------
# Email events, Mailgun style
# --------------------------------------------------------------------------------------------
#
# Mailgun's Events API (GET /v3/{domain}/events) answers whether a message with a given
# Message-ID was accepted: what a dispatcher asks when the SMTP answer to a message never came
# (a worker killed mid-send, a timeout after DATA). The sandbox records one `accepted` event per
# recipient of every email its SMTP server stores, at DATA time, and serves them in Mailgun's
# shape: {"items": [...], "paging": {"first", "last", "next", "previous"}}, the paging URLs
# carrying the whole query and a cursor in an opaque token (/v3/{domain}/events/{page}).

EVENTS_MAX_LIMIT = 300
EVENTS_DEFAULT_LIMIT = 100
# Query parameters the sandbox understands; `pretty` (Mailgun's pretty printing) is ignored.
EVENTS_PARAMS = ("message-id", "event", "recipient", "begin", "end", "ascending", "limit")


@dataclass(frozen=True, slots=True)
class MessageHeaders:
    """The headers of a stored email an event shows, read from its header block at DATA."""

    subject: str | None = None
    message_id: str | None = None  # without its angle brackets
    from_: str | None = None
    to: str | None = None


@dataclass(frozen=True, slots=True)
class EmailEvent:
    seq: int  # arrival order across all events; page cursors count in it
    id: str
    timestamp: float  # epoch seconds
    recipient: str
    sender: str
    headers: MessageHeaders  # shared by the events of one message
    size: int  # bytes of the message as it arrived

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "event": "accepted",
            "timestamp": self.timestamp,
            "log-level": "info",
            "method": "smtp",
            "recipient": self.recipient,
            "recipient-domain": self.recipient.rpartition("@")[2],
            "envelope": {"sender": self.sender, "targets": self.recipient, "transport": "smtp"},
            "message": {
                "headers": {
                    "message-id": self.headers.message_id,
                    "from": self.headers.from_,
                    "to": self.headers.to,
                    "subject": self.headers.subject,
                },
                "size": self.size,
            },
        }


def message_id_key(value: str) -> str:
    """A Message-ID as the events API matches it: what is between its angle brackets (a
    comment after them left out), or the whole value trimmed when it has none."""
    start = value.find("<")
    stop = value.find(">", start + 1)
    if start >= 0 and stop > start:
        return value[start + 1 : stop].strip()
    return value.strip().strip("<>").strip()


def _recipient_index_key(address: str) -> str:
    return address.strip().strip("<>").casefold()


# A page cursor: ("after", seq) is the page that follows the event `seq` in the query's order,
# ("before", seq) the page that precedes it. Either may name an event that is not listed: seq 0
# comes before every event and the next seq to be given after every one.
Cursor = tuple[Literal["after", "before"], int]


@dataclass(frozen=True)
class EventsQuery:
    """A parsed events query: its filters, the inclusive time range and the order."""

    message_id: str | None = None  # without angle brackets
    recipient: str | None = None  # as _recipient_index_key gives it: case-folded
    event: str | None = None
    begin: float | None = None  # the range's lower bound (whatever the order), None = open
    end: float | None = None  # its upper bound
    ascending: bool = False
    limit: int = EVENTS_DEFAULT_LIMIT

    def wants_accepted(self) -> bool:
        """Whether the event filter lets `accepted` through (`a OR b` names several)."""
        if self.event is None:
            return True
        return any(term.strip().casefold() == "accepted" for term in self.event.split(" OR "))

    def matches(self, event: EmailEvent) -> bool:
        if self.message_id is not None and event.headers.message_id != self.message_id:
            return False
        if self.recipient is not None and _recipient_index_key(event.recipient) != self.recipient:
            return False
        if self.begin is not None and event.timestamp < self.begin:
            return False
        return self.end is None or event.timestamp <= self.end


@dataclass(frozen=True)
class EventsPage:
    items: list[EmailEvent]
    first: Cursor
    last: Cursor
    next: Cursor
    previous: Cursor


def _seq(event: EmailEvent) -> int:
    return event.seq


class EmailEvents:
    """The `accepted` event of each recipient of each stored email, oldest first, indexed by
    Message-ID and by recipient so that a query for either reads only its own events, not
    every event of the session."""

    def __init__(self) -> None:
        self._events: list[EmailEvent] = []
        self._by_message_id: dict[str, list[EmailEvent]] = {}
        self._by_recipient: dict[str, list[EmailEvent]] = {}
        self._last_seq = 0  # never reset: a page token from before a clear stays meaningful

    def record(
        self,
        *,
        timestamp: float,
        sender: str,
        recipients: Iterable[str],
        headers: MessageHeaders,
        size: int,
    ) -> list[EmailEvent]:
        """One event per recipient of a message the SMTP server stored."""
        recorded = []
        for recipient in recipients:
            self._last_seq += 1
            event = EmailEvent(
                seq=self._last_seq,
                id=secrets.token_urlsafe(16),
                timestamp=timestamp,
                recipient=recipient,
                sender=sender,
                headers=headers,
                size=size,
            )
            self._events.append(event)
            if headers.message_id:
                self._by_message_id.setdefault(headers.message_id, []).append(event)
            self._by_recipient.setdefault(_recipient_index_key(recipient), []).append(event)
            recorded.append(event)
        return recorded

    def recipients_of(self, message_id: str) -> list[str]:
        """Who the stored messages with this Message-ID went to."""
        return [event.recipient for event in self._by_message_id.get(message_id, [])]

    def clear(self) -> int:
        count = len(self._events)
        self._events.clear()
        self._by_message_id.clear()
        self._by_recipient.clear()
        return count

    def _candidates(self, query: EventsQuery) -> list[EmailEvent]:
        """The events the query can list, in arrival order: an index's list when it can."""
        if not query.wants_accepted():
            return []
        if query.message_id is not None:
            return self._by_message_id.get(query.message_id, [])
        if query.recipient is not None:
            return self._by_recipient.get(query.recipient, [])
        return self._events

    def first(self, query: EventsQuery) -> Cursor:
        """The cursor of the query's first page: from the oldest event, or (descending) from
        the newest one at the time of asking."""
        return ("after", 0) if query.ascending else ("after", self._last_seq + 1)

    def page(self, query: EventsQuery, cursor: Cursor | None = None) -> EventsPage:
        events = self._candidates(query)
        ahead = 1 if query.ascending else -1  # the query's order, as a step through `events`
        kind, seq = cursor or self.first(query)
        if kind == "after":  # the events following `seq` in the query's order
            if ahead > 0:
                start = bisect.bisect_right(events, seq, key=_seq)
            else:
                start = bisect.bisect_left(events, seq, key=_seq) - 1
            items = self._walk(events, query, start, ahead)
        else:  # the events preceding `seq`: walked back from it, then put in order
            if ahead > 0:
                start = bisect.bisect_left(events, seq, key=_seq) - 1
            else:
                start = bisect.bisect_right(events, seq, key=_seq)
            items = self._walk(events, query, start, -ahead)[::-1]
        if items:
            following: Cursor = ("after", items[-1].seq)
            preceding: Cursor = ("before", items[0].seq)
        elif kind == "after":  # nothing yet beyond `seq`: ask again later, or look back
            following, preceding = ("after", seq), ("before", seq + ahead)
        else:
            following, preceding = ("after", seq - ahead), ("before", seq)
        end = self._last_seq + 1
        return EventsPage(
            items=items,
            first=self.first(query),
            last=("before", end) if query.ascending else ("before", 0),
            next=following,
            previous=preceding,
        )

    @staticmethod
    def _walk(
        events: list[EmailEvent], query: EventsQuery, index: int, step: int
    ) -> list[EmailEvent]:
        found: list[EmailEvent] = []
        while 0 <= index < len(events) and len(found) < query.limit:
            event = events[index]
            if query.matches(event):
                found.append(event)
            index += step
        return found


def _event_time(name: str, value: str) -> float | str:
    """Epoch seconds from `value` (a number or an RFC 2822 date, as Mailgun takes), or why
    not."""
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return f"{name} must be epoch seconds or an RFC 2822 date, not {value!r}"
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    if not math.isfinite(seconds):
        return f"{name} must be a finite number of epoch seconds"
    return seconds


def parse_events_query(params: Mapping[str, str]) -> EventsQuery | str:
    """The query of GET /v3/{domain}/events, or why it is refused (a 400 naming the field).

    The time range: `begin` is where the listing starts and `end` where it stops, so with both
    their order gives the direction; with one of them (or none) `ascending` does (default: yes
    from a `begin`, otherwise no: newest first)."""
    unknown = sorted(set(params) - {*EVENTS_PARAMS, "pretty"})
    if unknown:
        return (
            f"{unknown[0]} is not a filter the sandbox knows: it filters by "
            f"{', '.join(EVENTS_PARAMS)}"
        )
    limit_text = params.get("limit", str(EVENTS_DEFAULT_LIMIT)).strip()
    if not re.fullmatch(r"[0-9]{1,4}", limit_text) or not 1 <= int(limit_text) <= EVENTS_MAX_LIMIT:
        return f"limit must be an integer from 1 to {EVENTS_MAX_LIMIT}, not {limit_text!r}"
    texts: dict[str, str | None] = {}
    for name, normal in (
        ("message-id", message_id_key),
        ("recipient", _recipient_index_key),
        ("event", str.strip),
    ):
        value = params.get(name)
        if value is not None and not normal(value):
            return f"{name} must not be empty"
        texts[name] = None if value is None else normal(value)
    ascending_text = params.get("ascending")
    if ascending_text is not None and ascending_text.strip().lower() not in ("yes", "no"):
        return f"ascending must be yes or no, not {ascending_text!r}"
    times: dict[str, float | None] = {}
    for name in ("begin", "end"):
        value = params.get(name)
        moment = None if value is None else _event_time(name, value.strip())
        if isinstance(moment, str):
            return moment
        times[name] = moment
    begin, end = times["begin"], times["end"]
    if begin is not None and end is not None:
        ascending = begin <= end
        low, high = min(begin, end), max(begin, end)
    else:
        if ascending_text is None:
            ascending = begin is not None
        else:
            ascending = ascending_text.strip().lower() == "yes"
        start, stop = (begin, end) if ascending else (end, begin)
        low, high = start, stop
    return EventsQuery(
        message_id=texts["message-id"],
        recipient=texts["recipient"],
        event=texts["event"],
        begin=low,
        end=high,
        ascending=ascending,
        limit=int(limit_text),
    )


def encode_page(query: EventsQuery, cursor: Cursor) -> str:
    """The token of a paging URL: the whole query and the cursor, base64url JSON."""
    payload = {
        "m": query.message_id,
        "r": query.recipient,
        "e": query.event,
        "b": query.begin,
        "t": query.end,
        "a": query.ascending,
        "l": query.limit,
        "c": [cursor[0], cursor[1]],
    }
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page(token: str) -> tuple[EventsQuery, Cursor] | None:
    """The query and cursor of a paging URL's token, or None when it is not one of ours."""
    try:
        payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        kind, seq = payload["c"]
        texts = [payload[name] for name in ("m", "r", "e")]
        bounds = [payload[name] for name in ("b", "t")]
        ascending, limit = payload["a"], payload["l"]
    except (ValueError, TypeError, KeyError, binascii.Error):
        return None
    if (
        kind not in ("after", "before")
        or type(seq) is not int
        or any(text is not None and not isinstance(text, str) for text in texts)
        or any(
            bound is not None and (type(bound) not in (int, float) or not math.isfinite(bound))
            for bound in bounds
        )
        or type(ascending) is not bool
        or type(limit) is not int
        or not 1 <= limit <= EVENTS_MAX_LIMIT
    ):
        return None
    query = EventsQuery(
        message_id=texts[0],
        recipient=None if texts[1] is None else _recipient_index_key(texts[1]),
        event=texts[2],
        begin=None if bounds[0] is None else float(bounds[0]),
        end=None if bounds[1] is None else float(bounds[1]),
        ascending=ascending,
        limit=limit,
    )
    return query, ("after" if kind == "after" else "before", seq)


def mailgun_error(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"message": message}, status_code=status, headers=dict(headers or {}))


MAILGUN_RULE_ERRORS = {
    "429": (429, "Too many requests"),
    "500": (500, "Internal Server Error"),
    "503": (503, "Service Unavailable"),
}


class EmailEventsProvider:
    def __init__(
        self, config: ProviderConfig, events: EmailEvents, rules: FailureRules, latency: Latency
    ) -> None:
        self.config = config
        self._events = events
        self._rules = rules
        self._latency = latency

    def _authorized(self, request: Request) -> bool:
        """HTTP Basic with user `api` and the API key as the password, as Mailgun takes it."""
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except binascii.Error:
            return False
        user, _, password = decoded.partition(b":")
        # bytes, not str: compare_digest refuses str with non-ASCII characters
        return hmac.compare_digest(user, b"api") and hmac.compare_digest(
            password, self.config.email_events_api_key.encode()
        )

    def routes(self, app: FastAPI) -> None:
        @app.get("/v3/{domain}/events", include_in_schema=False)
        async def list_events(domain: str, request: Request) -> Response:
            return await self._answer(request, domain, None)

        @app.get("/v3/{domain}/events/{page}", include_in_schema=False)
        async def list_events_page(domain: str, page: str, request: Request) -> Response:
            return await self._answer(request, domain, page)

    async def _answer(self, request: Request, domain: str, page: str | None) -> Response:
        await self._latency.wait()
        if not self._authorized(request):
            return mailgun_error(
                401,
                "Invalid API key: use HTTP Basic auth with user 'api' and the sandbox's email "
                "events API key as the password",
                {"WWW-Authenticate": 'Basic realm="MG API"'},
            )
        cursor: Cursor | None = None
        if page is None:
            parsed = parse_events_query(request.query_params)
            if isinstance(parsed, str):
                return mailgun_error(400, parsed)
            query = parsed
        else:
            if request.query_params:
                return mailgun_error(
                    400, "a page URL carries its whole query: give no parameters with it"
                )
            decoded = decode_page(page)
            if decoded is None:
                return mailgun_error(400, f"{page!r} is not a page of this events API")
            query, cursor = decoded
        if query.message_id is not None:
            # A rule names the Message-ID, or an address the message went to (a test knows
            # the address before the message exists, not its Message-ID).
            keys = [query.message_id, *self._events.recipients_of(query.message_id)]
            rule = next(
                (r for k in keys if (r := self._rules.take("email", k, action="list"))), None
            )
            if rule is not None:
                await self._rules.hold(rule.hold)  # "timeout" and "slow" answer late, then list
                if rule.error not in HOLD_ERRORS:
                    status, message = MAILGUN_RULE_ERRORS.get(
                        rule.error, MAILGUN_RULE_ERRORS["500"]
                    )
                    headers = retry_after_header(rule.retry_after) if status in (429, 503) else {}
                    return mailgun_error(status, message, headers)
        found = self._events.page(query, cursor)
        base = f"{str(request.base_url).rstrip('/')}/v3/{quote(domain, safe='')}/events"
        return JSONResponse(
            {
                "items": [event.as_json() for event in found.items],
                "paging": {
                    name: f"{base}/{encode_page(query, target)}"
                    for name, target in (
                        ("first", found.first),
                        ("last", found.last),
                        ("next", found.next),
                        ("previous", found.previous),
                    )
                },
            }
        )


# --------------------------------------------------------------------------------------------
# All providers together, plus their control API
# --------------------------------------------------------------------------------------------


class CallbackDelayIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delay_seconds: float = Field(ge=0, le=86_400)


class LatencyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(ge=0, le=600)


class Providers:
    """The provider APIs' shared state: failure rules, latency, tokens, pending callbacks."""

    def __init__(self, config: ProviderConfig, outbox: OutboxStore) -> None:
        self.config = config
        self.pauses = Pauses()
        self.rules = FailureRules(self.pauses)
        self.latency = Latency(config.latency, self.pauses)
        self.background = Background()
        self._client: httpx.AsyncClient | None = None
        self.sms = SmsProvider(
            config, outbox, self.rules, self.latency, self.background, self.http_client
        )
        self.fcm = FcmProvider(config, outbox, self.rules, self.latency)
        self.wechat = WeChatProvider(config, outbox, self.rules, self.latency)
        self.email_events = EmailEventsProvider(
            config, outbox.email_events, self.rules, self.latency
        )

    def http_client(self) -> httpx.AsyncClient:
        """The client status callbacks go out with, made on first use (inside the loop)."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=5.0)
        return self._client

    def configure_fcm(self, http_url: str) -> ServiceAccount:
        """Load or create the service account, now that the token endpoint's URL is known."""
        account = load_service_account(self.config.fcm_service_account_file, f"{http_url}/token")
        self.fcm.account = account
        return account

    async def reset(self) -> None:
        """Back to a just-started sandbox, keeping credentials and the service account."""
        self.rules.clear()
        self.latency.reset()
        await self.background.cancel_all()
        self.sms.reset()
        self.fcm.reset()
        self.wechat.reset()

    def stop(self) -> None:
        """Let held answers go now: the server is shutting down."""
        self.pauses.release()

    async def aclose(self) -> None:
        await self.background.cancel_all()
        if self._client is not None:
            await self._client.aclose()

    def fast_routes(self) -> list[FastRoute]:
        """The sends, served without FastAPI (`FastRoutes`)."""
        return [*self.sms.fast_routes(), *self.fcm.fast_routes()]

    def routes(self, app: FastAPI) -> None:
        self.sms.routes(app)
        self.fcm.routes(app)
        self.wechat.routes(app)
        self.email_events.routes(app)

        @app.get("/control/failures")
        async def list_failures() -> dict[str, list[dict[str, Any]]]:
            return {"rules": [rule.as_json() for rule in self.rules.list()]}

        @app.post("/control/failures")
        async def add_failure(rule: FailureRuleIn) -> dict[str, Any]:
            return self.rules.add(rule).as_json()

        @app.delete("/control/failures")
        async def clear_failures() -> dict[str, int]:
            return {"cleared": self.rules.clear()}

        @app.delete("/control/failures/{rule_id}")
        async def remove_failure(rule_id: int) -> Response:
            if not self.rules.remove(rule_id):
                return JSONResponse({"detail": f"no failure rule {rule_id}"}, status_code=404)
            return JSONResponse({"removed": rule_id})

        @app.get("/control/latency")
        async def get_latency() -> dict[str, float]:
            return {"seconds": self.latency.seconds}

        @app.post("/control/latency")
        async def set_latency(body: LatencyIn) -> dict[str, float]:
            self.latency.seconds = body.seconds
            return {"seconds": self.latency.seconds}

        @app.get("/control/sms/callbacks")
        async def get_callback_delay() -> dict[str, float]:
            return {"delay_seconds": self.sms.callback_delay}

        @app.post("/control/sms/callbacks")
        async def set_callback_delay(body: CallbackDelayIn) -> dict[str, float]:
            """Hold the status callbacks of the SMS accepted from now on: thousands of texts
            a test sends at once would otherwise post thousands of callbacks to ingest, and
            the sandbox's own answers would wait behind them."""
            self.sms.callback_delay = body.delay_seconds
            return {"delay_seconds": self.sms.callback_delay}

        @app.post("/control/fcm/revoke")
        async def revoke_fcm() -> dict[str, int]:
            return {"revoked": self.fcm.revoke()}

        @app.get("/control/wechat")
        async def wechat_status() -> dict[str, Any]:
            return self.wechat.status()


def parse_templates(value: str) -> frozenset[str]:
    return frozenset(item.strip() for item in value.split(",") if item.strip())


__all__ = [
    "DEFAULT_EMAIL_EVENTS_API_KEY",
    "DEFAULT_WECHAT_TEMPLATES",
    "EmailEvents",
    "FailureRules",
    "MessageHeaders",
    "ProviderConfig",
    "Providers",
    "is_smtp_code",
    "parse_templates",
    "twilio_signature",
]
