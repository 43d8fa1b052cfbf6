# Local delivery sandbox: a catch-all SMTP server plus an HTTP "outbox" API, in one process,
# so dev runs and tests can send real mail and then inspect what was delivered. The same HTTP
# port also speaks the SMS (Twilio style), FCM HTTP v1 and WeChat Official Account APIs
# (sandbox_providers.py), storing what they accept in the same outbox, with failures injected
# per recipient through /control/failures, and a Mailgun-style events API
# (GET /v3/{domain}/events) listing the `accepted` event of each stored email's recipients.
# Run: python deploy/local/sandbox.py --host 127.0.0.1 --smtp-port 1025 --http-port 8025
from __future__ import annotations

import argparse
import asyncio
import contextlib
import email
import email.policy
import itertools
import json
import logging
import os
import signal
import socket
import sys
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import uvicorn
import uvloop
from aiosmtpd.smtp import SMTP, Envelope, Session
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sandbox_providers import (
    DEFAULT_EMAIL_EVENTS_API_KEY,
    DEFAULT_SMS_ACCOUNT_SID,
    DEFAULT_SMS_AUTH_TOKEN,
    DEFAULT_WECHAT_APP_ID,
    DEFAULT_WECHAT_APP_SECRET,
    DEFAULT_WECHAT_TEMPLATES,
    EmailEvents,
    FailureRules,
    FastRoutes,
    MessageHeaders,
    ProviderConfig,
    Providers,
    is_smtp_code,
    message_id_key,
    parse_templates,
)

log = logging.getLogger("waypost.sandbox")

# One outbox entry, as served by GET /messages. Every channel shares the envelope keys
# id, channel, to, from, received_at; the rest is channel specific (email: subject, headers,
# text, html).
Record = dict[str, Any]

SMTP_HOST = "waypost-sandbox"  # fixed, so aiosmtpd skips a getfqdn() DNS lookup
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True)
class OutboxFilter:
    """Criteria for Outbox.list; None means "any"."""

    channel: str | None = None
    to: str | None = None
    subject_contains: str | None = None
    # A recipient starting with this (case-insensitive): one test's messages among thousands.
    to_prefix: str | None = None

    def matches(self, record: Record) -> bool:
        if self.channel is not None and record.get("channel") != self.channel:
            return False
        if self.to is not None:
            wanted = self.to.casefold()
            if not any(str(addr).casefold() == wanted for addr in record.get("to", [])):
                return False
        if self.to_prefix is not None:
            start = self.to_prefix.casefold()
            if not any(str(addr).casefold().startswith(start) for addr in record.get("to", [])):
                return False
        if self.subject_contains is not None:
            subject = record.get("subject")
            if not isinstance(subject, str):
                return False
            if self.subject_contains.casefold() not in subject.casefold():
                return False
        return True


