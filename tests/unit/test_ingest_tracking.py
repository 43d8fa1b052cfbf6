"""Signed link routes and SMS status callbacks of the ingest API, served in-process.

A recording publisher stands in for Kafka and a manual clock for time; links are signed with
the same settings the app reads.
"""

from __future__ import annotations

import dataclasses
import gzip
import re
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from pydantic import SecretStr

from services.ingest.app import create_app
from services.ingest.domain.calls import EncodedEvent
from services.ingest.fastpath import TrackingCalls
from services.ingest.settings import IngestSettings
from shared.clock import ManualClock
from shared.contracts import Event
from shared.kafka import DeliveryFailed
from shared.links import LinkClaims, LinkSigner, twilio_signature

NOW = datetime(2025, 3, 3, 12, 0, tzinfo=UTC)
PUBLIC = "https://links.example.com"
SETTINGS = IngestSettings(
    public_url=PUBLIC,
    link_secret=SecretStr("test-link-secret"),
    sms_auth_token=SecretStr("test-sms-token"),
    ingest_api_docs=True,
)
SIGNER = LinkSigner("test-link-secret", PUBLIC)
CLAIMS = LinkClaims(
    kind="unsubscribe",
    message_id="msg-1",
    contact_key="user-1",
    is_user=True,
    channel="email",
    template_id="weekly-digest",
    journey_id="newsletter",
    step_id="send-digest",
    issued_at=int(NOW.timestamp()),
)
SMS_CLAIMS = dataclasses.replace(CLAIMS, kind="sms_status", channel="sms", template_id="otp")
PIXEL_PREFIX = b"GIF89a\x01\x00\x01\x00"


class RecordingPublisher:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def publish(self, events: Sequence[EncodedEvent]) -> None:
        self.events.extend(Event.model_validate_json(e.value) for e in events)


class RefusingPublisher:
    def __init__(self) -> None:
        self.attempts = 0

    async def publish(self, events: Sequence[EncodedEvent]) -> None:
        self.attempts += 1
        raise DeliveryFailed("broker down")


def client_for(publisher: Any) -> httpx.AsyncClient:
    app = create_app(SETTINGS, publisher, ManualClock(NOW))
    # The client speaks to the app under its public URL, as the provider and mail clients do.
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=PUBLIC)


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
async def client(publisher: RecordingPublisher) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(publisher) as client:
        yield client


def path_of(url: str) -> str:
    assert url.startswith(PUBLIC)
    return url.removeprefix(PUBLIC)


def tampered(url: str) -> str:
    """The url with one character of its signature changed."""
    return url[:-1] + ("A" if url[-1] != "A" else "B")


def assert_rejected_token(response: httpx.Response) -> None:
    assert response.status_code == 400
    body = response.json()
    assert body["success"] is False
    assert body["field"] == "token"


def expected_event(name: str, message_id: str, properties: dict[str, Any]) -> Event:
    return Event(
        type="track",
        event=name,
        user_id="user-1",
        message_id=message_id,
        timestamp=NOW,
        received_at=NOW,
        properties={
            "message_id": "msg-1",
            "channel": "email",
            "template_id": "weekly-digest",
            "journey_id": "newsletter",
            "step_id": "send-digest",
            **properties,
        },
        source="waypost-links",
    )


# --- unsubscribe -----------------------------------------------------------------------------


