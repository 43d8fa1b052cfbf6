"""The SMTP session pool against a real aiosmtpd server that counts its connections: sessions
are reused, survive a refused recipient (RSET), are replaced when the server dropped them, and a
connection lost after DATA is `unknown`. A staged message (all but the final ".") arrives only
once finished; abandoned, or lost before its end, it never arrives."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.dispatcher.channels.email import adapter as email_adapter
from services.dispatcher.channels.email.adapter import SmtpSender, StagedEmail, pipelined
from services.dispatcher.channels.email.domain import EmailContent
from services.dispatcher.domain.messages import Delivery
from services.dispatcher.domain.outcomes import Outcome
from services.dispatcher.settings import DispatcherSettings
from tests.integration.providers import ShiftedClock, closed_port
from tests.waiting import eventually, wait_for

WAIT_SECONDS = 10.0


@dataclass
class Server:
    """What the server saw; written from the server's thread, read by the test."""

    port: int = 0
    connections: int = 0
    lost: int = 0
    resets: int = 0
    quits: int = 0
    delivered: list[str] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)
    # Drop the connection, unanswered, at the next MAIL of a connection that already delivered.
    drop_reused_at_mail: bool = False
    # Drop the connection, unanswered, once the message's data has arrived.
    drop_after_data: bool = False


