"""SmsSender against the sandbox's Twilio-style API over real sockets: every outcome class."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import SecretStr

from services.dispatcher.channels.http import ProviderClient
from services.dispatcher.channels.sms.adapter import SmsSender
from services.dispatcher.channels.sms.domain import SmsContent
from services.dispatcher.channels.sms.reconcile import SmsTry, reconcile_sms
from services.dispatcher.domain.messages import Delivery
from services.dispatcher.domain.outcomes import Outcome
from services.dispatcher.settings import DispatcherSettings
from tests.integration.conftest import SandboxInfo
from tests.integration.providers import closed_port

NUMBER = "+15557770001"


def settings(sandbox: SandboxInfo, **overrides: Any) -> DispatcherSettings:
    values: dict[str, Any] = {
        "sms_base_url": sandbox.http_url,
        "sms_account_sid": sandbox.sms_account_sid,
        "sms_auth_token": SecretStr(sandbox.sms_auth_token),
        "sms_from": "+15005550006",
        "provider_timeout_seconds": 5.0,
    }
    return DispatcherSettings(**(values | overrides))


def delivery(
    to: str = NUMBER, body: str = "Your order shipped", callback: str | None = None
) -> Delivery:
    return Delivery(
        message_id=f"msg-{to}",
        contact_key="ada",
        channel="sms",
        address=to,
        content=SmsContent(body=body, status_callback=callback),
    )


async def send(
    sandbox: SandboxInfo, http: ProviderClient, item: Delivery, **overrides: Any
) -> Outcome:
    return await SmsSender(settings(sandbox, **overrides), http).send(item)


async def test_a_sent_sms_is_in_the_outbox_under_its_sid(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    callback = f"{clean_sandbox.http_url}/sms-status?m=msg-1"

    outcome = await send(clean_sandbox, http, delivery(callback=callback))

    assert outcome.kind == "sent"
    assert outcome.provider_id is not None
    assert outcome.provider_id.startswith("SM")
    [record] = clean_sandbox.messages("sms", NUMBER)
    assert record["to"] == [NUMBER]
    assert record["from"] == "+15005550006"
    assert record["body"] == "Your order shipped"
    assert record["sid"] == outcome.provider_id
    assert record["status_callback"] == callback


async def test_without_a_status_callback_none_is_sent(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    assert (await send(clean_sandbox, http, delivery())).kind == "sent"

    [record] = clean_sandbox.messages("sms", NUMBER)
    assert record["status_callback"] is None


async def test_a_messaging_service_picks_the_sender(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    outcome = await send(
        clean_sandbox, http, delivery(), sms_messaging_service_sid="MG00000000000000000000000001"
    )

    assert outcome.kind == "sent"
    [record] = clean_sandbox.messages("sms", NUMBER)
    assert record["from"] == "MG00000000000000000000000001"
    assert record["from_number"] is None


async def test_a_carrier_failure_is_reported_later_not_at_send(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    # Accepted now; the status callback (handled by ingest) carries the undelivered status.
    clean_sandbox.fail(channel="sms", recipient=NUMBER, error="30007")

    outcome = await send(clean_sandbox, http, delivery())

    assert outcome.kind == "sent"
    clean_sandbox.wait_messages(
        "sms", NUMBER, where=lambda found: found[0]["status"] == "undelivered"
    )


async def test_rate_limited_is_retried_after_the_providers_wish(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    clean_sandbox.fail(channel="sms", recipient=NUMBER, error="429", retry_after=7)

    outcome = await send(clean_sandbox, http, delivery())

    assert (outcome.kind, outcome.code, outcome.retry_after) == ("retry", "20429", 7.0)
    assert clean_sandbox.messages("sms") == []


@pytest.mark.parametrize(
    ("error", "retry_after", "code"), [("500", None, "20500"), ("503", 3, "20503")]
)
async def test_server_errors_are_retried(
    clean_sandbox: SandboxInfo,
    http: ProviderClient,
    error: str,
    retry_after: float | None,
    code: str,
) -> None:
    clean_sandbox.fail(channel="sms", recipient=NUMBER, error=error, retry_after=retry_after)

    outcome = await send(clean_sandbox, http, delivery())

    assert (outcome.kind, outcome.code, outcome.retry_after) == ("retry", code, retry_after)
    assert clean_sandbox.messages("sms") == []


@pytest.mark.parametrize(
    ("error", "address_invalid", "withdrew_consent"),
    [("21211", True, False), ("21614", True, False), ("21610", False, True)],
)
async def test_permanent_refusals_for_the_recipient(
    clean_sandbox: SandboxInfo,
    http: ProviderClient,
    error: str,
    address_invalid: bool,
    withdrew_consent: bool,
) -> None:
    clean_sandbox.fail(channel="sms", recipient=NUMBER, error=error)

    outcome = await send(clean_sandbox, http, delivery())

    assert outcome.kind == "recipient"
    assert outcome.code == error
    assert (outcome.address_invalid, outcome.withdrew_consent) == (
        address_invalid,
        withdrew_consent,
    )
    assert clean_sandbox.messages("sms") == []


async def test_a_number_that_is_not_e164_is_an_invalid_address(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    outcome = await send(clean_sandbox, http, delivery(to="5557770001"))

    assert (outcome.kind, outcome.code, outcome.address_invalid) == ("recipient", "21211", True)


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"sms_auth_token": SecretStr("wrong-token")}, "20003"),
        ({"sms_account_sid": "ACsomeoneelse"}, "20003"),
        ({"sms_from": ""}, "21603"),
    ],
)
async def test_bad_configuration_holds_for_every_recipient(
    clean_sandbox: SandboxInfo, http: ProviderClient, overrides: dict[str, Any], code: str
) -> None:
    outcome = await send(clean_sandbox, http, delivery(), **overrides)

    assert (outcome.kind, outcome.code) == ("config", code)
    assert clean_sandbox.messages("sms") == []


async def test_a_body_over_the_limit_is_configuration(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    outcome = await send(clean_sandbox, http, delivery(body="x" * 1601))

    assert (outcome.kind, outcome.code) == ("config", "21617")


async def test_no_answer_after_the_request_left_is_unknown(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    clean_sandbox.fail(channel="sms", recipient=NUMBER, error="timeout", seconds=3)

    outcome = await send(clean_sandbox, http, delivery(), provider_timeout_seconds=1.0)

    assert outcome.kind == "unknown"
    assert "timed out after" in str(outcome.reason)
    # It did arrive: resending would have been a duplicate.
    [record] = clean_sandbox.wait_messages("sms", NUMBER)
    assert record["body"] == "Your order shipped"


async def test_a_refused_connection_is_retried(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    outcome = await send(
        clean_sandbox, http, delivery(), sms_base_url=f"http://127.0.0.1:{closed_port()}"
    )

    assert outcome.kind == "retry"
    assert str(outcome.reason).startswith("sms connect: ClientConnectorError")


# -- reconciling a send without an answer: the sandbox lists messages by number -------------


async def _reconcile(
    sandbox: SandboxInfo, http: ProviderClient, item: Delivery, began: datetime, **overrides: Any
) -> Outcome:
    sender = SmsSender(settings(sandbox, **overrides), http)
    assert isinstance(item.content, SmsContent)
    attempt = SmsTry(item.address, item.content.body, "+15005550006", None, began)
    listing = await sender.sent_to(item.address)
    return reconcile_sms(listing, attempt, datetime.now(UTC), timedelta(0))


async def test_an_unanswered_sms_that_arrived_is_found_under_its_sid(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    clean_sandbox.fail(channel="sms", recipient=NUMBER, error="timeout", seconds=3)
    began = datetime.now(UTC)
    outcome = await send(clean_sandbox, http, delivery(), provider_timeout_seconds=1.0)
    assert outcome.kind == "unknown"

    found = await _reconcile(clean_sandbox, http, delivery(), began)

    [record] = clean_sandbox.messages("sms", NUMBER)
    assert (found.kind, found.provider_id) == ("sent", record["sid"])


async def test_an_unanswered_sms_the_provider_never_stored_is_proven_absent(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    # A POST held, then refused (never stored), past the client's timeout.
    clean_sandbox.fail(channel="sms", recipient=NUMBER, error="503", seconds=3, times=1)
    began = datetime.now(UTC)
    outcome = await send(clean_sandbox, http, delivery(), provider_timeout_seconds=1.0)
    assert outcome.kind == "unknown"

    found = await _reconcile(clean_sandbox, http, delivery(), began)

    assert found.kind == "retry"
    assert clean_sandbox.messages("sms", NUMBER) == []


async def test_another_recent_message_to_the_number_leaves_it_unknown(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    began = datetime.now(UTC)
    await send(clean_sandbox, http, delivery(body="Something else"))

    found = await _reconcile(clean_sandbox, http, delivery(), began)

    assert found.kind == "unknown"


async def test_a_listing_the_provider_cannot_give_leaves_it_unknown_with_the_reason(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    began = datetime.now(UTC)
    refused = await _reconcile(
        clean_sandbox, http, delivery(), began, sms_auth_token=SecretStr("wrong")
    )
    assert refused.kind == "unknown"
    assert "HTTP 401" in str(refused.reason)

    nobody = await _reconcile(
        clean_sandbox, http, delivery(), began, sms_base_url=f"http://127.0.0.1:{closed_port()}"
    )
    assert nobody.kind == "unknown"
    assert "ClientConnectorError" in str(nobody.reason)