class Outbox:
    """In-memory, arrival-ordered store of delivered messages for every channel.

    An email is kept as it arrived and parsed the first time it is listed: parsing a message
    with the standard library's modern email API costs about 3.5 ms of CPU, which is the most a
    session's DATA costs here. On the SMTP path it held up every other session of the sandbox's
    one event loop and, in benchmarks, capped email at what the sandbox could parse. Only its
    header block is read on arrival (`header_fields`), for the subject and for the `accepted`
    events the email events API lists (one per recipient, indexed by Message-ID)."""

    def __init__(self) -> None:
        self._records: list[Record] = []
        self._ids = itertools.count(1)
        # id -> the raw message of an email not yet parsed
        self._unparsed: dict[str, bytes] = {}
        self.email_events = EmailEvents()

    def add(self, record: Record) -> Record:
        """Store a record (needs `channel` and a list `to`); assigns `id` and `received_at`."""
        channel = record.get("channel")
        to = record.get("to")
        if not isinstance(channel, str) or not channel:
            raise ValueError("record needs a non-empty string 'channel'")
        if not isinstance(to, list) or not all(isinstance(addr, str) for addr in to):
            raise ValueError("record needs 'to' as a list of strings")
        stored: Record = {"id": str(next(self._ids)), **record}
        stored.setdefault("received_at", utc_now())
        self._records.append(stored)
        return stored

    def add_email(self, raw: bytes, mail_from: str, rcpt_tos: Sequence[str]) -> Record:
        """Store one SMTP transaction's message, to be parsed when it is first listed, and an
        `accepted` event for each recipient. Its header block is read at once (not the whole
        message): the subject, so a listing by subject parses only the messages it returns,
        and what the events show (Message-ID, From, To, Subject)."""
        headers = header_fields(raw)
        arrived = time.time()
        stored = self.add(
            {
                "channel": "email",
                "to": list(rcpt_tos),
                "from": mail_from,
                "subject": headers.subject,
                "received_at": datetime.fromtimestamp(arrived, UTC).isoformat(),
            }
        )
        self._unparsed[stored["id"]] = raw
        self.email_events.record(
            timestamp=arrived, sender=mail_from, recipients=rcpt_tos, headers=headers, size=len(raw)
        )
        return stored

    def list(self, filters: OutboxFilter | None = None, *, parse: bool = True) -> list[Record]:
        """The matching records, each email parsed the first time it is listed; with `parse`
        False, an email not parsed yet is listed as it arrived (id, channel, to, from, received_at
        and the subject of its header block): a poller that needs only who and when does not
        hold the SMTP server's event loop for 3.5 ms a message."""
        active = filters or OutboxFilter()
        found: list[Record] = []
        for index, record in enumerate(self._records):
            if not active.matches(record):
                continue
            if parse and record["id"] in self._unparsed:
                record = self._records[index] = self._parsed(record)
                if not active.matches(record):  # the full parse's subject has the last word
                    continue
            found.append(dict(record))
        return found

    def _parsed(self, record: Record) -> Record:
        return email_record(record, self._unparsed.pop(record["id"]))

    def clear(self) -> int:
        count = len(self._records)
        self._records.clear()
        self._unparsed.clear()
        self.email_events.clear()
        return count


class RefuseRule(BaseModel):
    address: str = Field(min_length=1)
    code: int = Field(default=550, ge=400, le=599)
    message: str = Field(default="no such user", pattern=r"^[^\r\n]*$")


class RecipientRefusals:
    """RCPT TO addresses the SMTP server must reject, matched case-insensitively."""

    def __init__(self) -> None:
        self._rules: dict[str, RefuseRule] = {}

    @staticmethod
    def _key(address: str) -> str:
        return address.strip().strip("<>").casefold()

    def add(self, rule: RefuseRule) -> None:
        self._rules[self._key(rule.address)] = rule

    def match(self, address: str) -> RefuseRule | None:
        return self._rules.get(self._key(address))

    def rules(self) -> list[RefuseRule]:
        return list(self._rules.values())

    def remove(self, address: str) -> bool:
        return self._rules.pop(self._key(address), None) is not None

    def clear(self) -> int:
        count = len(self._rules)
        self._rules.clear()
        return count


def utc_now() -> str:
    return datetime.now(UTC).isoformat()


def _body(message: EmailMessage, subtype: str) -> str | None:
    part = message.get_body(preferencelist=(subtype,))
    if part is None:
        return None
    try:
        content = part.get_content()
    except (LookupError, ValueError):  # unknown charset or broken transfer encoding
        raw = part.get_payload(decode=True)
        content = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else None
    if not isinstance(content, str):
        return None
    return content.replace("\r\n", "\n")  # SMTP DATA is CRLF; hand back plain newlines