class _Handler:
    def __init__(self, server: Server) -> None:
        self.server = server

    async def handle_MAIL(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.server.drop_reused_at_mail and getattr(smtp, "transactions", 0) > 0:
            self.server.drop_reused_at_mail = False
            assert smtp.transport is not None
            smtp.transport.abort()  # as a server that had dropped the idle client looks
            return "421 gone"
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in self.server.refuse:
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        self.server.delivered.extend(envelope.rcpt_tos)
        smtp.transactions = getattr(smtp, "transactions", 0) + 1
        if self.server.drop_after_data:
            self.server.drop_after_data = False
            assert smtp.transport is not None
            smtp.transport.abort()
        return "250 OK"


class _PipeliningHandler(_Handler):
    async def handle_EHLO(
        self, smtp: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]


class _CountingSmtp(SMTP):
    def __init__(self, seen: Server, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen = seen

    def connection_made(self, transport: Any) -> None:
        self.seen.connections += 1
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.seen.lost += 1
        super().connection_lost(error)

    async def smtp_RSET(self, arg: str) -> None:
        self.seen.resets += 1
        await super().smtp_RSET(arg)

    async def smtp_QUIT(self, arg: str) -> None:
        self.seen.quits += 1
        await super().smtp_QUIT(arg)


class _CountingController(Controller):
    def __init__(self, seen: Server, pipelining: bool, **kwargs: Any) -> None:
        self.seen = seen
        super().__init__((_PipeliningHandler if pipelining else _Handler)(seen), **kwargs)

    def factory(self) -> SMTP:
        return _CountingSmtp(self.seen, self.handler, **self.SMTP_kwargs)


def _serve(server: Server, pipelining: bool, **smtp: Any) -> Iterator[Server]:
    controller = _CountingController(
        server,
        pipelining,
        hostname="127.0.0.1",
        port=closed_port(),
        server_hostname="pool-test",
        **smtp,
    )
    controller.start()
    server.port = controller.port
    # start() proves the server up with a connection of its own: wait for it to end, uncount it.
    wait_for(
        lambda: server.lost >= server.connections,
        timeout=WAIT_SECONDS,
        what="the start-up probe's connection to end",
        every=0.01,
    )
    server.connections = server.lost = 0
    try:
        yield server
    finally:
        controller.stop()


# Every test runs against a server that offers PIPELINING (RFC 2920) and one that does not.
@pytest.fixture(params=[False, True], ids=["one-command-at-a-time", "pipelining"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    yield from _serve(Server(), request.param)


@pytest.fixture(params=[False, True], ids=["one-command-at-a-time", "pipelining"])
def idle_dropping_server(request: pytest.FixtureRequest) -> Iterator[Server]:
    """A server that closes a client's connection after 0.3 s without a command."""
    yield from _serve(Server(), request.param, timeout=0.3)


def _sender(port: int, clock: ShiftedClock | None = None, **overrides: Any) -> SmtpSender:
    settings = DispatcherSettings(
        smtp_host="127.0.0.1", smtp_port=port, smtp_timeout_seconds=2.0, **overrides
    )
    return SmtpSender(settings, clock or ShiftedClock())


def _delivery(to: str) -> Delivery:
    content = EmailContent("Hello", "Hi there", None, None)
    return Delivery(f"m-{to}", "c-1", "email", to, content)


async def test_sequential_sends_share_one_connection(server: Server) -> None:
    sender = _sender(server.port)
    for n in range(5):
        assert (await sender.send(_delivery(f"u{n}@example.com"))).kind == "sent"
    assert server.connections == 1
    assert server.delivered == [f"u{n}@example.com" for n in range(5)]
    assert server.resets == 0  # a completed DATA resets the transaction on the server's side
    await sender.aclose()
    await eventually(
        lambda: server.lost == 1, timeout=WAIT_SECONDS, what="the pooled session closed"
    )
    assert server.quits == 1


async def test_concurrent_sends_open_at_most_the_pool_size(server: Server) -> None:
    sender = _sender(server.port, smtp_connections=3)
    addresses = [f"c{n}@example.com" for n in range(30)]
    outcomes = await asyncio.gather(*(sender.send(_delivery(a)) for a in addresses))
    assert {o.kind for o in outcomes} == {"sent"}
    assert sorted(server.delivered) == sorted(addresses)
    assert 1 <= server.connections <= 3
    await sender.aclose()
    await eventually(
        lambda: server.lost == server.connections, timeout=WAIT_SECONDS, what="every session closed"
    )


async def test_a_refused_recipient_resets_the_session_and_keeps_it(server: Server) -> None:
    server.refuse.add("gone@example.com")
    sender = _sender(server.port)
    refused = await sender.send(_delivery("gone@example.com"))
    assert (refused.kind, refused.code, refused.address_invalid) == ("recipient", "550", True)
    assert server.resets == 1
    assert (await sender.send(_delivery("ada@example.com"))).kind == "sent"
    assert server.connections == 1
    assert server.delivered == ["ada@example.com"]
    await sender.aclose()


async def test_a_session_the_server_dropped_is_replaced_before_data_once(server: Server) -> None:
    sender = _sender(server.port)
    assert (await sender.send(_delivery("first@example.com"))).kind == "sent"
    server.drop_reused_at_mail = True  # seen by the client only when it sends MAIL
    outcome = await sender.send(_delivery("second@example.com"))
    assert outcome.kind == "sent"
    assert server.connections == 2
    assert server.delivered == ["first@example.com", "second@example.com"]  # once each
    await sender.aclose()


async def test_an_idle_connection_the_server_closed_is_not_reused(
    idle_dropping_server: Server,
) -> None:
    server = idle_dropping_server
    sender = _sender(server.port)
    assert (await sender.send(_delivery("first@example.com"))).kind == "sent"
    await eventually(
        lambda: server.lost == 1, timeout=WAIT_SECONDS, what="the server dropping the idle client"
    )
    assert (await sender.send(_delivery("second@example.com"))).kind == "sent"
    assert server.connections == 2
    assert server.delivered == ["first@example.com", "second@example.com"]
    await sender.aclose()


async def test_sessions_idle_too_long_are_closed_by_the_pool(server: Server) -> None:
    clock = ShiftedClock()
    sender = _sender(server.port, clock, smtp_idle_seconds=10.0)
    assert (await sender.send(_delivery("first@example.com"))).kind == "sent"
    clock.ahead += 11.0  # longer than the idle limit
    assert (await sender.send(_delivery("second@example.com"))).kind == "sent"
    assert server.connections == 2
    await eventually(
        lambda: server.lost == 1, timeout=WAIT_SECONDS, what="the expired session closed"
    )
    await sender.aclose()


async def test_a_connection_lost_after_data_is_unknown_and_not_resent(server: Server) -> None:
    sender = _sender(server.port)
    assert (await sender.send(_delivery("first@example.com"))).kind == "sent"
    server.drop_after_data = True
    outcome = await sender.send(_delivery("maybe@example.com"))
    assert outcome.kind == "unknown"
    assert server.delivered == ["first@example.com", "maybe@example.com"]  # it did arrive
    # The broken session is gone; the next send opens a new one.
    assert (await sender.send(_delivery("third@example.com"))).kind == "sent"
    assert server.connections == 2
    assert server.delivered.count("maybe@example.com") == 1
    await sender.aclose()


async def test_nobody_listening_is_retryable_and_leaves_no_session() -> None:
    sender = _sender(closed_port())
    outcome = await sender.send(_delivery("ada@example.com"))
    assert outcome.kind == "retry"
    assert sender.sessions.take_idle() is None
    await sender.aclose()


async def test_a_staged_message_arrives_only_once_finished(server: Server) -> None:
    sender = _sender(server.port, smtp_connections=2)
    staged = await sender.stage(_delivery("ada@example.com"))
    assert not isinstance(staged, Outcome)
    # Another message, sent whole on a second session after the first one's data went out.
    assert (await sender.send(_delivery("bob@example.com"))).kind == "sent"
    assert server.delivered == ["bob@example.com"]  # the staged one waits for its end
    assert (await staged.finish()).kind == "sent"
    assert server.delivered == ["bob@example.com", "ada@example.com"]
    staged.abandon()  # after `finish` began: nothing more
    assert (await sender.send(_delivery("cy@example.com"))).kind == "sent"
    assert server.connections == 2  # both sessions went back to the pool
    await sender.aclose()


async def test_a_started_staged_message_is_out_before_its_answer_is_awaited(
    server: Server,
) -> None:
    """`start` writes the "." at once: a worker that dies before the call's task runs has sent
    the message (what its `sending` mark says), and `finish` then only reads the answer."""
    sender = _sender(server.port, smtp_connections=1)
    staged = await sender.stage(_delivery("ada@example.com"))
    assert not isinstance(staged, Outcome)
    staged.start()
    await eventually(
        lambda: server.delivered == ["ada@example.com"],
        timeout=WAIT_SECONDS,
        what="the message delivered before anything awaited its answer",
    )
    staged.start()  # once only: a second "." would be a command of its own
    assert (await staged.finish()).kind == "sent"
    assert (await sender.send(_delivery("bob@example.com"))).kind == "sent"
    assert server.delivered == ["ada@example.com", "bob@example.com"]
    assert server.connections == 1  # the session went back to the pool, in step
    await sender.aclose()


async def test_an_abandoned_staged_message_never_arrives_and_frees_its_slot(
    server: Server,
) -> None:
    sender = _sender(server.port, smtp_connections=1)
    staged = await sender.stage(_delivery("ada@example.com"))
    assert not isinstance(staged, Outcome)
    staged.abandon()
    await eventually(
        lambda: server.lost == 1, timeout=WAIT_SECONDS, what="the abandoned session closed"
    )
    assert server.delivered == []
    # The pool's only slot is free again: the next message goes out on a new session.
    assert (await sender.send(_delivery("bob@example.com"))).kind == "sent"
    assert server.delivered == ["bob@example.com"]
    assert server.connections == 2
    await sender.aclose()


async def test_a_staged_message_whose_session_the_server_dropped_is_retried_unsent(
    idle_dropping_server: Server,
) -> None:
    server = idle_dropping_server
    sender = _sender(server.port)
    staged = await sender.stage(_delivery("ada@example.com"))
    assert isinstance(staged, StagedEmail)
    await eventually(
        lambda: server.lost == 1,
        timeout=WAIT_SECONDS,
        what="the server dropping the waiting client",
    )
    # The client learns of the close when its loop reads the end of the stream: a "." written
    # before that went out on a connection the server had closed, and its fate is rightly
    # "unknown" (the race this test once lost on a loaded machine).
    await eventually(
        lambda: not staged._session.is_connected,
        timeout=WAIT_SECONDS,
        what="the client noticing the closed connection",
    )
    outcome = await staged.finish()
    assert outcome.kind == "retry"  # the "." never went out: safe to send again
    assert server.delivered == []
    await sender.aclose()


async def test_a_refused_recipient_is_answered_while_staging(server: Server) -> None:
    server.refuse.add("gone@example.com")
    sender = _sender(server.port)
    refused = await sender.stage(_delivery("gone@example.com"))
    assert isinstance(refused, Outcome)
    assert (refused.kind, refused.code) == ("recipient", "550")
    assert (await sender.send(_delivery("ada@example.com"))).kind == "sent"
    assert server.connections == 1
    await sender.aclose()


async def test_refusals_on_a_reused_session_keep_it(server: Server) -> None:
    """A session past its first message (with PIPELINING offered: MAIL, RCPT and DATA in one
    write) takes a refused recipient, resets and goes on."""
    server.refuse.add("gone@example.com")
    sender = _sender(server.port)
    assert (await sender.send(_delivery("ada@example.com"))).kind == "sent"
    refused = await sender.send(_delivery("gone@example.com"))
    assert (refused.kind, refused.code, refused.address_invalid) == ("recipient", "550", True)
    staged = await sender.stage(_delivery("gone@example.com"))
    assert isinstance(staged, Outcome)
    assert (staged.kind, staged.code) == ("recipient", "550")
    assert (await sender.send(_delivery("bob@example.com"))).kind == "sent"
    assert server.resets == 2
    assert server.connections == 1
    assert server.delivered == ["ada@example.com", "bob@example.com"]
    await sender.aclose()


# --- a scripted server: what goes over the wire when PIPELINING is offered -------------------


@dataclass
class Script:
    """A server that answers a reused session's MAIL, RCPT and DATA only once all three have
    arrived: a client that waits for the reply to MAIL first gets none (and times out)."""

    # The replies to a pipelined group (MAIL, RCPT, DATA), each written on its own.
    replies: tuple[bytes, bytes, bytes] = (b"250 OK", b"250 OK", b"354 go ahead")
    # Commands that arrived without a reply to the one before, per transaction after the first.
    groups: list[list[bytes]] = field(default_factory=list)
    delivered: int = 0
    connections: int = 0
    closed_by_client: int = 0
    # Each connection's handler, awaited before the test's loop ends (`_scripted`).
    handlers: set[asyncio.Task[Any]] = field(default_factory=set)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self.handlers.add(handler)
        self.connections += 1
        try:
            await self._converse(reader, writer)
        finally:  # closed however the conversation ended, so no socket outlives the test
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transactions = 0

        async def reply(*lines: bytes) -> None:
            for line in lines:
                writer.write(line + b"\r\n")
                await writer.drain()

        await reply(b"220 scripted")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                await reply(b"250-scripted", b"250-PIPELINING", b"250 HELP")
            elif verb == b"MAIL" and transactions == 0:
                await reply(b"250 OK")
            elif verb == b"MAIL":
                group = [line]
                with contextlib.suppress(TimeoutError):
                    while not group[-1].upper().startswith(b"DATA"):
                        group.append(await asyncio.wait_for(reader.readline(), 1.0))
                self.groups.append(group)
                if len(group) < 3:  # one command at a time: MAIL answered alone
                    await reply(b"250 OK")
                    continue
                await reply(*self.replies)
                if self.replies[2].startswith(b"354"):
                    await self._read_message(reader, reply)
                    transactions += 1
            elif verb == b"RCPT":
                await reply(b"250 OK")
            elif verb == b"DATA":
                await reply(b"354 go ahead")
                await self._read_message(reader, reply)
                transactions += 1
            elif verb == b"RSET":
                await reply(b"250 OK")
            elif verb == b"QUIT":
                await reply(b"221 bye")
                break
        else:
            self.closed_by_client += 1

    async def _read_message(
        self, reader: asyncio.StreamReader, reply: Callable[..., Awaitable[None]]
    ) -> None:
        while (line := await reader.readline()) not in (b".\r\n", b""):
            pass
        if line:
            self.delivered += 1
            await reply(b"250 queued")


@contextlib.asynccontextmanager
async def _scripted(script: Script) -> AsyncIterator[int]:
    listening = await asyncio.start_server(script.serve, "127.0.0.1", 0)
    try:
        yield listening.sockets[0].getsockname()[1]
    finally:
        listening.close()
        await listening.wait_closed()
        # Every connection closed by its handler before the loop ends, so no socket is left
        # for the collector to find open in another test.
        await asyncio.wait_for(
            asyncio.gather(*script.handlers, return_exceptions=True), WAIT_SECONDS
        )


async def test_a_reused_session_sends_mail_rcpt_and_data_in_one_write() -> None:
    script = Script()
    async with _scripted(script) as port:
        sender = _sender(port)
        for n in range(3):
            assert (await sender.send(_delivery(f"u{n}@example.com"))).kind == "sent"
        await sender.aclose()
    assert script.delivered == 3
    assert script.connections == 1
    assert [[c.split(b":")[0] for c in group] for group in script.groups] == [
        [b"MAIL FROM", b"RCPT TO", b"DATA\r\n"]
    ] * 2


async def test_pipelining_can_be_turned_off() -> None:
    script = Script()
    async with _scripted(script) as port:
        sender = _sender(port, smtp_pipelining=False)
        for n in range(2):
            assert (await sender.send(_delivery(f"u{n}@example.com"))).kind == "sent"
        await sender.aclose()
    # One command at a time: the server waited for RCPT in vain, then answered MAIL alone.
    assert script.groups == [[script.groups[0][0]]]
    assert script.delivered == 2


async def test_a_server_that_starts_data_for_a_refused_recipient_loses_the_session() -> None:
    """Waiting for a message no one will write, the session cannot be used again: it is
    closed, and the next message opens a new one. Nothing was delivered."""
    script = Script(replies=(b"250 OK", b"550 5.1.1 no such mailbox", b"354 go ahead"))
    async with _scripted(script) as port:
        sender = _sender(port)
        assert (await sender.send(_delivery("ada@example.com"))).kind == "sent"
        refused = await sender.send(_delivery("gone@example.com"))
        assert (refused.kind, refused.code) == ("recipient", "550")
        await eventually(
            lambda: script.closed_by_client == 1, timeout=WAIT_SECONDS, what="the session closed"
        )
        script.replies = (b"250 OK", b"250 OK", b"354 go ahead")
        assert (await sender.send(_delivery("bob@example.com"))).kind == "sent"
        await sender.aclose()
    assert script.delivered == 2
    assert script.connections == 2


async def test_a_refused_sender_in_a_group_is_a_configuration_fault() -> None:
    script = Script(replies=(b"553 5.7.1 sender not allowed", b"503 need MAIL", b"503 need RCPT"))
    async with _scripted(script) as port:
        sender = _sender(port)
        assert (await sender.send(_delivery("ada@example.com"))).kind == "sent"
        refused = await sender.send(_delivery("bob@example.com"))
        assert (refused.kind, refused.code) == ("config", "553")
        await sender.aclose()
    assert script.delivered == 1
    assert script.connections == 1  # reset and kept


# --- over STARTTLS, on both event loops ------------------------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "smtp.crt", directory / "smtp.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_pipelined_groups_go_over_starttls(
    loop: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group's replies are read on the TLS transport the session switched to (the
    stand-in protocol goes on it and comes off it again), on the loop the services run on
    and on the standard one."""
    cert_file, key_file = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))  # the client trusts it
    groups: list[int] = []

    async def counted(session: Any, commands: list[bytes], timeout: float | None) -> Any:
        groups.append(len(commands))
        return await pipelined(session, commands, timeout)

    monkeypatch.setattr(email_adapter, "pipelined", counted)
    server_state = Server()
    serving = _serve(server_state, True, tls_context=context, require_starttls=True)
    server = next(serving)

    async def send() -> int:
        sender = _sender(server.port, smtp_starttls=True)
        for n in range(4):
            assert (await sender.send(_delivery(f"u{n}@example.com"))).kind == "sent"
        await sender.aclose()
        return sender.sessions.opened

    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            assert runner.run(send()) == 1  # one session, over TLS from its first message
        assert server.delivered == [f"u{n}@example.com" for n in range(4)]
        assert groups == [3, 3, 3]  # MAIL, RCPT and DATA together, after the first message
    finally:
        with contextlib.suppress(StopIteration):
            next(serving)
