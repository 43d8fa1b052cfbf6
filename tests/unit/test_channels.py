"""SMS, push and WeChat rendering, request bodies and the classification of provider answers."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from services.dispatcher.channels.common import (
    answer_object,
    classify_http_failure,
    describe_error,
    refresh_at,
    retry_after_seconds,
    take_first_url,
    transport_failure,
)
from services.dispatcher.channels.push.domain import (
    FCM_MAX_MESSAGE_BYTES,
    PushContent,
    classify_fcm,
    classify_oauth_failure,
    fcm_error_code,
    fcm_jwt_claims,
    fcm_needs_new_token,
    fcm_request_body,
    render_push,
)
from services.dispatcher.channels.sms.domain import SmsContent, classify_sms, render_sms, sms_form
from services.dispatcher.channels.wechat.domain import (
    WechatContent,
    classify_wechat,
    classify_wechat_token_failure,
    render_wechat,
    seconds_until_quota_reset,
    wechat_refresh_margin,
    wechat_request_body,
    wechat_send_path,
)
from services.dispatcher.domain.outcomes import Outcome
from shared.rendering import RenderError

VARIABLES: dict[str, Any] = {
    "contact": {"key": "user-1", "first_name": "Ada", "city": "Shanghai"},
    "event": {"product": "Lamp", "price": 19.5, "link": "https://shop.example/p/lamp"},
    "context": {},
    "journey": {"id": "welcome", "version": 1},
}
NOW = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)  # 17:00 in Shanghai


def template(**fields: Any) -> dict[str, Any]:
    return {"channel": "sms", "subject": None, "text": "", "html": None, **fields}


# ---------------------------------------------------------------------------------------- SMS


def test_sms_body_is_the_rendered_text_stripped() -> None:
    content = render_sms(
        template(text="  Hi {{ contact.first_name }}, {{ event.product }} is back.\n"),
        VARIABLES,
        "https://in.example/sms/status?s=sig",
    )

    assert content == SmsContent(
        body="Hi Ada, Lamp is back.", status_callback="https://in.example/sms/status?s=sig"
    )


def test_sms_without_status_callback_keeps_none() -> None:
    assert render_sms(template(text="Hi"), VARIABLES, None).status_callback is None


@pytest.mark.parametrize("text", ["", "   \n ", "{{ '' }}", None])
def test_sms_body_rendering_empty_is_a_render_error(text: str | None) -> None:
    with pytest.raises(RenderError, match=r"^sms body renders empty$"):
        render_sms(template(text=text), VARIABLES, None)


def test_sms_body_over_1600_characters_is_a_render_error() -> None:
    with pytest.raises(RenderError, match=r"sms body: 1601 characters, over the limit of 1600"):
        render_sms(template(text="x" * 1601), VARIABLES, None)


def test_sms_missing_variable_names_the_field() -> None:
    with pytest.raises(RenderError, match=r"^text: .*nickname"):
        render_sms(template(text="Hi {{ contact.nickname }}"), VARIABLES, None)


def test_sms_form_uses_from_or_the_messaging_service() -> None:
    content = SmsContent(body="Hi", status_callback="https://cb")

    assert sms_form("+15551230000", content, "+15005550006", None) == {
        "To": "+15551230000",
        "Body": "Hi",
        "From": "+15005550006",
        "StatusCallback": "https://cb",
    }
    assert sms_form("+15551230000", SmsContent(body="Hi"), "+15005550006", "MG1") == {
        "To": "+15551230000",
        "Body": "Hi",
        "MessagingServiceSid": "MG1",
    }


@pytest.mark.parametrize(
    ("status", "body", "retry_after", "expected"),
    [
        (201, {"sid": "SM1", "status": "queued"}, None, Outcome("sent", provider_id="SM1")),
        (200, {"sid": "SM2"}, None, Outcome("sent", provider_id="SM2")),
        (
            429,
            {"code": 20429, "message": "Too Many Requests"},
            7.0,
            Outcome("retry", "sms 20429: Too Many Requests", code="20429", retry_after=7.0),
        ),
        (429, None, None, Outcome("retry", "sms 429: HTTP 429", code="429")),
        (
            400,
            {"code": 20429, "message": "slow"},
            3.0,
            Outcome("retry", "sms 20429: slow", code="20429", retry_after=3.0),
        ),
        (500, {"message": "boom"}, None, Outcome("retry", "sms 500: boom", code="500")),
        (503, None, 2.0, Outcome("retry", "sms 503: HTTP 503", code="503", retry_after=2.0)),
        (
            401,
            {"code": 20003, "message": "Authenticate"},
            None,
            Outcome("config", "sms 20003: Authenticate", code="20003"),
        ),
        (403, None, None, Outcome("config", "sms 403: HTTP 403", code="403")),
        (
            400,
            {"code": 20003, "message": "auth"},
            None,
            Outcome("config", "sms 20003: auth", code="20003"),
        ),
        (
            404,
            {"code": 20404, "message": "not found"},
            None,
            Outcome("config", "sms 20404: not found", code="20404"),
        ),
        (
            400,
            {"code": 21211, "message": "invalid To"},
            None,
            Outcome("recipient", "sms 21211: invalid To", code="21211", address_invalid=True),
        ),
        (
            400,
            {"code": 21614, "message": "not mobile"},
            None,
            Outcome("recipient", "sms 21614: not mobile", code="21614", address_invalid=True),
        ),
        (
            400,
            {"code": 21610, "message": "STOP"},
            None,
            Outcome("recipient", "sms 21610: STOP", code="21610", withdrew_consent=True),
        ),
        (
            400,
            {"code": 21602, "message": "no body"},
            None,
            Outcome("config", "sms 21602: no body", code="21602"),
        ),
        (
            400,
            {"code": 21603, "message": "no from"},
            None,
            Outcome("config", "sms 21603: no from", code="21603"),
        ),
        (
            400,
            {"code": "21606", "message": "bad from"},
            None,
            Outcome("config", "sms 21606: bad from", code="21606"),
        ),
    ],
)
def test_sms_answers(
    status: int, body: dict[str, Any] | None, retry_after: float | None, expected: Outcome
) -> None:
    assert classify_sms(status, body, retry_after) == expected


# --------------------------------------------------------------------------------------- push


def push_template(**fields: Any) -> dict[str, Any]:
    return template(channel="push", subject="Hi {{ contact.first_name }}", **fields)


def test_push_renders_title_body_data_and_image() -> None:
    content = render_push(
        push_template(
            text=" {{ event.product }} is back \n",
            data={
                "product": "{{ event.product }}",
                "price": "{{ event.price }}",
                "deep": "app://p",
            },
            image_url=" https://cdn.example/{{ event.product | lower }}.png ",
        ),
        VARIABLES,
    )

    assert content == PushContent(
        title="Hi Ada",
        body="Lamp is back",
        data={"product": "Lamp", "price": "19.5", "deep": "app://p"},
        image_url="https://cdn.example/lamp.png",
    )
    assert all(isinstance(value, str) for value in content.data.values())


def test_push_without_data_or_image() -> None:
    content = render_push(push_template(text="Body"), VARIABLES)

    assert content.data == {}
    assert content.image_url is None


def test_push_image_rendering_empty_is_left_out() -> None:
    content = render_push(push_template(text="b", image_url="{{ '' }}"), VARIABLES)

    assert content.image_url is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"subject": None}, "^subject: missing from the template$"),
        ({"subject": ""}, "^subject: missing from the template$"),
        ({"subject": "{{ '  ' }}"}, "^subject: renders empty$"),
        ({"subject": "Hi\n{{ contact.first_name }}"}, "^subject: renders to more than one line$"),
        ({"subject": "Hi {{ contact.nickname }}"}, "^subject: .*nickname"),
        ({"subject": 3}, "^subject: must be a template string$"),
        ({"text": "{{ contact.nickname }}"}, "^text: .*nickname"),
        ({"data": ["a"]}, "^data: must map names to template strings$"),
        ({"data": {"n": 1}}, "^data.n: must be a template string$"),
        ({"data": {"": "x"}}, "^data: '' is not a name$"),
        ({"data": {"n": "{{ contact.nickname }}"}}, "^data.n: .*nickname"),
        ({"data": {"from": "x"}}, "^data.from: the name is reserved for push messages$"),
        ({"data": {"google.x": "x"}}, "^data.google.x: the name is reserved"),
        ({"data": {"gcm.n": "x"}}, "^data.gcm.n: the name is reserved"),
        ({"data": {"waypost_message_id": "x"}}, "^data.waypost_message_id: the name is reserved"),
        ({"image_url": "cdn.example/a.png"}, "^image_url: 'cdn.example/a.png' is not an http"),
        ({"image_url": "{{ contact.avatar }}"}, "^image_url: .*avatar"),
    ],
)
def test_push_render_errors_name_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(RenderError, match=message):
        render_push(push_template(text="b") | fields, VARIABLES)


def test_fcm_request_body() -> None:
    content = PushContent(
        title="T", body="B", data={"k": "v"}, image_url="https://cdn.example/i.png"
    )

    body = json.loads(fcm_request_body("tok-1", content, "msg-1"))

    assert body == {
        "message": {
            "token": "tok-1",
            "notification": {"title": "T", "body": "B", "image": "https://cdn.example/i.png"},
            "data": {"k": "v", "waypost_message_id": "msg-1"},
            "android": {"priority": "high"},
            "apns": {"headers": {"apns-priority": "10"}},
        }
    }


def test_fcm_request_body_without_image_has_no_image_key() -> None:
    body = json.loads(fcm_request_body("tok", PushContent(title="T", body="B"), "m"))

    assert body["message"]["notification"] == {"title": "T", "body": "B"}


def test_fcm_request_body_size_counts_utf8_bytes() -> None:
    base = len(fcm_request_body("tok", PushContent(title="T", body=""), "m"))
    # Each 字 is three bytes on the wire.
    body = fcm_request_body("tok", PushContent(title="T", body="字" * 10), "m")

    assert len(body) == base + 30
    assert FCM_MAX_MESSAGE_BYTES == 4096


def test_fcm_jwt_claims() -> None:
    assert fcm_jwt_claims("sa@p.iam", "https://oauth2.example/token", 1000) == {
        "iss": "sa@p.iam",
        "scope": "https://www.googleapis.com/auth/firebase.messaging",
        "aud": "https://oauth2.example/token",
        "iat": 1000,
        "exp": 4600,
    }


def fcm_error(status: int, code: str | None, message: str = "m") -> dict[str, Any]:
    details = [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}]
    return {"error": {"code": status, "message": message, "details": details if code else []}}


@pytest.mark.parametrize(
    ("status", "body", "retry_after", "expected"),
    [
        (
            200,
            {"name": "projects/p/messages/1"},
            None,
            Outcome("sent", provider_id="projects/p/messages/1"),
        ),
        (
            404,
            fcm_error(404, "UNREGISTERED"),
            None,
            Outcome("recipient", "fcm UNREGISTERED: m", code="UNREGISTERED", address_invalid=True),
        ),
        (
            403,
            fcm_error(403, "SENDER_ID_MISMATCH"),
            None,
            Outcome(
                "recipient",
                "fcm SENDER_ID_MISMATCH: m",
                code="SENDER_ID_MISMATCH",
                address_invalid=True,
            ),
        ),
        (
            400,
            fcm_error(400, "INVALID_ARGUMENT"),
            None,
            Outcome("recipient", "fcm INVALID_ARGUMENT: m", code="INVALID_ARGUMENT"),
        ),
        (
            401,
            fcm_error(401, "THIRD_PARTY_AUTH_ERROR"),
            None,
            Outcome("config", "fcm THIRD_PARTY_AUTH_ERROR: m", code="THIRD_PARTY_AUTH_ERROR"),
        ),
        (
            401,
            fcm_error(401, None),
            None,
            Outcome("config", "fcm UNAUTHENTICATED: m", code="UNAUTHENTICATED"),
        ),
        (
            429,
            fcm_error(429, "QUOTA_EXCEEDED"),
            None,
            Outcome("retry", "fcm QUOTA_EXCEEDED: m", code="QUOTA_EXCEEDED", retry_after=60.0),
        ),
        (
            429,
            fcm_error(429, "QUOTA_EXCEEDED"),
            12.0,
            Outcome("retry", "fcm QUOTA_EXCEEDED: m", code="QUOTA_EXCEEDED", retry_after=12.0),
        ),
        (
            503,
            fcm_error(503, "UNAVAILABLE"),
            None,
            Outcome("retry", "fcm UNAVAILABLE: m", code="UNAVAILABLE", retry_after=1.0),
        ),
        (
            503,
            fcm_error(503, "UNAVAILABLE"),
            30.0,
            Outcome("retry", "fcm UNAVAILABLE: m", code="UNAVAILABLE", retry_after=30.0),
        ),
        (
            500,
            fcm_error(500, "INTERNAL"),
            None,
            Outcome("retry", "fcm INTERNAL: m", code="INTERNAL", retry_after=1.0),
        ),
        # Without an FcmError detail the HTTP status decides.
        (
            404,
            None,
            None,
            Outcome(
                "recipient", "fcm UNREGISTERED: HTTP 404", code="UNREGISTERED", address_invalid=True
            ),
        ),
        (
            400,
            {"error": {"message": "bad"}},
            None,
            Outcome("recipient", "fcm INVALID_ARGUMENT: bad", code="INVALID_ARGUMENT"),
        ),
        (
            403,
            fcm_error(403, None),
            None,
            Outcome("config", "fcm PERMISSION_DENIED: m", code="PERMISSION_DENIED"),
        ),
        (
            429,
            None,
            None,
            Outcome(
                "retry", "fcm QUOTA_EXCEEDED: HTTP 429", code="QUOTA_EXCEEDED", retry_after=60.0
            ),
        ),
        (
            502,
            None,
            None,
            Outcome("retry", "fcm HTTP_502: HTTP 502", code="HTTP_502", retry_after=1.0),
        ),
        (409, None, None, Outcome("config", "fcm HTTP_409: HTTP 409", code="HTTP_409")),
    ],
)
def test_fcm_answers(
    status: int, body: dict[str, Any] | None, retry_after: float | None, expected: Outcome
) -> None:
    assert classify_fcm(status, body, retry_after) == expected


def test_fcm_error_code_prefers_the_fcm_error_detail() -> None:
    body = {
        "error": {
            "status": "INVALID_ARGUMENT",
            "details": [
                {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": []},
                {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "X"},
            ],
        }
    }

    assert fcm_error_code(400, body) == "X"


def test_only_our_own_401_asks_for_a_new_token() -> None:
    assert fcm_needs_new_token(401, {"error": {"status": "UNAUTHENTICATED"}})
    assert fcm_needs_new_token(401, None)
    assert not fcm_needs_new_token(401, fcm_error(401, "THIRD_PARTY_AUTH_ERROR"))
    assert not fcm_needs_new_token(403, None)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (
            400,
            {"error": "invalid_grant", "error_description": "Invalid JWT"},
            Outcome("config", "fcm token invalid_grant: Invalid JWT", code="invalid_grant"),
        ),
        (
            401,
            {"error": "invalid_client"},
            Outcome("config", "fcm token invalid_client", code="invalid_client"),
        ),
        (403, None, Outcome("config", "fcm token HTTP 403", code="HTTP 403")),
        (500, None, Outcome("retry", "fcm token HTTP 500", code="HTTP 500")),
        (
            503,
            {"error": "unavailable"},
            Outcome("retry", "fcm token unavailable", code="unavailable"),
        ),
        (429, None, Outcome("retry", "fcm token HTTP 429", code="HTTP 429")),
    ],
)
def test_fcm_token_exchange_failures(
    status: int, body: dict[str, Any] | None, expected: Outcome
) -> None:
    assert classify_oauth_failure(status, body) == expected


# ------------------------------------------------------------------------------------- WeChat


def wechat_template(**fields: Any) -> dict[str, Any]:
    return template(channel="wechat", **fields)


def test_wechat_template_message() -> None:
    content = render_wechat(
        wechat_template(
            wechat_template_id=" TPL-1 ",
            data={"first": "Hi {{ contact.first_name }}", "price": "{{ event.price }}"},
            url="{{ event.link }}",
            subject="ignored",
        ),
        VARIABLES,
    )

    assert content == WechatContent(
        kind="template",
        template_id="TPL-1",
        data={"first": "Hi Ada", "price": "19.5"},
        url="https://shop.example/p/lamp",
    )


def test_wechat_template_message_url_is_optional() -> None:
    content = render_wechat(wechat_template(wechat_template_id="TPL-1"), VARIABLES)

    assert content == WechatContent(kind="template", template_id="TPL-1", data={}, url=None)


def test_wechat_news_with_its_own_url() -> None:
    content = render_wechat(
        wechat_template(
            subject="{{ event.product }} is back",
            text=" Back in {{ contact.city }}: https://other.example/x \n",
            url="{{ event.link }}",
            image_url="https://cdn.example/lamp.png",
        ),
        VARIABLES,
    )

    assert content == WechatContent(
        kind="news",
        title="Lamp is back",
        description="Back in Shanghai: https://other.example/x",
        url="https://shop.example/p/lamp",
        image_url="https://cdn.example/lamp.png",
    )


def test_wechat_news_takes_the_first_url_of_the_text_out_of_the_description() -> None:
    content = render_wechat(
        wechat_template(
            subject="Sale",
            text="See {{ event.link }} today, or https://two.example later.",
        ),
        VARIABLES,
    )

    assert content.url == "https://shop.example/p/lamp"
    assert content.description == "See today, or https://two.example later."
    assert content.image_url is None


def test_wechat_news_without_any_url_is_a_render_error() -> None:
    with pytest.raises(RenderError, match=r"^url: a WeChat news message needs a link"):
        render_wechat(wechat_template(subject="Sale", text="No link here"), VARIABLES)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"text": "https://a.example"}, "^subject: missing from the template$"),
        (
            {"subject": "a\nb", "text": "https://a.example"},
            "^subject: renders to more than one line$",
        ),
        ({"subject": "{{ contact.nickname }}", "url": "https://a"}, "^subject: .*nickname"),
        ({"subject": "s", "url": "www.example.com"}, "^url: 'www.example.com' is not an http"),
        ({"subject": "s", "url": "{{ contact.nickname }}"}, "^url: .*nickname"),
        ({"subject": "s", "text": "{{ contact.nickname }}"}, "^text: .*nickname"),
        (
            {"subject": "s", "url": "https://a", "image_url": "ftp://x"},
            "^image_url: 'ftp://x' is not",
        ),
        ({"wechat_template_id": 7}, "^wechat_template_id: must be a string$"),
        (
            {"wechat_template_id": "T", "data": {"k": "{{ contact.nickname }}"}},
            "^data.k: .*nickname",
        ),
        ({"wechat_template_id": "T", "data": "x"}, "^data: must map names to template strings$"),
        ({"wechat_template_id": "T", "url": "nope"}, "^url: 'nope' is not an http"),
    ],
)
def test_wechat_render_errors_name_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(RenderError, match=message):
        render_wechat(wechat_template(**fields), VARIABLES)


@pytest.mark.parametrize(
    ("text", "url", "rest"),
    [
        ("Visit https://a.example/sale.", "https://a.example/sale", "Visit."),
        ("Visit https://a.example/sale, now", "https://a.example/sale", "Visit, now"),
        ("(see https://a.example/x) ok", "https://a.example/x", "(see) ok"),
        ("wiki https://w.example/A_(b) page", "https://w.example/A_(b)", "wiki page"),
        (
            "Line one\nhttps://a.example/x\nLine three",
            "https://a.example/x",
            "Line one\nLine three",
        ),
        ("HTTPS://A.EXAMPLE/X", "HTTPS://A.EXAMPLE/X", ""),
        ("no url at all ", None, "no url at all"),
    ],
)
def test_take_first_url(text: str, url: str | None, rest: str) -> None:
    assert take_first_url(text) == (url, rest)


def test_wechat_template_request_body() -> None:
    content = WechatContent(
        kind="template", template_id="T1", data={"first": "Hi"}, url="https://a.example"
    )

    assert wechat_request_body("openid-1", content, "msg-1") == {
        "touser": "openid-1",
        "template_id": "T1",
        "data": {"first": {"value": "Hi"}},
        "client_msg_id": "msg-1",
        "url": "https://a.example",
    }
    assert wechat_send_path(content) == "/cgi-bin/message/template/send"
    no_url = WechatContent(kind="template", template_id="T1")
    assert "url" not in wechat_request_body("o", no_url, "m")


def test_wechat_news_request_body() -> None:
    content = WechatContent(
        kind="news", title="T", description="D", url="https://a", image_url="https://i"
    )

    assert wechat_request_body("openid-1", content, "msg-1") == {
        "touser": "openid-1",
        "msgtype": "news",
        "news": {
            "articles": [
                {"title": "T", "description": "D", "url": "https://a", "picurl": "https://i"}
            ]
        },
    }
    assert wechat_send_path(content) == "/cgi-bin/message/custom/send"
    bare = wechat_request_body("o", WechatContent(kind="news", title="T", url="https://a"), "m")
    assert bare["news"]["articles"] == [{"title": "T", "description": "", "url": "https://a"}]


def test_wechat_text_request_body() -> None:
    content = WechatContent(kind="text", description="Hello")

    assert wechat_request_body("o", content, "m") == {
        "touser": "o",
        "msgtype": "text",
        "text": {"content": "Hello"},
    }
    assert wechat_send_path(content) == "/cgi-bin/message/custom/send"


@pytest.mark.parametrize(
    ("errcode", "msgid", "expected"),
    [
        (0, 123456789, Outcome("sent", provider_id="123456789")),
        (0, None, Outcome("sent", provider_id="msg-1")),
        (-1, None, Outcome("retry", "wechat -1: e", code="-1")),
        (40001, None, Outcome("retry", "wechat 40001: e", code="40001")),
        (40014, None, Outcome("retry", "wechat 40014: e", code="40014")),
        (42001, None, Outcome("retry", "wechat 42001: e", code="42001")),
        (40003, None, Outcome("recipient", "wechat 40003: e", code="40003", address_invalid=True)),
        (43004, None, Outcome("recipient", "wechat 43004: e", code="43004", address_invalid=True)),
        (45015, None, Outcome("recipient", "wechat 45015: e", code="45015")),
        (40037, None, Outcome("config", "wechat 40037: e", code="40037")),
        (47003, None, Outcome("config", "wechat 47003: e", code="47003")),
        (45009, None, Outcome("config", "wechat 45009: e", code="45009", retry_after=7 * 3600)),
        (45047, None, Outcome("retry", "wechat 45047: e", code="45047")),
    ],
)
def test_wechat_answers(errcode: int, msgid: int | None, expected: Outcome) -> None:
    assert classify_wechat(errcode, "e", msgid, "msg-1", NOW) == expected


@pytest.mark.parametrize(
    ("now", "seconds"),
    [
        (datetime(2025, 3, 3, 9, 0, tzinfo=UTC), 7 * 3600),
        (datetime(2025, 3, 3, 15, 59, 30, tzinfo=UTC), 30),
        (datetime(2025, 3, 3, 16, 0, tzinfo=UTC), 24 * 3600),
        (datetime(2025, 12, 31, 16, 0, 1, tzinfo=UTC), 24 * 3600 - 1),
    ],
)
def test_daily_quota_resets_at_midnight_in_china(now: datetime, seconds: float) -> None:
    assert seconds_until_quota_reset(now) == seconds


@pytest.mark.parametrize(
    ("errcode", "kind"),
    [(40013, "config"), (40125, "config"), (40164, "config"), (-1, "retry"), (45009, "config")],
)
def test_wechat_token_failures(errcode: int, kind: str) -> None:
    outcome = classify_wechat_token_failure(errcode, "e", NOW)

    assert (outcome.kind, outcome.code) == (kind, str(errcode))
    assert outcome.retry_after == (7 * 3600 if errcode == 45009 else None)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (500, Outcome("retry", "wechat HTTP 500", code="500")),
        (502, Outcome("retry", "wechat HTTP 502", code="502", retry_after=4.0)),
        (429, Outcome("retry", "wechat HTTP 429", code="429", retry_after=4.0)),
        (404, Outcome("config", "wechat HTTP 404", code="404")),
        (403, Outcome("config", "wechat HTTP 403", code="403")),
    ],
)
def test_http_failures_where_the_provider_always_answers_200(
    status: int, expected: Outcome
) -> None:
    retry_after = 4.0 if expected.retry_after else None

    assert classify_http_failure("wechat", status, retry_after) == expected


# ---------------------------------------------------------------------------------- in common


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("5", 5.0),
        (" 1.5 ", 1.5),
        ("0", 0.0),
        (None, None),
        ("-3", None),
        ("nan", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
    ],
)
def test_retry_after_header(header: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(header) == seconds


def test_transport_failures() -> None:
    assert transport_failure("sms", "refused", request_sent=False) == Outcome(
        "retry", "sms connect: refused"
    )
    assert transport_failure("sms", "timed out", request_sent=True) == Outcome(
        "unknown", "sms no answer: timed out"
    )
    assert transport_failure("wechat", "timed out", request_sent=True, resend_safe=True) == (
        Outcome("retry", "wechat no answer, resend is de-duplicated: timed out")
    )


def test_token_refresh_times() -> None:
    assert refresh_at(1000.0, 3600.0, 300.0) == 4300.0
    # A short-lived token is used for half its life.
    assert refresh_at(1000.0, 60.0, 300.0) == 1030.0
    assert wechat_refresh_margin(7200.0) == 720.0
    assert wechat_refresh_margin(1200.0) == 300.0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"sid": "SM1"}', {"sid": "SM1"}),
        (b"<html>Bad gateway</html>", None),
        (b"[1, 2]", None),
        (b"", None),
        (b"\xff\xfe", None),
    ],
)
def test_answer_object_reads_only_a_json_object(raw: bytes, expected: Any) -> None:
    assert answer_object(raw) == expected


def test_describe_error_names_the_exception() -> None:
    assert describe_error(TimeoutError("timed out")) == "TimeoutError: timed out"
    assert describe_error(TimeoutError()) == "TimeoutError"