def header_fields(raw: bytes) -> MessageHeaders:
    """The Subject, Message-ID, From and To of a raw message, from one parse of its header block
    alone: unfolded, decoded (RFC 2047), the Message-ID without its angle brackets. About
    0.06 ms for a 2.2 KB message of the dispatcher's shape (reading the subject alone took
    0.056), where parsing the whole message (`email_record`) takes about 3.5."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    headers = BytesHeaderParser(policy=email.policy.compat32).parsebytes(
        raw if end < 0 else raw[:end]
    )
    message_id = message_id_key(_unfolded(headers.get("Message-ID")) or "")
    return MessageHeaders(
        subject=_decoded(headers.get("Subject")),
        message_id=message_id or None,
        from_=_decoded(headers.get("From")),
        to=_decoded(headers.get("To")),
    )


def _unfolded(value: object) -> str | None:
    return None if value is None else str(value).replace("\r\n", "").replace("\n", "")


def _decoded(value: object) -> str | None:
    unfolded = _unfolded(value)
    if unfolded is None or "=?" not in unfolded:  # no encoded word: nothing to decode
        return unfolded
    try:
        return str(make_header(decode_header(unfolded)))
    except (LookupError, UnicodeDecodeError, HeaderParseError):  # an unknown charset, say
        return unfolded


def email_record(envelope: Record, raw: bytes) -> Record:
    """An outbox record as `add_email` stored it (id, envelope, arrival time), completed from
    its raw message: the subject, the headers, and the text and HTML bodies."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)  # guaranteed by policy=default
    subject = message["Subject"]
    return {
        **envelope,
        "subject": None if subject is None else str(subject),
        "headers": {name: str(value) for name, value in message.items()},
        "text": _body(message, "plain"),
        "html": _body(message, "html"),
    }


# Reply texts for refusals injected through /control/failures (channel "email").
SMTP_REPLIES = {
    421: "4.7.0 Service not available, try again later",
    450: "4.2.1 Mailbox unavailable, try again later",
    451: "4.3.0 Local error in processing, try again later",
    452: "4.2.2 Insufficient storage, try again later",
    550: "5.1.1 Mailbox unavailable: no such user",
    551: "5.1.6 User not local",
    552: "5.2.2 Mailbox full",
    553: "5.1.3 Mailbox name not allowed",
    554: "5.7.1 Transaction failed: rejected by policy",
}


def smtp_reply(code: int) -> str:
    default = "4.0.0 Temporary failure" if code < 500 else "5.0.0 Permanent failure"
    return f"{code} {SMTP_REPLIES.get(code, default)}"


class OutboxSmtpHandler:
    """aiosmtpd handler: accepts every message (bar refused recipients) into the outbox."""

    def __init__(
        self, outbox: Outbox, refusals: RecipientRefusals, failures: FailureRules | None = None
    ) -> None:
        self._outbox = outbox
        self._refusals = refusals
        self._failures = failures or FailureRules()

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """Offer PIPELINING (RFC 2920), as the providers do: aiosmtpd reads commands a line at
        a time, so a group of them written at once is answered in order."""
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        rule = self._refusals.match(address)
        if rule is not None:
            log.info("refusing RCPT TO %s with %d", address, rule.code)
            return f"{rule.code} {rule.message}"
        # Failure rules answer refusal codes at RCPT; their timeouts wait for DATA.
        failure = self._failures.take("email", address, when=is_smtp_code)
        if failure is not None:
            await self._failures.hold(failure.hold)
            log.info("refusing RCPT TO %s with %s (failure rule)", address, failure.error)
            return smtp_reply(int(failure.error))
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, sess: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        sender = envelope.mail_from or ""
        sender = "" if sender == "<>" else sender  # null reverse-path (bounces)
        record = self._outbox.add_email(raw, sender, envelope.rcpt_tos)
        log.debug("stored email id=%s to=%s", record["id"], ",".join(record["to"]))
        # "timeout" / "slow" rules: the message is stored (it arrived), the answer is late.
        holds = [
            rule.hold
            for address in envelope.rcpt_tos
            if (rule := self._failures.take("email", address, when=HOLDS.__contains__))
        ]
        if holds:
            await self._failures.hold(max(holds))
        return "250 Message accepted for delivery"


HOLDS = ("timeout", "slow")
EVENT_LOOPS = ("uvloop", "asyncio")


