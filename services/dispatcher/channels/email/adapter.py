"""Email over SMTP (aiosmtplib): MIME text + HTML, deterministic Message-ID, one-click
unsubscribe headers (RFC 8058), replies classified into outcome classes, and a pool of
sessions reused across messages (a connection, TLS and AUTH per message cost more than the send).
A message can be staged (`SmtpSender.stage`): written all but the "." that ends its DATA, which
the dispatcher sends once the try is durable as `sending`. On a session whose server offers
PIPELINING (RFC 2920), MAIL, RCPT and DATA go out in one write and their replies are read
together (`_Replies`): one round trip where there were three.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import format_datetime, formataddr, parseaddr
from typing import Literal

import aiosmtplib
import structlog
from aiosmtplib import SMTPResponse, SMTPStatus
from aiosmtplib.email import quote_address

from services.dispatcher.channels.common import MonotonicClock
from services.dispatcher.channels.email.domain import EmailContent, reply_outcome, sender_refused
from services.dispatcher.channels.email.mime import data_block, email_bytes, header_value
from services.dispatcher.channels.email.reconcile import message_id_header
from services.dispatcher.domain.messages import Delivery
from services.dispatcher.domain.outcomes import Outcome
from services.dispatcher.settings import DispatcherSettings
from shared.contracts import Channel

log = structlog.get_logger(__name__)

# How long a QUIT may take when the pool closes its sessions.
_QUIT_SECONDS = 2.0

# An address that aiosmtplib's `quote_address` gives back as it is, in angle brackets: ASCII
# atoms joined by single dots, "@", and labels joined by single dots. The library parses every
# address with `email.utils.parseaddr` (about 10 µs each, twice per message).
_PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9_%+-]+(?:\.[A-Za-z0-9_%+-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
)


def envelope_address(address: str) -> bytes:
    """`address` as MAIL and RCPT carry it, the bytes aiosmtplib's `mail` and `rcpt` send."""
    if _PLAIN_ADDRESS.fullmatch(address):
        return b"<" + address.encode("ascii") + b">"
    return quote_address(address).encode("ascii")


# The most a pipelined group's replies may leave unparsed before the server counts as broken
# (aiosmtplib allows 32 KiB for one reply).
_MAX_REPLIES_BYTES = 64 * 1024


def parse_replies(buffer: bytearray) -> list[SMTPResponse]:
    """The complete replies at the start of `buffer`, taken out of it (a reply's lines joined
    by "\\n", as aiosmtplib joins them); an incomplete last reply stays. Raises
    SMTPResponseException for a line that is not a reply."""
    replies: list[SMTPResponse] = []
    lines: list[bytes] = []
    start = 0
    while (end := buffer.find(b"\n", start)) != -1:
        line = bytes(buffer[start : end + 1])
        start = end + 1
        code = line[:3]
        if not code.isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
            text = line.decode("utf-8", "replace").rstrip()
            raise aiosmtplib.SMTPResponseException(
                SMTPStatus.invalid_response, f"Malformed SMTP response line: {text}"
            )
        lines.append(line[4:].strip(b" \t\r\n"))
        if line[3:4] != b"-":
            message = b"\n".join(lines).decode("utf-8", "surrogateescape")
            replies.append(SMTPResponse(int(code), message))
            lines = []
            del buffer[:start]
            start = 0
    return replies


class _Replies(asyncio.Protocol):
    """Stands in for a session's aiosmtplib protocol while the replies to a pipelined group of
    commands come in, in one segment or several: that protocol takes one reply per command it
    awaits and drops what arrives meanwhile. `done` holds the `expected` replies, or the
    reason they cannot come. The connection's end and the transport's flow control still
    reach the session's own protocol."""

    def __init__(self, session_protocol: asyncio.BaseProtocol, expected: int) -> None:
        self._inner = session_protocol
        self._expected = expected
        self._buffer = bytearray()
        self._replies: list[SMTPResponse] = []
        self.done: asyncio.Future[list[SMTPResponse]] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        self._buffer += data
        try:
            self._replies += parse_replies(self._buffer)
            if len(self._buffer) > _MAX_REPLIES_BYTES:
                raise aiosmtplib.SMTPResponseException(
                    SMTPStatus.invalid_response, "Response too long"
                )
        except aiosmtplib.SMTPResponseException as exc:
            self._fail(exc)
            return
        if len(self._replies) > self._expected or (
            len(self._replies) == self._expected and self._buffer
        ):
            self._fail(aiosmtplib.SMTPServerDisconnected("more replies than commands"))
        elif len(self._replies) == self._expected:
            self.done.set_result(self._replies)

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._fail(lost)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
            self.done.exception()  # retrieved: nobody may await it after a timeout