async def test_a_one_click_post_publishes_one_unsubscribed_event(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    response = await client.post(
        path_of(SIGNER.unsubscribe_url(CLAIMS)),
        content="List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "You are unsubscribed" in response.text
    assert publisher.events == [
        expected_event("Unsubscribed", "unsubscribed:msg-1:email", {"method": "one_click"})
    ]


async def test_an_empty_post_unsubscribes_too(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    response = await client.post(path_of(SIGNER.unsubscribe_url(CLAIMS)))

    assert response.status_code == 200
    (event,) = publisher.events
    assert (event.event, event.properties["method"]) == ("Unsubscribed", "one_click")


async def test_an_anonymous_contact_unsubscribes_by_anonymous_id(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    anonymous = dataclasses.replace(CLAIMS, contact_key="anon-9", is_user=False, channel="sms")

    await client.post(path_of(SIGNER.unsubscribe_url(anonymous)))

    (event,) = publisher.events
    assert (event.user_id, event.anonymous_id) == (None, "anon-9")
    assert (event.message_id, event.properties["channel"]) == ("unsubscribed:msg-1:sms", "sms")


async def test_the_unsubscribe_page_asks_to_confirm_and_changes_nothing(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    url = SIGNER.unsubscribe_url(CLAIMS)

    response = await client.get(path_of(url))

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    form = re.search(r'<form method="post" action="([^"]+)">', response.text)
    assert form
    assert form.group(1) == url
    assert "<button" in response.text
    assert publisher.events == []


async def test_the_confirmation_form_post_unsubscribes_as_from_the_page(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    page = await client.get(path_of(SIGNER.unsubscribe_url(CLAIMS)))
    action = re.search(r'action="([^"]+)"', page.text)
    assert action

    response = await client.post(path_of(action.group(1)), data={"via": "page"})

    assert response.status_code == 200
    (event,) = publisher.events
    assert (event.message_id, event.properties["method"]) == ("unsubscribed:msg-1:email", "page")


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_tampered_unsubscribe_token_is_refused(
    client: httpx.AsyncClient, publisher: RecordingPublisher, method: str
) -> None:
    response = await client.request(method, path_of(tampered(SIGNER.unsubscribe_url(CLAIMS))))

    assert_rejected_token(response)
    assert publisher.events == []


async def test_an_open_token_does_not_unsubscribe(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    open_token = SIGNER.token(dataclasses.replace(CLAIMS, kind="open"))

    response = await client.post(f"/u/{open_token}")

    assert_rejected_token(response)
    assert "wrong kind" in response.json()["error"]
    assert publisher.events == []


async def test_an_unsubscribe_link_works_years_later(publisher: RecordingPublisher) -> None:
    old = dataclasses.replace(CLAIMS, issued_at=int((NOW - timedelta(days=3000)).timestamp()))

    async with client_for(publisher) as client:
        response = await client.post(path_of(SIGNER.unsubscribe_url(old)))

    assert response.status_code == 200
    assert len(publisher.events) == 1


# --- open pixel ------------------------------------------------------------------------------


async def test_the_pixel_is_a_gif_and_publishes_email_opened(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    response = await client.get(
        path_of(SIGNER.open_url(CLAIMS)), headers={"User-Agent": "Thunderbird/128"}
    )

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/gif"
    assert response.headers["cache-control"] == "no-store, max-age=0"
    assert response.content.startswith(PIXEL_PREFIX)
    assert response.content.endswith(b";")
    expected = expected_event("Email Opened", "opened:msg-1", {})
    assert publisher.events == [
        expected.model_copy(update={"context": {"userAgent": "Thunderbird/128"}})
    ]


async def test_the_pixel_is_served_when_publishing_fails() -> None:
    publisher = RefusingPublisher()

    async with client_for(publisher) as client:
        response = await client.get(path_of(SIGNER.open_url(CLAIMS)))
        metrics = (await client.get("/metrics")).text

    assert response.status_code == 200
    assert response.content.startswith(PIXEL_PREFIX)
    assert publisher.attempts == 1
    assert 'waypost_ingest_unrecorded_tracking_events_total{event="Email Opened"} 1.0' in metrics


async def test_an_expired_pixel_is_refused(publisher: RecordingPublisher) -> None:
    old = dataclasses.replace(CLAIMS, issued_at=int((NOW - timedelta(days=401)).timestamp()))

    async with client_for(publisher) as client:
        response = await client.get(path_of(SIGNER.open_url(old)))

    assert_rejected_token(response)
    assert "expired" in response.json()["error"]
    assert publisher.events == []


# --- clicks ----------------------------------------------------------------------------------

DESTINATION = "https://shop.example/sale?a=1&b=2"
CLICK = dataclasses.replace(CLAIMS, kind="click", link_id="cta", url=DESTINATION)


async def test_a_click_redirects_and_publishes_email_link_clicked(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    response = await client.get(
        path_of(SIGNER.click_url(CLICK)), headers={"User-Agent": "Mozilla/5.0"}
    )

    assert response.status_code == 302
    assert response.headers["location"] == DESTINATION
    expected = expected_event(
        "Email Link Clicked", "clicked:msg-1:cta", {"link_id": "cta", "url": DESTINATION}
    )
    assert publisher.events == [
        expected.model_copy(update={"context": {"userAgent": "Mozilla/5.0"}})
    ]


async def test_a_click_still_redirects_when_publishing_fails() -> None:
    publisher = RefusingPublisher()

    async with client_for(publisher) as client:
        response = await client.get(path_of(SIGNER.click_url(CLICK)))
        metrics = (await client.get("/metrics")).text

    assert response.status_code == 302
    assert response.headers["location"] == DESTINATION
    assert publisher.attempts == 1
    assert 'unrecorded_tracking_events_total{event="Email Link Clicked"} 1.0' in metrics


async def test_a_tampered_click_token_is_refused_without_a_redirect(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    response = await client.get(path_of(tampered(SIGNER.click_url(CLICK))))

    assert_rejected_token(response)
    assert "location" not in response.headers
    assert publisher.events == []


@pytest.mark.parametrize("url", ["javascript:alert(1)", "ftp://files.example/a", None])
async def test_a_click_to_a_non_web_destination_is_not_redirected(
    client: httpx.AsyncClient, publisher: RecordingPublisher, url: str | None
) -> None:
    token_url = SIGNER.click_url(dataclasses.replace(CLICK, url=url))

    response = await client.get(path_of(token_url))

    assert_rejected_token(response)
    assert "location" not in response.headers
    assert publisher.events == []


# --- SMS status callbacks --------------------------------------------------------------------

SMS_URL = SIGNER.sms_status_url(SMS_CLAIMS)


def callback(status: str, **extra: str) -> dict[str, str]:
    return {
        "AccountSid": "AC123",
        "MessageSid": "SM123",
        "MessageStatus": status,
        "To": "+48123456789",
        "From": "+48999000111",
        "ApiVersion": "2010-04-01",
        **extra,
    }


async def post_callback(
    client: httpx.AsyncClient,
    params: dict[str, str],
    *,
    url: str = SMS_URL,
    auth_token: str | None = None,
) -> httpx.Response:
    token = auth_token or SETTINGS.sms_auth_token.get_secret_value()
    signature = twilio_signature(url, params, token)
    return await client.post(path_of(url), data=params, headers={"X-Twilio-Signature": signature})


def sms_event(name: str, message_id: str, status: str, error_code: str | None) -> Event:
    return Event(
        type="track",
        event=name,
        user_id="user-1",
        message_id=message_id,
        timestamp=NOW,
        received_at=NOW,
        properties={
            "message_id": "msg-1",
            "channel": "sms",
            "template_id": "otp",
            "journey_id": "newsletter",
            "step_id": "send-digest",
            "provider_id": "SM123",
            "status": status,
            "error_code": error_code,
        },
        source="waypost-sms",
    )


async def test_a_delivered_callback_publishes_message_delivered(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    response = await post_callback(client, callback("delivered"))

    assert response.status_code == 204
    assert publisher.events == [
        sms_event("Message Delivered", "delivered:msg-1", "delivered", None)
    ]


@pytest.mark.parametrize("status", ["undelivered", "failed"])
async def test_an_undelivered_callback_publishes_message_undelivered_with_its_error(
    client: httpx.AsyncClient, publisher: RecordingPublisher, status: str
) -> None:
    response = await post_callback(client, callback(status, ErrorCode="30003"))

    assert response.status_code == 204
    assert publisher.events == [
        sms_event("Message Undelivered", "undelivered:msg-1", status, "30003")
    ]


@pytest.mark.parametrize("status", ["queued", "accepted", "sending", "sent", "scheduled"])
async def test_an_interim_status_is_acknowledged_without_an_event(
    client: httpx.AsyncClient, publisher: RecordingPublisher, status: str
) -> None:
    response = await post_callback(client, callback(status))

    assert response.status_code == 204
    assert publisher.events == []


async def test_a_callback_with_a_wrong_signature_is_forbidden(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    response = await post_callback(client, callback("delivered"), auth_token="another-token")

    assert response.status_code == 403
    assert response.json()["field"] == "X-Twilio-Signature"
    assert publisher.events == []


async def test_with_sms_off_every_callback_is_forbidden_even_one_signed_with_no_key(
    publisher: RecordingPublisher,
) -> None:
    """Without an auth token nothing can vouch for a callback: one signed with the empty key
    (which anyone can compute) is refused like any other."""
    off = SETTINGS.model_copy(update={"sms_auth_token": SecretStr("")})
    app = create_app(off, publisher, ManualClock(NOW))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=PUBLIC) as c:
        params = callback("delivered")
        signature = twilio_signature(SMS_URL, params, "")
        response = await c.post(
            path_of(SMS_URL), data=params, headers={"X-Twilio-Signature": signature}
        )

    assert response.status_code == 403
    assert response.json()["field"] == "X-Twilio-Signature"
    assert "WAYPOST_SMS_AUTH_TOKEN" in response.json()["error"]
    assert publisher.events == []


async def test_a_callback_without_a_signature_is_forbidden(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    response = await client.post(path_of(SMS_URL), data=callback("delivered"))

    assert response.status_code == 403
    assert "X-Twilio-Signature" in response.json()["error"]
    assert publisher.events == []


async def test_a_callback_whose_params_were_changed_is_forbidden(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    signature = twilio_signature(SMS_URL, callback("failed"), "test-sms-token")

    response = await client.post(
        path_of(SMS_URL), data=callback("delivered"), headers={"X-Twilio-Signature": signature}
    )

    assert response.status_code == 403
    assert publisher.events == []


async def test_the_signature_covers_the_query_string(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    response = await post_callback(client, callback("delivered"), url=SMS_URL + "?attempt=2")

    assert response.status_code == 204
    assert len(publisher.events) == 1


async def test_a_signed_callback_with_a_tampered_token_is_refused(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    response = await post_callback(client, callback("delivered"), url=tampered(SMS_URL))

    assert_rejected_token(response)
    assert publisher.events == []


async def test_a_multipart_callback_is_served_by_the_documented_route_alike(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    """Providers post form-encoded callbacks, which ingest serves straight from ASGI; any other
    body goes to the FastAPI route. Both check the same signature and publish the same event."""
    params = callback("undelivered", ErrorCode="30003")
    signature = twilio_signature(SMS_URL, params, "test-sms-token")
    headers = {"X-Twilio-Signature": signature}

    form = await client.post(path_of(SMS_URL), data=params, headers=headers)
    multipart = await client.post(
        path_of(SMS_URL), data=params, files={"note": ("note.txt", b"x")}, headers=headers
    )

    assert multipart.request.headers["content-type"].startswith("multipart/form-data")
    assert (form.status_code, multipart.status_code) == (204, 204)
    expected = sms_event("Message Undelivered", "undelivered:msg-1", "undelivered", "30003")
    assert publisher.events == [expected, expected]


async def test_form_callbacks_are_served_without_the_fastapi_app(
    publisher: RecordingPublisher,
) -> None:
    """The fast path takes form-encoded callbacks only: with the FastAPI app out of the way,
    those are still answered, and a multipart one reaches the app."""
    app = create_app(SETTINGS, publisher, ManualClock(NOW))
    assert isinstance(app, TrackingCalls)
    reached: list[str] = []

    async def elsewhere(scope: Any, _receive: Any, send: Any) -> None:
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 418, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app.fallback = elsewhere
    params = callback("delivered")
    headers = {"X-Twilio-Signature": twilio_signature(SMS_URL, params, "test-sms-token")}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=PUBLIC) as c:
        form = await c.post(path_of(SMS_URL), data=params, headers=headers)
        multipart = await c.post(
            path_of(SMS_URL), data=params, files={"note": ("note.txt", b"x")}, headers=headers
        )

    assert (form.status_code, multipart.status_code) == (204, 418)
    assert reached == [path_of(SMS_URL)]
    assert len(publisher.events) == 1


async def test_a_form_callback_reads_blank_and_percent_encoded_values_as_the_signer_did(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    params = callback("delivered", ErrorCode="", Body="zażółć & co=1+1")
    signature = twilio_signature(SMS_URL, params, "test-sms-token")

    response = await client.post(
        path_of(SMS_URL),
        content=urlencode(params),
        headers={
            "X-Twilio-Signature": signature,
            "Content-Type": "application/x-www-form-urlencoded; charset=utf-8",
        },
    )

    assert response.status_code == 204
    assert publisher.events == [
        sms_event("Message Delivered", "delivered:msg-1", "delivered", None)
    ]


async def test_a_gzipped_form_callback_is_inflated_and_a_gzipped_multipart_one_refused(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    params = callback("delivered")
    signature = twilio_signature(SMS_URL, params, "test-sms-token")
    form_type = "application/x-www-form-urlencoded"

    form = await client.post(
        path_of(SMS_URL),
        content=gzip.compress(urlencode(params).encode()),
        headers={
            "X-Twilio-Signature": signature,
            "Content-Type": form_type,
            "Content-Encoding": "gzip",
        },
    )
    multipart = await client.post(
        path_of(SMS_URL),
        data=params,
        files={"note": ("note.txt", b"x")},
        headers={"X-Twilio-Signature": signature, "Content-Encoding": "gzip"},
    )

    assert form.status_code == 204
    assert multipart.status_code == 415
    assert multipart.json()["field"] == "Content-Encoding"
    assert len(publisher.events) == 1


@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencodedX", "text/plain", "application/json"]
)
async def test_a_callback_that_is_not_a_form_is_not_read_as_one(
    client: httpx.AsyncClient, publisher: RecordingPublisher, content_type: str
) -> None:
    """Another media type is not parsed as a form: the signature then covers no parameters."""
    params = callback("delivered")
    signature = twilio_signature(SMS_URL, params, "test-sms-token")

    response = await client.post(
        path_of(SMS_URL),
        content=urlencode(params),
        headers={"X-Twilio-Signature": signature, "Content-Type": content_type},
    )

    assert response.status_code == 403
    assert publisher.events == []


async def test_a_form_callback_with_too_many_fields_is_a_bad_request(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    params = callback("delivered", **{f"f{n}": "x" for n in range(1000)})

    response = await post_callback(client, params)

    assert response.status_code == 400
    assert "fields" in response.json()["error"]
    assert publisher.events == []


async def test_a_callback_body_over_the_limit_is_refused_before_it_is_read(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    params = callback("delivered", Body="x" * SETTINGS.max_event_bytes)

    response = await post_callback(client, params)

    assert response.status_code == 413
    assert publisher.events == []


async def test_a_callback_url_with_a_further_segment_is_not_found(
    client: httpx.AsyncClient, publisher: RecordingPublisher
) -> None:
    url = SMS_URL + "/more"

    response = await post_callback(client, callback("delivered"), url=url)

    assert response.status_code == 404
    assert publisher.events == []


@pytest.mark.parametrize("params", [callback("read"), callback("")])
async def test_an_unknown_or_missing_status_is_a_bad_request_naming_it(
    client: httpx.AsyncClient, publisher: RecordingPublisher, params: dict[str, str]
) -> None:
    response = await post_callback(client, params)

    assert response.status_code == 400
    assert response.json()["field"] == "MessageStatus"
    assert publisher.events == []


async def test_a_callback_is_503_when_the_event_log_is_down() -> None:
    async with client_for(RefusingPublisher()) as client:
        response = await post_callback(client, callback("delivered"))

    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"


# --- the API document ------------------------------------------------------------------------


async def test_the_openapi_document_lists_the_link_routes(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]

    assert set(paths["/u/{token}"]) == {"get", "post"}
    assert set(paths["/o/{token}.gif"]) == {"get"}
    assert set(paths["/c/{token}"]) == {"get"}
    assert set(paths["/v1/sms/status/{token}"]) == {"post"}
    assert paths["/v1/sms/status/{token}"]["post"]["summary"]