def create_app(
    outbox: Outbox, refusals: RecipientRefusals, providers: Providers | None = None
) -> FastRoutes:
    app = FastAPI(title="Waypost sandbox outbox", docs_url=None, redoc_url=None)
    providers = providers or Providers(ProviderConfig(), outbox)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/messages")
    async def list_messages(
        channel: str | None = None,
        to: str | None = None,
        subject_contains: str | None = None,
        to_prefix: str | None = None,
        summary: bool = False,
    ) -> Response:
        # `summary`: emails as they arrived, none parsed (see `Outbox.list`).
        found = outbox.list(
            OutboxFilter(channel, to, subject_contains, to_prefix), parse=not summary
        )
        # Encoded in one call: late in a test session the outbox holds tens of thousands of
        # messages, and FastAPI's generic encoding of them took longer than a client waits.
        body = json.dumps({"count": len(found), "messages": found}, default=str)
        return Response(body, media_type="application/json")

    @app.delete("/messages")
    async def clear_messages() -> dict[str, int]:
        return {"deleted": outbox.clear()}

    @app.get("/control/smtp/refuse")
    async def list_refusals() -> dict[str, list[RefuseRule]]:
        return {"rules": refusals.rules()}

    @app.post("/control/smtp/refuse")
    async def add_refusal(rule: RefuseRule) -> RefuseRule:
        refusals.add(rule)
        return rule

    @app.delete("/control/smtp/refuse")
    async def clear_refusals() -> dict[str, int]:
        return {"cleared": refusals.clear()}

    @app.delete("/control/smtp/refuse/{address}")
    async def remove_refusal(address: str) -> Response:
        """One address's refusal only: tests running side by side keep their own."""
        if not refusals.remove(address):
            return JSONResponse({"detail": f"no refusal for {address}"}, status_code=404)
        return JSONResponse({"removed": address})

    @app.post("/control/reset")
    async def reset() -> dict[str, int]:
        """Empty outbox, no failure rules or refusals, default latency, no issued tokens."""
        await providers.reset()
        return {"deleted": outbox.clear(), "refusals_cleared": refusals.clear()}

    providers.routes(app)
    return FastRoutes(app, providers.fast_routes())