async def pipelined(
    session: aiosmtplib.SMTP, commands: list[bytes], timeout: float | None
) -> list[SMTPResponse]:
    """Write `commands` (each a line without its CRLF) at once and read their replies, in
    order (RFC 2920), within `timeout`; raises SMTPServerDisconnected, SMTPTimeoutError or
    SMTPResponseException as aiosmtplib's commands do."""
    protocol = session.protocol
    transport = protocol.transport if protocol is not None else None
    if protocol is None or transport is None or transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    replies = _Replies(protocol, len(commands))
    transport.set_protocol(replies)
    try:
        protocol.write(b"".join(command + b"\r\n" for command in commands))
        return await asyncio.wait_for(replies.done, timeout)
    except TimeoutError as exc:
        session.close()  # replies may still come: the session cannot be read in step again
        raise aiosmtplib.SMTPTimeoutError("Timed out waiting for server response") from exc
    finally:
        if not transport.is_closing():
            transport.set_protocol(protocol)


# After a transaction, what the session is good for: another message as it is ("clean", the
# server resets itself after a completed DATA), another message after RSET ("dirty", a refused
# MAIL, RCPT or DATA), or nothing ("broken").
SessionState = Literal["clean", "dirty", "broken"]


@dataclass(frozen=True)
class OutgoingEmail:
    """A message ready for DATA: its bytes, its Message-ID header, and the boundary between its
    text and HTML (None for text alone)."""

    raw: bytes
    message_id: str
    boundary: str | None


@dataclass(frozen=True)
class _Transaction:
    outcome: Outcome
    session: SessionState
    # Lost before the message's end on a session that had served before: the server had closed
    # it (idle clients are dropped), so the message never arrived and a fresh session may try.
    stale: bool = False


