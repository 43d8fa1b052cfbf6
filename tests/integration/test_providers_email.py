"""Email over real SMTP: the sandbox's aiosmtpd server, and a second one that demands AUTH."""

from __future__ import annotations

import email
import email.policy
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from services.dispatcher.channels.email.adapter import SmtpSender
from services.dispatcher.channels.email.domain import EmailContent
from services.dispatcher.channels.email.events import EmailEventsApi
from services.dispatcher.channels.email.reconcile import (
    EmailEvents,
    message_id_header,
    reconcile_email,
)
from services.dispatcher.channels.http import ProviderClient
from services.dispatcher.domain.messages import Delivery
from services.dispatcher.settings import DispatcherSettings
from shared.links import LinkClaims, LinkSigner, track_email
from tests.integration.conftest import SandboxInfo
from tests.integration.providers import ShiftedClock

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
SIGNER = LinkSigner("test-secret", "https://links.example.com")


def _settings(port: int, **overrides: object) -> DispatcherSettings:
    return DispatcherSettings(
        smtp_host="127.0.0.1", smtp_port=port, smtp_timeout_seconds=1.0, **overrides
    )


def _delivery(to: str, message_id: str = "msg-1") -> Delivery:
    claims = LinkClaims(
        kind="unsubscribe",
        message_id=message_id,
        contact_key="u-1",
        is_user=True,
        channel="email",
        template_id="welcome",
        journey_id="welcome",
        step_id="hello",
        issued_at=int(NOW.timestamp()),
    )
    html, text = track_email(
        '<html><body><p>Hi</p><a href="https://shop.example.com/spring">Spring</a></body></html>',
        "Hi, see https://shop.example.com/spring",
        SIGNER,
        claims,
        opens=True,
        clicks=True,
        template_urls={"https://shop.example.com/spring"},
    )
    content = EmailContent("Spring is here", text, html, SIGNER.unsubscribe_url(claims))
    return Delivery(message_id, "u-1", "email", to, content)


Senders = Callable[[DispatcherSettings], SmtpSender]


@pytest.fixture
async def senders() -> AsyncIterator[Senders]:
    """Makes senders, and closes their pooled SMTP sessions after the test."""
    made: list[SmtpSender] = []

    def make(settings: DispatcherSettings) -> SmtpSender:
        sender = SmtpSender(settings, ShiftedClock())
        made.append(sender)
        return sender

    yield make
    for sender in made:
        await sender.aclose()


def _parsed(record: dict[str, object]) -> dict[str, str]:
    headers = record["headers"]
    assert isinstance(headers, dict)
    return {str(k): str(v) for k, v in headers.items()}


async def test_a_sent_message_carries_every_header_and_part(
    clean_sandbox: SandboxInfo, senders: Senders
) -> None:
    sender = senders(_settings(clean_sandbox.smtp_port))
    outcome = await sender.send(_delivery("ada@example.com"))
    assert outcome.kind == "sent"
    assert outcome.provider_id == "<msg-1@waypost.local>"
    (record,) = clean_sandbox.wait_messages("email", "ada@example.com")
    headers = _parsed(record)
    assert headers["Message-ID"] == "<msg-1@waypost.local>"  # deterministic per message id
    unsubscribe = headers["List-Unsubscribe"]
    assert unsubscribe.startswith("<https://links.example.com/u/")
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert record["subject"] == "Spring is here"
    html, text = str(record["html"]), str(record["text"])
    assert "https://links.example.com/c/" in html
    assert "https://links.example.com/o/" in html
    assert "https://shop.example.com/spring" not in html  # every link goes through tracking
    assert "https://links.example.com/c/" in text


async def test_the_unsubscribe_header_is_not_folded(
    clean_sandbox: SandboxInfo, senders: Senders
) -> None:
    sender = senders(_settings(clean_sandbox.smtp_port))
    raw = sender.message(_delivery("ada@example.com")).raw
    line = next(x for x in raw.split(b"\r\n") if x.startswith(b"List-Unsubscribe:"))
    assert len(line) > 78  # longer than a folded line could be, and still one line
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    assert parsed["List-Unsubscribe"] == line.split(b": ", 1)[1].decode()


@pytest.mark.parametrize(
    ("code", "kind"), [(550, "recipient"), (553, "recipient"), (451, "retry"), (452, "retry")]
)
async def test_refused_recipients_are_classified(
    clean_sandbox: SandboxInfo, senders: Senders, code: int, kind: str
) -> None:
    clean_sandbox.fail(channel="email", recipient="gone@example.com", error=str(code))
    sender = senders(_settings(clean_sandbox.smtp_port))
    outcome = await sender.send(_delivery("gone@example.com"))
    assert outcome.kind == kind
    assert outcome.code == str(code)
    assert outcome.address_invalid == (kind == "recipient")
    assert clean_sandbox.messages("email", "gone@example.com") == []


async def test_a_timeout_after_data_is_unknown_and_the_message_arrived(
    clean_sandbox: SandboxInfo, senders: Senders
) -> None:
    clean_sandbox.fail(channel="email", recipient="slow@example.com", error="timeout", seconds=3)
    sender = senders(_settings(clean_sandbox.smtp_port))
    outcome = await sender.send(_delivery("slow@example.com"))
    assert outcome.kind == "unknown"
    clean_sandbox.wait_messages("email", "slow@example.com")


