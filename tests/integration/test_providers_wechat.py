"""WechatSender against the sandbox's Official Account API over real sockets: the shared access
token, its replacement after a refusal, client_msg_id de-duplication, every outcome class."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import SecretStr

from services.dispatcher.channels.http import ProviderClient
from services.dispatcher.channels.wechat.adapter import WechatSender
from services.dispatcher.channels.wechat.domain import WechatContent, seconds_until_quota_reset
from services.dispatcher.domain.messages import Delivery
from services.dispatcher.settings import DispatcherSettings
from shared.clock import SystemClock
from tests.integration.conftest import SandboxInfo
from tests.integration.providers import RequestLog, ShiftedClock, closed_port

OPENID = "openid-ada"
TOKEN_PATH = "/cgi-bin/stable_token"


def settings(sandbox: SandboxInfo, **overrides: Any) -> DispatcherSettings:
    values: dict[str, Any] = {
        "wechat_base_url": sandbox.http_url,
        "wechat_app_id": sandbox.wechat_app_id,
        "wechat_app_secret": SecretStr(sandbox.wechat_app_secret),
        "provider_timeout_seconds": 5.0,
    }
    return DispatcherSettings(**(values | overrides))


def sender(sandbox: SandboxInfo, http: ProviderClient, **overrides: Any) -> WechatSender:
    return WechatSender(settings(sandbox, **overrides), http, SystemClock())


def template(
    openid: str = OPENID, message_id: str = "msg-1", template_id: str = "tpl-order"
) -> Delivery:
    return Delivery(
        message_id=message_id,
        contact_key="ada",
        channel="wechat",
        address=openid,
        content=WechatContent(
            kind="template",
            template_id=template_id,
            data={"first": "您的订单已发货", "keyword1": "A-1001"},
            url="https://shop.example/orders/A-1001",
        ),
    )


def news(openid: str = OPENID, message_id: str = "msg-news") -> Delivery:
    return Delivery(
        message_id=message_id,
        contact_key="ada",
        channel="wechat",
        address=openid,
        content=WechatContent(
            kind="news",
            title="春季新品",
            description="Spring collection",
            url="https://shop.example/spring",
            image_url="https://shop.example/spring.jpg",
        ),
    )


def tokens_issued(sandbox: SandboxInfo) -> int:
    issued: int = sandbox.wechat_status()["tokens_issued"]
    return issued


async def test_a_sent_template_message_is_in_the_outbox(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    outcome = await sender(clean_sandbox, http).send(template())

    assert outcome.kind == "sent"
    [record] = clean_sandbox.messages("wechat", OPENID)
    assert outcome.provider_id == str(record["msgid"])
    assert record["kind"] == "template"
    assert record["template_id"] == "tpl-order"
    assert record["data"] == {"first": {"value": "您的订单已发货"}, "keyword1": {"value": "A-1001"}}
    assert record["url"] == "https://shop.example/orders/A-1001"
    assert record["client_msg_id"] == "msg-1"


async def test_a_sent_news_message_is_in_the_outbox(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    outcome = await sender(clean_sandbox, http).send(news())

    # Customer-service sends answer without a msgid: the message id stands for it.
    assert (outcome.kind, outcome.provider_id) == ("sent", "msg-news")
    [record] = clean_sandbox.messages("wechat", OPENID)
    assert record["kind"] == "news"
    assert (record["title"], record["description"]) == ("春季新品", "Spring collection")
    assert record["url"] == "https://shop.example/spring"
    assert record["picurl"] == "https://shop.example/spring.jpg"


async def test_a_sent_text_message_is_in_the_outbox(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    text = Delivery(
        message_id="msg-text",
        contact_key="ada",
        channel="wechat",
        address=OPENID,
        content=WechatContent(kind="text", description="您好 Ada"),
    )

    assert (await sender(clean_sandbox, http).send(text)).kind == "sent"
    [record] = clean_sandbox.messages("wechat", OPENID)
    assert (record["kind"], record["content"]) == ("text", "您好 Ada")


async def test_the_same_template_delivery_twice_arrives_once(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    wechat = sender(clean_sandbox, http)

    first = await wechat.send(template())
    second = await wechat.send(template())

    assert first.kind == second.kind == "sent"
    assert first.provider_id == second.provider_id
    assert len(clean_sandbox.messages("wechat", OPENID)) == 1


async def test_concurrent_senders_share_one_token(
    clean_sandbox: SandboxInfo, http: ProviderClient, requests: RequestLog
) -> None:
    wechat = sender(clean_sandbox, http)
    before = tokens_issued(clean_sandbox)

    outcomes = await asyncio.gather(
        *(wechat.send(template(f"openid-{n}", f"msg-{n}")) for n in range(20))
    )

    assert {outcome.kind for outcome in outcomes} == {"sent"}
    assert tokens_issued(clean_sandbox) - before <= 1
    assert requests.count(TOKEN_PATH) == 1
    assert len(clean_sandbox.messages("wechat")) == 20


async def test_the_token_is_replaced_early(
    clean_sandbox: SandboxInfo, http: ProviderClient, requests: RequestLog
) -> None:
    clock = ShiftedClock()
    wechat = WechatSender(settings(clean_sandbox), http, clock)
    assert (await wechat.send(template(message_id="msg-1"))).kind == "sent"

    clock.ahead = 7200 - 721  # more than 10% of the 7200 s life left
    assert (await wechat.send(template(message_id="msg-2"))).kind == "sent"
    assert requests.count(TOKEN_PATH) == 1

    clock.ahead = 7200 - 719
    assert (await wechat.send(template(message_id="msg-3"))).kind == "sent"
    assert requests.count(TOKEN_PATH) == 2
    # The stable-token endpoint answered with the still valid token: nothing was cut off.
    assert tokens_issued(clean_sandbox) == 1


@pytest.mark.parametrize("error", ["40001", "42001"])
async def test_a_refused_token_is_replaced_and_the_message_sent_once_more(
    clean_sandbox: SandboxInfo, http: ProviderClient, error: str
) -> None:
    wechat = sender(clean_sandbox, http)
    await wechat.token.get()
    clean_sandbox.fail(channel="wechat", recipient=OPENID, error=error, times=1)

    outcome = await wechat.send(template())

    assert outcome.kind == "sent"
    # The endpoint handed back the refused token, so a new one was forced.
    assert tokens_issued(clean_sandbox) == 2
    assert len(clean_sandbox.messages("wechat", OPENID)) == 1


async def test_a_token_refused_twice_is_retried_later(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    clean_sandbox.fail(channel="wechat", recipient=OPENID, error="40001", times=2)

    outcome = await sender(clean_sandbox, http).send(news())

    assert (outcome.kind, outcome.code) == ("retry", "40001")
    assert clean_sandbox.messages("wechat") == []


async def test_a_token_revoked_by_the_platform_is_fetched_again(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    wechat = sender(clean_sandbox, http)
    assert (await wechat.send(template(message_id="msg-1"))).kind == "sent"
    clean_sandbox.reset()  # the sandbox forgets every token it issued

    outcome = await wechat.send(template(message_id="msg-2"))

    assert outcome.kind == "sent"
    assert tokens_issued(clean_sandbox) == 1


@pytest.mark.parametrize("error", ["-1", "503"])
async def test_busy_is_retried(
    clean_sandbox: SandboxInfo, http: ProviderClient, error: str
) -> None:
    clean_sandbox.fail(channel="wechat", recipient=OPENID, error=error)

    outcome = await sender(clean_sandbox, http).send(template())

    assert (outcome.kind, outcome.code) == ("retry", "-1")
    assert clean_sandbox.messages("wechat") == []


@pytest.mark.parametrize(
    ("error", "address_invalid"), [("40003", True), ("43004", True), ("45015", False)]
)
async def test_permanent_errors_for_the_recipient(
    clean_sandbox: SandboxInfo, http: ProviderClient, error: str, address_invalid: bool
) -> None:
    clean_sandbox.fail(channel="wechat", recipient=OPENID, error=error)

    outcome = await sender(clean_sandbox, http).send(news())

    assert (outcome.kind, outcome.code, outcome.address_invalid) == (
        "recipient",
        error,
        address_invalid,
    )
    assert clean_sandbox.messages("wechat") == []


@pytest.mark.parametrize("error", ["40037", "47003"])
async def test_configuration_errors(
    clean_sandbox: SandboxInfo, http: ProviderClient, error: str
) -> None:
    clean_sandbox.fail(channel="wechat", recipient=OPENID, error=error)

    outcome = await sender(clean_sandbox, http).send(template())

    assert (outcome.kind, outcome.code) == ("config", error)


async def test_an_unknown_template_id_is_configuration(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    outcome = await sender(clean_sandbox, http).send(template(template_id="tpl-nobody-made"))

    assert (outcome.kind, outcome.code) == ("config", "40037")
    assert clean_sandbox.messages("wechat") == []


async def test_the_daily_quota_holds_the_channel_until_midnight_in_china(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    clean_sandbox.fail(channel="wechat", recipient=OPENID, error="45009")
    clock = SystemClock()
    before = seconds_until_quota_reset(clock.now())

    outcome = await sender(clean_sandbox, http).send(template())

    after = seconds_until_quota_reset(clock.now())
    assert (outcome.kind, outcome.code) == ("config", "45009")
    assert outcome.retry_after is not None
    assert after <= outcome.retry_after <= before


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"wechat_app_secret": SecretStr("wrong-secret")}, "40125"),
        ({"wechat_app_id": "wxsomeoneelse"}, "40013"),
    ],
)
async def test_bad_credentials_are_configuration(
    clean_sandbox: SandboxInfo, http: ProviderClient, overrides: dict[str, Any], code: str
) -> None:
    outcome = await sender(clean_sandbox, http, **overrides).send(template())

    assert (outcome.kind, outcome.code) == ("config", code)
    assert tokens_issued(clean_sandbox) == 0


async def test_no_answer_to_a_news_message_is_unknown(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    clean_sandbox.fail(channel="wechat", recipient=OPENID, error="timeout", seconds=3)

    outcome = await sender(clean_sandbox, http, provider_timeout_seconds=1.0).send(news())

    assert outcome.kind == "unknown"
    clean_sandbox.wait_messages("wechat", OPENID)


async def test_no_answer_to_a_template_message_is_retried_without_a_duplicate(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    clean_sandbox.fail(channel="wechat", recipient=OPENID, error="timeout", seconds=3, times=1)
    wechat = sender(clean_sandbox, http, provider_timeout_seconds=1.0)

    outcome = await wechat.send(template())

    assert outcome.kind == "retry"
    [record] = clean_sandbox.wait_messages("wechat", OPENID)
    again = await wechat.send(template())
    assert (again.kind, again.provider_id) == ("sent", str(record["msgid"]))
    assert len(clean_sandbox.messages("wechat", OPENID)) == 1


async def test_an_unreachable_platform_is_retried(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    outcome = await sender(
        clean_sandbox, http, wechat_base_url=f"http://127.0.0.1:{closed_port()}"
    ).send(news())

    assert outcome.kind == "retry"
    assert str(outcome.reason).startswith("wechat token: ClientConnectorError")


async def test_a_refused_send_connection_is_retried(
    clean_sandbox: SandboxInfo, http: ProviderClient
) -> None:
    wechat = sender(clean_sandbox, http)
    await wechat.token.get()
    elsewhere = WechatSender(
        settings(clean_sandbox, wechat_base_url=f"http://127.0.0.1:{closed_port()}"),
        http,
        SystemClock(),
        wechat.token,
    )

    outcome = await elsewhere.send(news())

    assert outcome.kind == "retry"
    assert str(outcome.reason).startswith("wechat connect: ClientConnectorError")