class HttpServer(uvicorn.Server):
    """uvicorn.Server that leaves signals to us and reports when it is listening."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn would install its own handlers and re-raise the signal after shutdown.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()


async def _serve_http(server: HttpServer) -> None:
    try:
        await server.serve()
    except SystemExit as exc:  # uvicorn calls sys.exit() when it cannot bind
        raise RuntimeError(f"HTTP listener failed to start (exit {exc.code})") from exc


async def run(
    host: str,
    smtp_port: int,
    http_port: int,
    log_level: str,
    provider_config: ProviderConfig | None = None,
) -> int:
    loop = asyncio.get_running_loop()
    outbox = Outbox()
    refusals = RecipientRefusals()
    providers = Providers(provider_config or ProviderConfig(), outbox)
    handler = OutboxSmtpHandler(outbox, refusals, providers.rules)
    connections: weakref.WeakSet[SMTP] = weakref.WeakSet()

    def smtp_protocol() -> SMTP:
        protocol = SMTP(handler, hostname=SMTP_HOST, enable_SMTPUTF8=True, loop=loop)
        connections.add(protocol)
        return protocol

    try:
        smtp_server = await loop.create_server(smtp_protocol, host, smtp_port)
    except OSError as exc:
        log.error("cannot listen for SMTP on %s:%d: %s", host, smtp_port, exc)
        return 1

    config = uvicorn.Config(
        create_app(outbox, refusals, providers),
        host=host,
        port=http_port,
        log_level=log_level,
        access_log=log_level == "debug",
        lifespan="off",
        timeout_graceful_shutdown=5,
    )
    http_server = HttpServer(config)
    http_task = asyncio.create_task(_serve_http(http_server))

    stop = asyncio.Event()

    def on_signal(signum: signal.Signals) -> None:
        if stop.is_set():  # second signal: stop waiting for open HTTP connections
            http_server.force_exit = True
        log.info("received %s, shutting down", signum.name)
        http_server.should_exit = True
        providers.stop()
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    exit_code = 0
    try:
        ready = asyncio.create_task(http_server.ready.wait())
        await asyncio.wait({ready, http_task}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if http_task.done():
            http_task.result()  # raises the startup failure, if any
            raise RuntimeError("HTTP listener stopped before it was ready")
        smtp_bound = smtp_server.sockets[0].getsockname()[1]
        http_bound = http_server.servers[0].sockets[0].getsockname()[1]
        # The service account's token_uri names the bound port, so it is written only now.
        try:
            account = providers.configure_fcm(f"http://{host}:{http_bound}")
        except (OSError, ValueError) as exc:
            raise RuntimeError(str(exc)) from exc
        log.info("FCM project %s, service account %s", account.project_id, account.client_email)
        if not stop.is_set():
            print(
                f"waypost sandbox ready: smtp={host}:{smtp_bound} http=http://{host}:{http_bound}",
                flush=True,
            )
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({stopping, http_task}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
    except RuntimeError as exc:
        log.error("%s", exc)
        exit_code = 1
    finally:
        http_server.should_exit = True
        with contextlib.suppress(RuntimeError):
            await http_task
        await providers.aclose()
        smtp_server.close()
        for protocol in list(connections):
            if protocol.transport is not None:
                protocol.transport.close()
        await smtp_server.wait_closed()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return exit_code


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Waypost local delivery sandbox: catch-all SMTP server + HTTP outbox API, "
        "plus sandbox SMS (Twilio style), FCM HTTP v1 and WeChat Official Account APIs."
    )
    parser.add_argument(
        "--host",
        default=os.environ.get("WAYPOST_SANDBOX_HOST", "127.0.0.1"),
        help="address both listeners bind to (env WAYPOST_SANDBOX_HOST, default 127.0.0.1)",
    )
    parser.add_argument(
        "--smtp-port",
        type=int,
        default=int(os.environ.get("WAYPOST_SMTP_PORT", "1025")),
        help="SMTP port (env WAYPOST_SMTP_PORT, default 1025; 0 picks a free port)",
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=int(os.environ.get("WAYPOST_OUTBOX_PORT", "8025")),
        help="HTTP outbox API port (env WAYPOST_OUTBOX_PORT, default 8025; 0 picks a free port)",
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        type=str.lower,
        help="logging level (default info; debug also logs each stored message, the SMTP dialogue "
        "and HTTP access)",
    )
    parser.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default=os.environ.get("WAYPOST_EVENT_LOOP", "uvloop"),
        help="event loop (env WAYPOST_EVENT_LOOP, default uvloop, as the services run)",
    )
    providers = parser.add_argument_group("provider APIs (SMS, FCM, WeChat, email events)")
    providers.add_argument(
        "--sms-account-sid",
        default=os.environ.get("WAYPOST_SMS_ACCOUNT_SID", DEFAULT_SMS_ACCOUNT_SID),
        help=f"SMS account sid (env WAYPOST_SMS_ACCOUNT_SID, default {DEFAULT_SMS_ACCOUNT_SID})",
    )
    providers.add_argument(
        "--sms-auth-token",
        default=os.environ.get("WAYPOST_SMS_AUTH_TOKEN", DEFAULT_SMS_AUTH_TOKEN),
        help="SMS auth token: Basic auth password and callback signing key "
        "(env WAYPOST_SMS_AUTH_TOKEN)",
    )
    providers.add_argument(
        "--sms-callback-delay",
        type=float,
        default=float(os.environ.get("WAYPOST_SMS_CALLBACK_DELAY", "0.2")),
        help="seconds before status callbacks (env WAYPOST_SMS_CALLBACK_DELAY, default 0.2)",
    )
    providers.add_argument(
        "--fcm-service-account",
        type=Path,
        default=_env_path("WAYPOST_FCM_SERVICE_ACCOUNT_FILE"),
        help="service-account JSON the FCM token endpoint trusts; created when missing "
        "(env WAYPOST_FCM_SERVICE_ACCOUNT_FILE; default: an in-memory key only)",
    )
    providers.add_argument(
        "--fcm-token-ttl",
        type=int,
        default=int(os.environ.get("WAYPOST_FCM_TOKEN_TTL", "3600")),
        help="FCM access token lifetime in seconds (env WAYPOST_FCM_TOKEN_TTL, default 3600)",
    )
    providers.add_argument(
        "--wechat-app-id",
        default=os.environ.get("WAYPOST_WECHAT_APP_ID", DEFAULT_WECHAT_APP_ID),
        help=f"WeChat appid (env WAYPOST_WECHAT_APP_ID, default {DEFAULT_WECHAT_APP_ID})",
    )
    providers.add_argument(
        "--wechat-app-secret",
        default=os.environ.get("WAYPOST_WECHAT_APP_SECRET", DEFAULT_WECHAT_APP_SECRET),
        help="WeChat appsecret (env WAYPOST_WECHAT_APP_SECRET)",
    )
    providers.add_argument(
        "--wechat-token-ttl",
        type=int,
        default=int(os.environ.get("WAYPOST_WECHAT_TOKEN_TTL", "7200")),
        help="WeChat access token lifetime in seconds (env WAYPOST_WECHAT_TOKEN_TTL, default 7200)",
    )
    providers.add_argument(
        "--wechat-token-overlap",
        type=float,
        default=float(os.environ.get("WAYPOST_WECHAT_TOKEN_OVERLAP", "300")),
        help="seconds a WeChat token stays valid after a newer one is issued "
        "(env WAYPOST_WECHAT_TOKEN_OVERLAP, default 300)",
    )
    providers.add_argument(
        "--wechat-templates",
        default=os.environ.get("WAYPOST_WECHAT_TEMPLATES", DEFAULT_WECHAT_TEMPLATES),
        help="registered template ids, comma separated (env WAYPOST_WECHAT_TEMPLATES, "
        f"default {DEFAULT_WECHAT_TEMPLATES})",
    )
    providers.add_argument(
        "--email-events-api-key",
        default=os.environ.get("WAYPOST_EMAIL_EVENTS_API_KEY", DEFAULT_EMAIL_EVENTS_API_KEY),
        help="API key of the Mailgun-style email events API (GET /v3/DOMAIN/events): the Basic "
        "auth password, with user api (env WAYPOST_EMAIL_EVENTS_API_KEY)",
    )
    providers.add_argument(
        "--latency-ms",
        type=float,
        default=float(os.environ.get("WAYPOST_SANDBOX_LATENCY_MS", "0")),
        help="milliseconds added to every provider API answer (env WAYPOST_SANDBOX_LATENCY_MS, "
        "default 0; POST /control/latency changes it at run time)",
    )
    args = parser.parse_args(argv)
    for name in ("sms_callback_delay", "fcm_token_ttl", "wechat_token_ttl"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    if args.wechat_token_overlap < 0 or args.latency_ms < 0:
        parser.error("--wechat-token-overlap and --latency-ms must not be negative")
    if not parse_templates(args.wechat_templates):
        parser.error("--wechat-templates needs at least one template id")
    if not args.email_events_api_key:
        parser.error("--email-events-api-key must not be empty")
    return args


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def provider_config(args: argparse.Namespace) -> ProviderConfig:
    return ProviderConfig(
        sms_account_sid=args.sms_account_sid,
        sms_auth_token=args.sms_auth_token,
        sms_callback_delay=args.sms_callback_delay,
        fcm_service_account_file=args.fcm_service_account,
        fcm_token_ttl=args.fcm_token_ttl,
        wechat_app_id=args.wechat_app_id,
        wechat_app_secret=args.wechat_app_secret,
        wechat_token_ttl=args.wechat_token_ttl,
        wechat_token_overlap=args.wechat_token_overlap,
        wechat_templates=parse_templates(args.wechat_templates),
        email_events_api_key=args.email_events_api_key,
        latency=args.latency_ms / 1000,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    level = getattr(logging, args.log_level.upper())
    if args.event_loop not in EVENT_LOOPS:  # argparse checks `choices` on the command line only
        sys.exit(f"WAYPOST_EVENT_LOOP: {args.event_loop!r} is not one of {', '.join(EVENT_LOOPS)}")
    logging.basicConfig(level=level, format=LOG_FORMAT)
    # aiosmtpd logs every SMTP command at INFO on "mail.log"; keep that for debug only.
    mail_level = level if level == logging.DEBUG else max(level, logging.WARNING)
    logging.getLogger("mail.log").setLevel(mail_level)
    # httpx logs every status callback at INFO; under benchmark load that is noise.
    logging.getLogger("httpx").setLevel(mail_level)
    # One event loop serves every SMTP session and provider call: on uvloop it spends less of
    # its one core per message, so its answers wait less behind each other's under load.
    new_loop = uvloop.new_event_loop if args.event_loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(
            run(args.host, args.smtp_port, args.http_port, args.log_level, provider_config(args))
        )


if __name__ == "__main__":
    sys.exit(main())
