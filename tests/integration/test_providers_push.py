"""PushSender against the sandbox's FCM HTTP v1 API over real sockets: the service-account token
exchange and its refresh, and every outcome class of a send."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.dispatcher.channels.http import ProviderClient
from services.dispatcher.channels.push.adapter import PushSender
from services.dispatcher.channels.push.domain import PushContent
from services.dispatcher.domain.messages import Delivery
from services.dispatcher.domain.outcomes import Outcome
from services.dispatcher.settings import DispatcherSettings
from shared.clock import SystemClock
from tests.integration.conftest import SandboxInfo
from tests.integration.providers import RequestLog, ShiftedClock, closed_port

DEVICE = "device-token-ada"


def settings(sandbox: SandboxInfo, **overrides: Any) -> DispatcherSettings:
    values: dict[str, Any] = {
        "fcm_base_url": sandbox.http_url,
        "fcm_service_account_file": sandbox.fcm_service_account_file,
        "provider_timeout_seconds": 5.0,
    }
    return DispatcherSettings(**(values | overrides))


def sender(sandbox: SandboxInfo, http: ProviderClient, **overrides: Any) -> PushSender:
    return PushSender(settings(sandbox, **overrides), http, SystemClock())


def delivery(token: str = DEVICE, message_id: str = "msg-1", **content: Any) -> Delivery:
    values: dict[str, Any] = {"title": "Your cart misses you", "body": "The lamp is still there"}
    return Delivery(
        message_id=message_id,
        contact_key="ada",
        channel="push",
        address=token,
        content=PushContent(**(values | content)),
    )


def account_file(sandbox: SandboxInfo, directory: Path, **changes: Any) -> Path:
    account = json.loads(sandbox.fcm_service_account_file.read_text()) | changes
    path = directory / "service-account.json"
    path.write_text(json.dumps(account))
    return path


def foreign_key() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


async def test_a_sent_push_is_in_the_outbox_with_its_data(
    clean_sandbox: SandboxInfo, http: ProviderClient, requests: RequestLog
) -> None:
    push = sender(clean_sandbox, http)

    outcome = await push.send(
        delivery(data={"cart": "c-9"}, image_url="https://cdn.example/lamp.png")
    )

    assert outcome.kind == "sent"
    [record] = clean_sandbox.messages("push", DEVICE)
    assert outcome.provider_id == record["name"]
    assert record["name"].startswith(f"projects/{clean_sandbox.fcm_project}/messages/")
    assert (record["title"], record["body"]) == ("Your cart misses you", "The lamp is still there")
    assert record["image"] == "https://cdn.example/lamp.png"
    assert record["data"] == {"cart": "c-9", "waypost_message_id": "msg-1"}
    assert record["android"] == {"priority": "high"}
    assert record["apns"] == {"headers": {"apns-priority": "10"}}
    assert requests.count("/token") == 1


async def test_the_access_token_is_cached_between_sends(
    clean_sandbox: SandboxInfo, http: ProviderClient, requests: RequestLog
) -> None:
    push = sender(clean_sandbox, http)

    for number in range(3):
        assert (await push.send(delivery(message_id=f"msg-{number}"))).kind == "sent"

    assert requests.count("/token") == 1
    assert len(clean_sandbox.messages("push", DEVICE)) == 3


async def test_concurrent_senders_share_one_token_fetch(
    clean_sandbox: SandboxInfo, http: ProviderClient, requests: RequestLog
) -> None:
    push = sender(clean_sandbox, http)

    outcomes = await asyncio.gather(
        *(push.send(delivery(f"device-{n}", f"msg-{n}")) for n in range(20))
    )

    assert {outcome.kind for outcome in outcomes} == {"sent"}
    assert requests.count("/token") == 1
    assert len(clean_sandbox.messages("push")) == 20


async def test_a_revoked_token_is_replaced_and_the_message_sent_once(
    clean_sandbox: SandboxInfo, http: ProviderClient, requests: RequestLog
) -> None:
    push = sender(clean_sandbox, http)
    assert (await push.send(delivery(message_id="msg-before"))).kind == "sent"
    httpx.post(f"{clean_sandbox.http_url}/control/fcm/revoke").raise_for_status()

    outcome = await push.send(delivery(message_id="msg-after"))

    assert outcome.kind == "sent"
    assert requests.count("/token") == 2
    sent = [record["data"]["waypost_message_id"] for record in clean_sandbox.messages("push")]
    assert sent == ["msg-before", "msg-after"]


async def test_the_token_is_replaced_five_minutes_before_it_expires(
    clean_sandbox: SandboxInfo, http: ProviderClient, requests: RequestLog
) -> None:
    clock = ShiftedClock()
    push = PushSender(settings(clean_sandbox), http, clock)
    assert (await push.send(delivery(message_id="msg-1"))).kind == "sent"

    clock.ahead = 3600 - 301  # still more than five minutes left
    assert (await push.send(delivery(message_id="msg-2"))).kind == "sent"
    assert requests.count("/token") == 1

    clock.ahead = 3600 - 299
    assert (await push.send(delivery(message_id="msg-3"))).kind == "sent"
    assert requests.count("/token") == 2


@pytest.mark.parametrize(
    ("error", "kind", "address_invalid"),
    [
        ("UNREGISTERED", "recipient", True),
        ("SENDER_ID_MISMATCH", "recipient", True),
        ("INVALID_ARGUMENT", "recipient", False),
        ("THIRD_PARTY_AUTH_ERROR", "config", False),
    ],
)
async def test_permanent_errors(
    clean_sandbox: SandboxInfo,
    http: ProviderClient,
    error: str,
    kind: str,
    address_invalid: bool,
) -> None:
    clean_sandbox.fail(channel="push", recipient=DEVICE, error=error)

    outcome = await sender(clean_sandbox, http).send(delivery())

    assert (outcome.kind, outcome.code, outcome.address_invalid) == (kind, error, address_invalid)
    assert clean_sandbox.messages("push") == []


@pytest.mark.parametrize(
    ("error", "retry_after", "expected_code", "expected_wait"),
    [
        ("QUOTA_EXCEEDED", None, "QUOTA_EXCEEDED", 60.0),
        ("QUOTA_EXCEEDED", 30, "QUOTA_EXCEEDED", 30.0),
        ("429", None, "QUOTA_EXCEEDED", 60.0),
        ("UNAVAILABLE", None, "UNAVAILABLE", 1.0),
        ("UNAVAILABLE", 5, "UNAVAILABLE", 5.0),
        ("INTERNAL", None, "INTERNAL", 1.0),
        ("500", 2, "INTERNAL", 2.0),
    ],
)
async def test_retryable_errors(
    clean_sandbox: SandboxInfo,
    http: ProviderClient,
    error: str,
    retry_after: float | None,
    expected_code: str,
    expected_wait: float,
) -> None:
    clean_sandbox.fail(channel="push", recipient=DEVICE, error=error, retry_after=retry_after)

    outcome = await sender(clean_sandbox, http).send(delivery())

    assert (outcome.kind, outcome.code, outcome.retry_after) == (
        "retry",
        expected_code,
        expected_wait,
    )
    assert clean_sandbox.messages("push") == []


async def test_a_message_over_4096_bytes_is_refused_without_a_call(
    clean_sandbox: SandboxInfo, http: ProviderClient, requests: RequestLog
) -> None:
    outcome = await sender(clean_sandbox, http).send(delivery(body="x" * 4000, data={"k": "v"}))

    assert outcome.kind == "recipient"
    assert str(outcome.reason).startswith("payload_too_large")
    assert requests.paths == []
    assert clean_sandbox.messages("push") == []


async def test_no_service_account_is_configuration(
    clean_sandbox: SandboxInfo, http: ProviderClient, requests: RequestLog
) -> None:
    outcome = await sender(clean_sandbox, http, fcm_service_account_file=None).send(delivery())

    assert outcome == Outcome("config", "fcm not configured")
    assert requests.paths == []


async def test_an_unreadable_service_account_file_is_configuration(
    clean_sandbox: SandboxInfo, http: ProviderClient, tmp_path: Path
) -> None:
    missing = await sender(
        clean_sandbox, http, fcm_service_account_file=tmp_path / "absent.json"
    ).send(delivery())
    incomplete = await sender(
        clean_sandbox,
        http,
        fcm_service_account_file=account_file(clean_sandbox, tmp_path, private_key=""),
    ).send(delivery())

    assert missing.kind == "config"
    assert "FileNotFoundError" in str(missing.reason)
    assert incomplete.kind == "config"
    assert "missing private_key" in str(incomplete.reason)


async def test_a_key_the_token_endpoint_does_not_trust_is_configuration(
    clean_sandbox: SandboxInfo, http: ProviderClient, tmp_path: Path
) -> None:
    path = account_file(clean_sandbox, tmp_path, private_key=foreign_key())

    outcome = await sender(clean_sandbox, http, fcm_service_account_file=path).send(delivery())

    assert (outcome.kind, outcome.code) == ("config", "invalid_grant")
    assert clean_sandbox.messages("push") == []


async def test_a_project_the_account_may_not_use_is_configuration(
    clean_sandbox: SandboxInfo, http: ProviderClient, tmp_path: Path
) -> None:
    path = account_file(clean_sandbox, tmp_path, project_id="someone-elses-project")

    outcome = await sender(clean_sandbox, http, fcm_service_account_file=path).send(delivery())

    assert (outcome.kind, outcome.code, outcome.address_invalid) == (
        "config",
        "PERMISSION_DENIED",
        False,
    )


async def test_an_unreachable_token_endpoint_is_retried(
    clean_sandbox: SandboxInfo, http: ProviderClient, tmp_path: Path
) -> None:
    path = account_file(
        clean_sandbox, tmp_path, token_uri=f"http://127.0.0.1:{closed_port()}/token"
    )

    outcome = await sender(clean_sandbox, http, fcm_service_account_file=path).send(delivery())

    assert outcome.kind == "retry"
    assert str(outcome.reason).startswith("fcm token: ClientConnectorError")


async def test_a_refused_connection_is_retried(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    push = sender(clean_sandbox, http)
    await push.token.get()  # the token endpoint works; only the send endpoint is away
    push_elsewhere = PushSender(
        settings(clean_sandbox, fcm_base_url=f"http://127.0.0.1:{closed_port()}"),
        http,
        SystemClock(),
        push.token,
    )

    outcome = await push_elsewhere.send(delivery())

    assert outcome.kind == "retry"
    assert str(outcome.reason).startswith("fcm connect: ClientConnectorError")


async def test_no_answer_after_the_request_left_is_unknown(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    clean_sandbox.fail(channel="push", recipient=DEVICE, error="timeout", seconds=3)

    outcome = await sender(clean_sandbox, http, provider_timeout_seconds=1.0).send(delivery())

    assert outcome.kind == "unknown"
    [record] = clean_sandbox.wait_messages("push", DEVICE)
    assert record["data"]["waypost_message_id"] == "msg-1"