def _events_api(sandbox: SandboxInfo, http: ProviderClient, **overrides: object) -> EmailEventsApi:
    options: dict[str, object] = {
        "email_events_url": f"{sandbox.http_url}/v3/waypost.local",
        "email_events_api_key": sandbox.email_events_api_key,
        "provider_timeout_seconds": 1.0,
        **overrides,
    }
    settings = DispatcherSettings(**options)  # type: ignore[arg-type]
    return EmailEventsApi(settings, http)


async def test_an_unanswered_message_is_found_accepted_in_the_providers_events(
    clean_sandbox: SandboxInfo, senders: Senders, http: ProviderClient
) -> None:
    clean_sandbox.fail(channel="email", recipient="slow@example.com", error="timeout", seconds=3)
    sender = senders(_settings(clean_sandbox.smtp_port))
    assert (await sender.send(_delivery("slow@example.com", "msg-held"))).kind == "unknown"
    events = _events_api(clean_sandbox, http)
    message_id = message_id_header("msg-held", "waypost.local")

    answer = await events.events_of(message_id)

    assert isinstance(answer, EmailEvents)
    assert [(e.event, e.message_id) for e in answer.events] == [
        ("accepted", "msg-held@waypost.local")
    ]
    found = reconcile_email(answer, message_id, NOW, NOW, timedelta(seconds=60))
    assert (found.outcome.kind, found.outcome.provider_id) == ("sent", message_id)


async def test_a_message_the_provider_never_took_has_no_events(
    clean_sandbox: SandboxInfo, senders: Senders, http: ProviderClient
) -> None:
    sender = senders(_settings(clean_sandbox.smtp_port))
    assert (await sender.send(_delivery("ada@example.com", "msg-other"))).kind == "sent"
    message_id = message_id_header("msg-never", "waypost.local")

    answer = await _events_api(clean_sandbox, http).events_of(message_id)

    assert answer == EmailEvents(())
    later = NOW + timedelta(seconds=61)
    found = reconcile_email(answer, message_id, NOW, later, timedelta(seconds=60))
    assert found.outcome.kind == "retry"


async def test_an_events_api_that_cannot_answer_says_why(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    message_id = message_id_header("msg-x", "waypost.local")
    wrong_key = await _events_api(
        clean_sandbox, http, email_events_api_key="not-the-key"
    ).events_of(message_id)
    assert isinstance(wrong_key, str)
    assert "HTTP 401" in wrong_key

    clean_sandbox.fail(
        channel="email", recipient="msg-x@waypost.local", error="503", action="list", times=1
    )
    busy = await _events_api(clean_sandbox, http).events_of(message_id)
    assert isinstance(busy, str)
    assert "HTTP 503" in busy

    clean_sandbox.fail(
        channel="email", recipient="msg-x@waypost.local", error="timeout", action="list", times=1
    )
    held = await _events_api(clean_sandbox, http).events_of(message_id)
    assert isinstance(held, str)
    assert "timed out" in held

    away = DispatcherSettings(
        email_events_url=f"http://127.0.0.1:{_free_port()}/v3/waypost.local",
        email_events_api_key=clean_sandbox.email_events_api_key,
    )
    gone = await EmailEventsApi(away, http).events_of(message_id)
    assert isinstance(gone, str)
    assert gone.startswith("email events: ")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_nobody_listening_is_retryable(senders: Senders) -> None:
    sender = senders(_settings(_free_port()))
    outcome = await sender.send(_delivery("ada@example.com"))
    assert outcome.kind == "retry"


class _Sink:
    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        return "250 OK"


def _refuse_everyone(
    server: object, session: object, envelope: object, mechanism: str, auth_data: object
) -> AuthResult:
    assert isinstance(auth_data, LoginPassword)
    return AuthResult(success=False, handled=False)


@pytest.fixture
def auth_server() -> Iterator[int]:
    """A real SMTP server that demands AUTH and accepts no credentials."""
    controller = Controller(
        _Sink(),
        hostname="127.0.0.1",
        port=_free_port(),
        server_hostname="auth-sink",
        auth_required=True,
        auth_require_tls=False,
        authenticator=_refuse_everyone,
    )
    controller.start()
    try:
        yield controller.port
    finally:
        controller.stop()


# A test server on 127.0.0.1 without TLS: the warning is about production set-ups.
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_bad_credentials_are_a_configuration_error(
    auth_server: int, senders: Senders
) -> None:
    settings = _settings(auth_server, smtp_username="waypost", smtp_password="wrong")
    outcome = await senders(settings).send(_delivery("ada@example.com"))
    assert outcome.kind == "config"
    assert outcome.code == "535"


def test_a_message_with_html_has_a_boundary_of_its_own_and_both_parts_intact() -> None:
    """The boundary is ours (random per message, never one the generator had to search the
    parts for), and the wire bytes parse back into the text and HTML that were sent."""
    sender = SmtpSender(_settings(1), ShiftedClock())
    delivery = _delivery("ada@example.com")
    first, second = (sender.message(delivery) for _ in range(2))
    raw = first.raw
    boundary = first.boundary
    assert boundary is not None
    assert boundary.startswith("=_waypost_")
    assert boundary != second.boundary
    assert f"\r\n--{boundary}--\r\n".encode() in raw
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    parts = {part.get_content_type(): part.get_content() for part in parsed.iter_parts()}
    content = delivery.content
    assert isinstance(content, EmailContent)
    assert parts == {"text/plain": content.text, "text/html": content.html}