class SmtpSessions:
    """Up to `size` open SMTP sessions, reused across messages.

    A send holds one session for its transaction only. Idle sessions wait most recent last and
    are closed once idle longer than `idle_seconds` (servers drop idle clients, and a session
    they dropped costs a failed command before it is replaced). Sessions open on demand, so a
    quiet worker holds few.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[aiosmtplib.SMTP]],
        size: int,
        idle_seconds: float,
        monotonic: Callable[[], float],
    ) -> None:
        self._connect = connect
        self._slots = asyncio.Semaphore(size)
        self._idle_seconds = idle_seconds
        self._monotonic = monotonic
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []  # (session, idle since)
        self._closed = False
        self.opened = 0  # sessions opened so far (a figure for tests and logs)

    async def acquire(self) -> None:
        """One send's right to a session (`release` gives it back); bounds the sessions open at
        once to `size`."""
        await self._slots.acquire()

    def release(self) -> None:
        self._slots.release()

    def take_idle(self) -> aiosmtplib.SMTP | None:
        """The most recently used idle session still open and fresh enough, if any."""
        now = self._monotonic()
        while self._idle:
            session, since = self._idle.pop()
            if session.is_connected and now - since <= self._idle_seconds:
                return session
            session.close()
        return None

    async def open(self) -> aiosmtplib.SMTP:
        """A new session: connected, with STARTTLS/TLS and AUTH as configured (may raise)."""
        session = await self._connect()
        self.opened += 1
        return session

    def put_back(self, session: aiosmtplib.SMTP) -> None:
        if self._closed or not session.is_connected:
            session.close()
            return
        now = self._monotonic()
        self._idle.append((session, now))
        # Sessions that waited too long behind newer ones go now (the oldest sit first).
        while self._idle and now - self._idle[0][1] > self._idle_seconds:
            expired, _ = self._idle.pop(0)
            expired.close()

    async def aclose(self) -> None:
        """QUIT every idle session; sessions still in use close when they are handed back."""
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_quit(session) for session, _ in idle))


async def _quit(session: aiosmtplib.SMTP) -> None:
    with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
        if session.is_connected:
            await session.quit(timeout=_QUIT_SECONDS)
    session.close()


class StagedEmail:
    """A message the server holds all but its end (`SmtpSender.stage`): its session and its
    session slot are held until `finish` sends the final "." (written already if `start` was
    called) and reads the answer, or `abandon` drops the connection."""

    def __init__(self, sender: SmtpSender, session: aiosmtplib.SMTP, message_id: str) -> None:
        self._sender = sender
        self._session = session
        self._message_id = message_id
        self._ended = False
        self._started = False
        # Why the "." could not be written (the connection was lost meanwhile), once started.
        self._lost: _Transaction | None = None

    def start(self) -> None:
        """Write the final "." now, in this turn of the event loop (`finish` reads the
        answer)."""
        if not self._started and not self._ended:
            self._started = True
            self._lost = self._sender.write_end(self._session)

    async def finish(self) -> Outcome:
        self.start()
        self._ended = True
        return await self._sender.finish_staged(self._session, self._message_id, self._lost)

    def abandon(self) -> None:
        if not self._ended:  # once `finish` began, it hands the session back itself
            self._ended = True
            self._sender.abandon_staged(self._session)


def _boundary() -> str:
    """A multipart boundary (RFC 2046: at most 70 characters), random per message. It needs
    to be unlikely in the message, not unguessable (the standard library's generator draws its
    boundaries the same way): `secrets` asked the kernel each time, which a profile showed at
    about 20 µs a message on a busy worker."""
    return f"=_waypost_{random.getrandbits(128):032x}"


class SmtpSender:
    """One SMTP transaction per message, on a session from the pool."""

    channel: Channel = "email"

    def __init__(self, settings: DispatcherSettings, clock: MonotonicClock) -> None:
        self._settings = settings
        self._clock = clock
        name, self._sender = parseaddr(settings.email_from)
        self._envelope_sender = envelope_address(self._sender)
        self._pipelining = settings.smtp_pipelining
        # Encoded once: a display name outside ASCII becomes an RFC 2047 encoded word.
        self._from = formataddr((name, self._sender), charset="utf-8")
        size = settings.smtp_connections or settings.in_flight("email")
        self.sessions = SmtpSessions(
            self._connect, size, settings.smtp_idle_seconds, clock.monotonic
        )

    def message(self, delivery: Delivery) -> OutgoingEmail:
        """The MIME message: text (and HTML as its alternative), in UTF-8, as the bytes sent in
        DATA (`mime.email_bytes`). Raises ValueError for what cannot be written as a header (a
        line break, an address outside ASCII)."""
        content = delivery.content
        assert isinstance(content, EmailContent)
        address = delivery.address
        if not address.isascii():
            raise ValueError("an address outside ASCII needs SMTPUTF8, which is not used")
        message_id = message_id_header(delivery.message_id, self._settings.message_id_domain)
        headers = [
            ("From", self._from),
            ("To", header_value("To", address)),
            ("Subject", header_value("Subject", content.subject)),
            ("Date", format_datetime(self._clock.now())),
            ("Message-ID", message_id),
            ("X-Waypost-Message-Id", header_value("X-Waypost-Message-Id", delivery.message_id)),
        ]
        if content.unsubscribe_url:
            unsubscribe = header_value("List-Unsubscribe", f"<{content.unsubscribe_url}>")
            headers += [
                ("List-Unsubscribe", unsubscribe),
                ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
            ]
        boundary = _boundary() if content.html else None
        raw = email_bytes(headers, content.text, content.html, boundary or "")
        return OutgoingEmail(raw, message_id, boundary)

    async def send(self, delivery: Delivery) -> Outcome:
        staged = await self.stage(delivery)
        if isinstance(staged, Outcome):
            return staged
        return await staged.finish()

    async def stage(self, delivery: Delivery) -> StagedEmail | Outcome:
        """The message's transaction up to its end: MAIL, RCPT, DATA and the message written,
        the final "." not (`StagedEmail`). The server may deliver nothing before that line
        (RFC 5321 4.1.1.4), so an Outcome here (a refusal, no server) means nothing was sent."""
        outgoing = self.message(delivery)
        data = data_block(outgoing.raw)
        sessions = self.sessions
        await sessions.acquire()
        try:
            staged = await self._stage_on_a_session(delivery, data)
        except BaseException:
            sessions.release()
            raise
        if isinstance(staged, Outcome):
            sessions.release()
            return staged
        return StagedEmail(self, staged, outgoing.message_id)

    async def _stage_on_a_session(
        self, delivery: Delivery, data: bytes
    ) -> aiosmtplib.SMTP | Outcome:
        session = self.sessions.take_idle()
        reused = session is not None
        if session is None:
            opened = await self._open()
            if isinstance(opened, Outcome):
                return opened
            session = opened
        try:
            refused = await self._open_data(session, delivery.address, data, reused)
            if refused is not None and refused.stale:
                # The server had dropped the idle session: one more try on a new one.
                log.debug("smtp.stale_session", message_id=delivery.message_id)
                session.close()
                opened = await self._open()
                if isinstance(opened, Outcome):
                    return opened
                session = opened
                refused = await self._open_data(session, delivery.address, data, reused=False)
        except BaseException:
            session.close()  # an address the library cannot encode, a cancellation
            raise
        if refused is not None:
            await self._hand_back(session, refused.session)
            return refused.outcome
        return session

    async def finish_staged(
        self, session: aiosmtplib.SMTP, message_id: str, lost: _Transaction | None
    ) -> Outcome:
        """What the server answered to the final "." of a staged message (written by
        `write_end`, or `lost` before it could be); the session goes back to the pool (or is
        closed) and its slot is released."""
        try:
            try:
                done = lost if lost is not None else await self._end_answer(session)
            except BaseException:
                session.close()  # a cancellation: the message may have arrived
                raise
            await self._hand_back(session, done.session)
        finally:
            self.sessions.release()
        if done.outcome.kind == "sent":
            return Outcome("sent", provider_id=message_id)
        return done.outcome

    def abandon_staged(self, session: aiosmtplib.SMTP) -> None:
        """Drop a staged message: closing the connection before the final "." ends the
        transaction unsent (there is no other way out of DATA)."""
        session.close()
        self.sessions.release()

    async def aclose(self) -> None:
        await self.sessions.aclose()

    async def _connect(self) -> aiosmtplib.SMTP:
        settings = self._settings
        password = settings.smtp_password.get_secret_value() if settings.smtp_password else None
        session = aiosmtplib.SMTP(
            hostname=settings.smtp_host,
            port=settings.smtp_port,
            username=settings.smtp_username,
            password=password,
            start_tls=settings.smtp_starttls,
            use_tls=settings.smtp_use_tls,
            timeout=settings.smtp_timeout_seconds,
        )
        try:
            await session.connect()
        except BaseException:
            session.close()
            raise
        return session

    async def _open(self) -> aiosmtplib.SMTP | Outcome:
        """A new session, or the outcome of failing to get one (nothing was sent)."""
        try:
            return await self.sessions.open()
        except aiosmtplib.SMTPAuthenticationError as exc:
            return Outcome("config", f"smtp authentication: {exc.message}", code=str(exc.code))
        except (aiosmtplib.SMTPException, OSError) as exc:
            return Outcome("retry", f"smtp connect: {exc}")

    async def _open_data(
        self, session: aiosmtplib.SMTP, to: str, data: bytes, reused: bool
    ) -> _Transaction | None:
        """MAIL, RCPT and DATA, then the message without its final "." line: None when the
        server waits for that line, or why it will not take the message (nothing was sent)."""
        try:
            if (
                self._pipelining
                and not session.is_ehlo_or_helo_needed
                and session.supports_extension("pipelining")
            ):
                await self._pipelined_envelope(session, to)
            else:
                await self._envelope(session, to)
                started = await session.execute_command(b"DATA")
                if started.code != SMTPStatus.start_input:
                    raise aiosmtplib.SMTPDataError(started.code, started.message)
            protocol = session.protocol
            if protocol is None:
                raise aiosmtplib.SMTPServerDisconnected("connection lost before the message")
            protocol.write(data)
        except aiosmtplib.SMTPResponseException as exc:  # refusals of MAIL, RCPT and DATA
            if exc.code == 421:  # "closing the channel": the session is over either way
                return _Transaction(reply_outcome(exc.code, exc.message), "broken", reused)
            if isinstance(exc, aiosmtplib.SMTPSenderRefused):
                # The server refuses our envelope sender: our configuration, not the recipient.
                return _Transaction(sender_refused(exc.code, exc.message), "dirty")
            return _Transaction(reply_outcome(exc.code, exc.message), "dirty")
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            # Without the final line the message never arrived: safe to try on a fresh session.
            return _Transaction(Outcome("retry", f"smtp connection lost: {exc}"), "broken", reused)
        except aiosmtplib.SMTPException as exc:
            return _Transaction(Outcome("retry", f"smtp: {exc}"), "broken")
        return None

    async def _envelope(self, session: aiosmtplib.SMTP, to: str) -> None:
        """MAIL and RCPT, raising as aiosmtplib's `mail` and `rcpt` do. A session that has
        said EHLO sends them as those would, with the addresses quoted here
        (`envelope_address`); a new one goes through the library, which says EHLO first."""
        if session.is_ehlo_or_helo_needed:
            await session.mail(self._sender)
            await session.rcpt(to)
            return
        answer = await session.execute_command(b"MAIL", b"FROM:" + self._envelope_sender)
        if answer.code != SMTPStatus.completed:
            raise aiosmtplib.SMTPSenderRefused(answer.code, answer.message, self._sender)
        answer = await session.execute_command(b"RCPT", b"TO:" + envelope_address(to))
        if answer.code not in (SMTPStatus.completed, SMTPStatus.will_forward):
            raise aiosmtplib.SMTPRecipientRefused(answer.code, answer.message, to)

    async def _pipelined_envelope(self, session: aiosmtplib.SMTP, to: str) -> None:
        """MAIL, RCPT and DATA in one write, on a session past EHLO whose server offers
        PIPELINING, raising as `_envelope` and a refused DATA do. A server that starts DATA
        though it refused the envelope waits for a message: the session is closed, as nothing
        may be written on it."""
        mail, rcpt, data = await pipelined(
            session,
            [
                b"MAIL FROM:" + self._envelope_sender,
                b"RCPT TO:" + envelope_address(to),
                b"DATA",
            ],
            session.timeout,
        )
        refused: aiosmtplib.SMTPResponseException | None = None
        if mail.code != SMTPStatus.completed:
            refused = aiosmtplib.SMTPSenderRefused(mail.code, mail.message, self._sender)
        elif rcpt.code not in (SMTPStatus.completed, SMTPStatus.will_forward):
            refused = aiosmtplib.SMTPRecipientRefused(rcpt.code, rcpt.message, to)
        elif data.code != SMTPStatus.start_input:
            refused = aiosmtplib.SMTPDataError(data.code, data.message)
        if refused is None:
            return
        if data.code == SMTPStatus.start_input:
            session.close()
        raise refused

    def write_end(self, session: aiosmtplib.SMTP) -> _Transaction | None:
        """Write the "." that ends a staged message's DATA, at once (no wait: the caller
        decides the moment); None once written, else why it could not be."""
        protocol = session.protocol
        if not session.is_connected or protocol is None:
            # Lost while the message waited: the line never went out, so it never arrived.
            lost = Outcome("retry", "smtp connection lost before the end of the message")
            return _Transaction(lost, "broken")
        # A reply is expected before the line goes out, as aiosmtplib's `execute_command` marks
        # it: its protocol drops a reply that arrives while none is (and the reply to the "."
        # may well arrive before `_end_answer` awaits it). The session is this try's alone, so
        # no other command can be under way. `test_smtp_sessions` holds this to the library.
        protocol._response_pending = True
        try:
            protocol.write(b".\r\n")
        except aiosmtplib.SMTPServerDisconnected as exc:  # closing: nothing was written
            lost = Outcome("retry", f"smtp connection lost before the end of the message: {exc}")
            return _Transaction(lost, "broken")
        return None

    async def _end_answer(self, session: aiosmtplib.SMTP) -> _Transaction:
        """What the server answered to the "." `write_end` wrote (read as aiosmtplib's
        `execute_command` reads a reply, within the session's timeout)."""
        try:
            protocol = session.protocol
            if protocol is None:
                raise aiosmtplib.SMTPServerDisconnected("connection lost after the message")
            answer = await protocol.read_response(timeout=session.timeout)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            # The line may have reached the server, and with it the message.
            return _Transaction(Outcome("unknown", f"smtp connection lost: {exc}"), "broken")
        except aiosmtplib.SMTPException as exc:
            return _Transaction(Outcome("unknown", f"smtp: {exc}"), "broken")
        if answer.code == SMTPStatus.completed:
            return _Transaction(Outcome("sent"), "clean")
        # A reply other than 250 means the server did not take the message.
        state: SessionState = "broken" if answer.code == 421 else "dirty"
        return _Transaction(reply_outcome(answer.code, answer.message), state)

    async def _hand_back(self, session: aiosmtplib.SMTP, state: SessionState) -> None:
        if state == "dirty":
            # A refused transaction may leave the envelope half open: RSET before reuse.
            try:
                await session.rset()
            except (aiosmtplib.SMTPException, OSError):
                state = "broken"
        if state == "broken":
            session.close()
            return
        self.sessions.put_back(session)
