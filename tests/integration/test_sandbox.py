"""The provider sandbox over real sockets: SMS, FCM, WeChat, email, email events and injected
failures.

Every test talks HTTP (or SMTP) to a sandbox process started by tests/integration/conftest.py;
nothing here imports the sandbox's code, so the tests check the wire protocol a provider client
sees. Waiting is always a poll with a deadline.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import smtplib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qsl

import aiosmtplib
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.integration.conftest import SandboxInfo, running_sandbox
from tests.waiting import wait_for as poll

T = TypeVar("T")
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


def wait_for(condition: Callable[[], T | None], *, timeout: float = 10.0, what: str = "") -> T:
    """The end-to-end tests' poll with a deadline, with this file's shorter default."""
    return poll(condition, timeout=timeout, what=what or "condition")


# -- a status-callback receiver ---------------------------------------------------------------


class CallbackReceiver(BaseHTTPRequestHandler):
    """Records every POST (path with query, headers, form params) and answers 200."""

    seen: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length).decode()
        CallbackReceiver.seen.append(
            {
                "path": self.path,
                "headers": {name.lower(): value for name, value in self.headers.items()},
                "params": dict(parse_qsl(body, keep_blank_values=True)),
            }
        )
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        return


@pytest.fixture(scope="module")
def receiver() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), CallbackReceiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def callbacks_for(sid: str) -> list[dict[str, Any]]:
    return [hit for hit in CallbackReceiver.seen if hit["params"].get("MessageSid") == sid]


def expected_signature(auth_token: str, url: str, params: dict[str, str]) -> str:
    """Twilio's documented scheme, written out independently of the sandbox's code."""
    signed = url
    for name in sorted(params):
        signed += name + params[name]
    mac = hmac.new(auth_token.encode("utf-8"), signed.encode("utf-8"), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode("ascii")


# -- SMS ---------------------------------------------------------------------------------------


def send_sms(
    sandbox: SandboxInfo,
    to: str = "+15551230001",
    *,
    auth: tuple[str, str] | None = None,
    account: str | None = None,
    timeout: float = 10.0,
    **fields: str,
) -> httpx.Response:
    form = {"To": to, "From": "+15550009999", "Body": "Your code is 1234", **fields}
    form = {name: value for name, value in form.items() if value != ""}
    account = account or sandbox.sms_account_sid
    return httpx.post(
        f"{sandbox.http_url}/2010-04-01/Accounts/{account}/Messages.json",
        data=form,
        auth=auth or (sandbox.sms_account_sid, sandbox.sms_auth_token),
        timeout=timeout,
    )


def test_sms_is_queued_stored_and_reported_through_signed_callbacks(
    clean_sandbox: SandboxInfo, receiver: str
) -> None:
    callback_url = f"{receiver}/sms/status?run=signed&x=1"
    answer = send_sms(clean_sandbox, "+15551230001", StatusCallback=callback_url)

    assert answer.status_code == 201
    message = answer.json()
    sid = message["sid"]
    assert sid.startswith("SM")
    assert len(sid) == 34
    assert all(char in "0123456789abcdef" for char in sid[2:])
    assert message["status"] == "queued"
    assert message["to"] == "+15551230001"
    assert message["from"] == "+15550009999"
    assert message["body"] == "Your code is 1234"
    assert message["account_sid"] == clean_sandbox.sms_account_sid
    assert message["error_code"] is None
    assert message["date_created"]

    [stored] = clean_sandbox.messages(channel="sms", to="+15551230001")
    assert stored["from"] == "+15550009999"
    assert stored["body"] == "Your code is 1234"
    assert stored["sid"] == sid
    assert stored["status_callback"] == callback_url

    hits = wait_for(
        lambda: [h for h in callbacks_for(sid) if h["params"]["MessageStatus"] == "delivered"],
        what="a delivered callback",
    )
    final = hits[-1]
    assert final["path"] == "/sms/status?run=signed&x=1"
    params = final["params"]
    assert params["MessageSid"] == sid
    assert params["AccountSid"] == clean_sandbox.sms_account_sid
    assert params["From"] == "+15550009999"
    assert params["To"] == "+15551230001"
    assert params["ApiVersion"] == "2010-04-01"
    assert "ErrorCode" not in params
    for hit in callbacks_for(sid):
        signature = expected_signature(clean_sandbox.sms_auth_token, callback_url, hit["params"])
        assert hit["headers"]["x-twilio-signature"] == signature
    assert [h["params"]["MessageStatus"] for h in callbacks_for(sid)][-1] == "delivered"

    # The outbox record shows the attempts and the receiver's answers.
    stored = wait_for(
        lambda: next(
            (
                record
                for record in clean_sandbox.messages("sms", "+15551230001")
                if record["callbacks"]
                and record["callbacks"][-1]["params"]["MessageStatus"] == "delivered"
            ),
            None,
        ),
        what="callbacks recorded on the outbox record",
    )
    assert stored["callbacks"][-1]["url"] == callback_url
    assert stored["callbacks"][-1]["answer_status"] == 200


def test_the_outbox_lists_the_recipients_starting_with_a_prefix(
    clean_sandbox: SandboxInfo,
) -> None:
    for number in ("+15551230001", "+15551230002", "+15559990001"):
        assert send_sms(clean_sandbox, number).status_code == 201
    answer = httpx.get(
        f"{clean_sandbox.http_url}/messages",
        params={"channel": "sms", "to_prefix": "+1555123"},
        timeout=10,
    )
    assert answer.status_code == 200
    body = answer.json()
    assert body["count"] == 2
    assert sorted(m["to"][0] for m in body["messages"]) == ["+15551230001", "+15551230002"]


def test_sms_resource_follows_the_message_to_delivered(clean_sandbox: SandboxInfo) -> None:
    sid = send_sms(clean_sandbox, "+15551230002").json()["sid"]
    url = (
        f"{clean_sandbox.http_url}/2010-04-01/Accounts/{clean_sandbox.sms_account_sid}"
        f"/Messages/{sid}.json"
    )
    auth = (clean_sandbox.sms_account_sid, clean_sandbox.sms_auth_token)

    resource = wait_for(
        lambda: (r := httpx.get(url, auth=auth).json())["status"] == "delivered" and r,
        what="the message resource reaching delivered",
    )
    assert resource["sid"] == sid
    assert resource["to"] == "+15551230002"
    assert httpx.get(url.replace(sid, "SM" + "0" * 32), auth=auth).status_code == 404


def test_sms_messaging_service_sid_stands_in_for_from(clean_sandbox: SandboxInfo) -> None:
    answer = send_sms(
        clean_sandbox, "+15551230003", From="", MessagingServiceSid="MG0123456789abcdef"
    )

    assert answer.status_code == 201
    [stored] = clean_sandbox.messages("sms", "+15551230003")
    assert stored["from"] == "MG0123456789abcdef"


@pytest.mark.parametrize(
    ("auth", "account"),
    [
        (("ACwaypostsandbox", "wrong-token"), None),
        (("ACsomeoneelse", "waypost-sandbox-sms-token"), None),
        # Outside ASCII: a 401 like any other wrong credentials, not a server error.
        (("ACwaypostsandbox", "mot-de-passe-refusé"), None),
    ],
)
def test_sms_refuses_bad_credentials(
    clean_sandbox: SandboxInfo, auth: tuple[str, str], account: str | None
) -> None:
    answer = send_sms(clean_sandbox, auth=auth, account=account)

    assert answer.status_code == 401
    assert answer.json()["code"] == 20003
    assert answer.json()["message"] == "Authenticate"
    assert answer.json()["status"] == 401
    assert clean_sandbox.messages("sms") == []


def test_sms_refuses_a_missing_authorization_and_a_foreign_account(
    clean_sandbox: SandboxInfo,
) -> None:
    anonymous = httpx.post(
        f"{clean_sandbox.http_url}/2010-04-01/Accounts/{clean_sandbox.sms_account_sid}"
        "/Messages.json",
        data={"To": "+15551230004", "From": "+15550009999", "Body": "hi"},
    )
    assert anonymous.status_code == 401
    assert anonymous.json()["code"] == 20003

    foreign = send_sms(clean_sandbox, account="ACanotheraccount")
    assert foreign.status_code == 404
    assert clean_sandbox.messages("sms") == []


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"To": "5551230005"}, 21211),
        ({"To": "+0551230005"}, 21211),
        ({"To": "+15551230005", "Body": ""}, 21602),
        ({"To": "+15551230005", "From": ""}, 21603),
    ],
)
def test_sms_validates_like_twilio(
    clean_sandbox: SandboxInfo, fields: dict[str, str], code: int
) -> None:
    to = fields.pop("To")
    answer = send_sms(clean_sandbox, to, **fields)

    assert answer.status_code == 400
    assert answer.json()["code"] == code
    assert answer.json()["status"] == 400
    if code == 21211:
        assert to in answer.json()["message"]
    assert clean_sandbox.messages("sms") == []


def test_sms_429_rule_answers_with_retry_after_then_is_used_up(clean_sandbox: SandboxInfo) -> None:
    clean_sandbox.fail(channel="sms", recipient="+15551230006", error="429", retry_after=7, times=2)

    for _ in range(2):
        answer = send_sms(clean_sandbox, "+15551230006")
        assert answer.status_code == 429
        assert answer.json()["code"] == 20429
        assert answer.json()["message"] == "Too Many Requests"
        assert answer.headers["Retry-After"] == "7"
    assert clean_sandbox.messages("sms") == []
    assert clean_sandbox.failures() == []

    assert send_sms(clean_sandbox, "+15551230006").status_code == 201
    assert len(clean_sandbox.messages("sms")) == 1


def test_failure_rules_apply_only_to_their_recipient_and_count_down(
    clean_sandbox: SandboxInfo,
) -> None:
    clean_sandbox.fail(channel="sms", recipient="+15551230007", error="503", times=3)

    assert send_sms(clean_sandbox, "+15551230008").status_code == 201
    assert send_sms(clean_sandbox, "+15551230007").status_code == 503
    [rule] = clean_sandbox.failures()
    assert rule["times"] == 2


@pytest.mark.parametrize(("error", "status"), [("500", 500), ("503", 503)])
def test_sms_server_errors_store_nothing(
    clean_sandbox: SandboxInfo, error: str, status: int
) -> None:
    clean_sandbox.fail(channel="sms", recipient="+15551230009", error=error)

    answer = send_sms(clean_sandbox, "+15551230009")

    assert answer.status_code == status
    assert answer.json()["status"] == status
    assert clean_sandbox.messages("sms") == []


@pytest.mark.parametrize("code", ["21211", "21610", "21614"])
def test_sms_permanent_rejections(clean_sandbox: SandboxInfo, code: str) -> None:
    clean_sandbox.fail(channel="sms", recipient="+15551230010", error=code)

    answer = send_sms(clean_sandbox, "+15551230010")

    assert answer.status_code == 400
    assert answer.json()["code"] == int(code)
    if code == "21610":
        assert answer.json()["message"] == "Attempt to send to unsubscribed recipient"
    assert clean_sandbox.messages("sms") == []


@pytest.mark.parametrize(
    ("code", "final"),
    [
        ("30001", "failed"),
        ("30003", "undelivered"),
        ("30006", "undelivered"),
        ("30007", "undelivered"),
    ],
)
def test_sms_carrier_failures_are_accepted_then_reported_by_callback(
    clean_sandbox: SandboxInfo, receiver: str, code: str, final: str
) -> None:
    clean_sandbox.fail(channel="sms", recipient="+15551230011", error=code)

    answer = send_sms(clean_sandbox, "+15551230011", StatusCallback=f"{receiver}/sms/{code}")

    assert answer.status_code == 201
    assert answer.json()["status"] == "queued"
    sid = answer.json()["sid"]
    assert len(clean_sandbox.messages("sms", "+15551230011")) == 1
    hits = wait_for(
        lambda: [h for h in callbacks_for(sid) if h["params"]["MessageStatus"] == final],
        what=f"a {final} callback",
    )
    assert hits[0]["params"]["ErrorCode"] == code
    assert "delivered" not in [h["params"]["MessageStatus"] for h in callbacks_for(sid)]


def test_sms_timeout_stores_the_message_then_holds_the_answer(clean_sandbox: SandboxInfo) -> None:
    clean_sandbox.fail(channel="sms", recipient="+15551230012", error="timeout", seconds=2)

    with pytest.raises(httpx.ReadTimeout):
        send_sms(clean_sandbox, "+15551230012", timeout=0.5)

    [stored] = clean_sandbox.wait_messages("sms", "+15551230012")
    assert stored["body"] == "Your code is 1234"


def test_a_listing_rule_fails_the_numbers_listing_not_its_sends(
    clean_sandbox: SandboxInfo,
) -> None:
    number = "+15551230019"
    clean_sandbox.fail(channel="sms", recipient=number, error="500", times=1, action="list")
    assert send_sms(clean_sandbox, number).status_code == 201  # the rule is for listings only
    url = f"{clean_sandbox.http_url}/2010-04-01/Accounts/{clean_sandbox.sms_account_sid}"
    auth = (clean_sandbox.sms_account_sid, clean_sandbox.sms_auth_token)

    def listing() -> httpx.Response:
        return httpx.get(f"{url}/Messages.json", params={"To": number}, auth=auth, timeout=10)

    refused = listing()
    assert refused.status_code == 500
    assert refused.json()["code"] == 20500
    listed = listing()  # used up: the next listing answers
    assert listed.status_code == 200
    assert [m["to"] for m in listed.json()["messages"]] == [number]


def test_sms_slow_answers_normally_after_the_delay(clean_sandbox: SandboxInfo) -> None:
    clean_sandbox.fail(channel="sms", recipient="+15551230013", error="slow", seconds=0.6)

    started = time.monotonic()
    answer = send_sms(clean_sandbox, "+15551230013")

    assert answer.status_code == 201
    assert time.monotonic() - started >= 0.6
    assert len(clean_sandbox.messages("sms", "+15551230013")) == 1


def test_an_unreachable_callback_is_recorded_and_the_sandbox_carries_on(
    clean_sandbox: SandboxInfo,
) -> None:
    dead = "http://127.0.0.1:9/closed"  # the discard port: nothing listens
    send_sms(clean_sandbox, "+15551230014", StatusCallback=dead)

    stored = wait_for(
        lambda: next((r for r in clean_sandbox.messages("sms") if len(r["callbacks"]) >= 1), None),
        what="a failed callback attempt on the record",
    )
    assert stored["callbacks"][0]["answer_status"] is None
    assert stored["callbacks"][0]["url"] == dead
    assert send_sms(clean_sandbox, "+15551230015").status_code == 201


# -- FCM ---------------------------------------------------------------------------------------


def service_account(sandbox: SandboxInfo) -> dict[str, Any]:
    account: dict[str, Any] = json.loads(sandbox.fcm_service_account_file.read_text())
    return account


def assertion(sandbox: SandboxInfo, *, key: str | None = None, **claims: Any) -> str:
    account = service_account(sandbox)
    now = int(time.time())
    payload = {
        "iss": account["client_email"],
        "scope": FCM_SCOPE,
        "aud": account["token_uri"],
        "iat": now,
        "exp": now + 3600,
        **claims,
    }
    payload = {name: value for name, value in payload.items() if value is not None}
    return jwt.encode(
        payload,
        key or account["private_key"],
        algorithm="RS256",
        headers={"kid": account["private_key_id"]},
    )


def exchange(
    sandbox: SandboxInfo, jwt_assertion: str, grant_type: str = JWT_BEARER
) -> httpx.Response:
    return httpx.post(
        service_account(sandbox)["token_uri"],
        data={"grant_type": grant_type, "assertion": jwt_assertion},
    )


def fcm_token(sandbox: SandboxInfo) -> str:
    answer = exchange(sandbox, assertion(sandbox))
    assert answer.status_code == 200, answer.text
    token: str = answer.json()["access_token"]
    return token


def push(
    sandbox: SandboxInfo,
    access_token: str | None,
    message: dict[str, Any] | None = None,
    *,
    project: str | None = None,
    timeout: float = 10.0,
    **body: Any,
) -> httpx.Response:
    headers = {} if access_token is None else {"Authorization": f"Bearer {access_token}"}
    default = {
        "token": "device-token-1",
        "notification": {"title": "Back in stock", "body": "Your shoes are back"},
        "data": {"product": "sku-42"},
    }
    return httpx.post(
        f"{sandbox.http_url}/v1/projects/{project or sandbox.fcm_project}/messages:send",
        json={"message": default if message is None else message, **body},
        headers=headers,
        timeout=timeout,
    )


def fcm_error_code(answer: httpx.Response) -> str:
    details = answer.json()["error"]["details"]
    [fcm] = [d for d in details if d["@type"].endswith("google.firebase.fcm.v1.FcmError")]
    code: str = fcm["errorCode"]
    return code


def test_the_service_account_file_is_google_shaped(sandbox: SandboxInfo) -> None:
    account = service_account(sandbox)

    assert account["type"] == "service_account"
    assert account["project_id"] == sandbox.fcm_project == "waypost-sandbox"
    assert account["client_email"] == "dispatcher@waypost-sandbox.iam.gserviceaccount.com"
    assert account["private_key"].startswith("-----BEGIN PRIVATE KEY-----")
    assert account["token_uri"] == f"{sandbox.http_url}/token"
    assert account["private_key_id"]
    assert account["client_id"]


def test_fcm_token_exchange_and_send(clean_sandbox: SandboxInfo) -> None:
    answer = exchange(clean_sandbox, assertion(clean_sandbox))

    assert answer.status_code == 200
    grant = answer.json()
    assert grant["access_token"].startswith("ya29.")
    assert grant["expires_in"] == 3600
    assert grant["token_type"] == "Bearer"

    sent = push(clean_sandbox, grant["access_token"])
    assert sent.status_code == 200
    name = sent.json()["name"]
    assert name.startswith(f"projects/{clean_sandbox.fcm_project}/messages/")
    [stored] = clean_sandbox.messages("push", "device-token-1")
    assert stored["title"] == "Back in stock"
    assert stored["body"] == "Your shoes are back"
    assert stored["data"] == {"product": "sku-42"}
    assert stored["name"] == name


def test_fcm_validate_only_stores_nothing(clean_sandbox: SandboxInfo) -> None:
    answer = push(clean_sandbox, fcm_token(clean_sandbox), validate_only=True)

    assert answer.status_code == 200
    assert clean_sandbox.messages("push") == []


@pytest.mark.parametrize(
    "problem",
    ["wrong-key", "wrong-aud", "wrong-iss", "no-scope", "too-long", "expired", "garbage"],
)
def test_fcm_token_endpoint_refuses_a_bad_jwt(clean_sandbox: SandboxInfo, problem: str) -> None:
    now = int(time.time())
    if problem == "wrong-key":  # signed by a key the sandbox never saw
        pem = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            .private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            .decode()
        )
        token = assertion(clean_sandbox, key=pem)
    elif problem == "wrong-aud":
        token = assertion(clean_sandbox, aud="https://oauth2.googleapis.com/token")
    elif problem == "wrong-iss":
        token = assertion(clean_sandbox, iss="intruder@example.iam.gserviceaccount.com")
    elif problem == "no-scope":
        token = assertion(clean_sandbox, scope="https://www.googleapis.com/auth/userinfo.email")
    elif problem == "too-long":
        token = assertion(clean_sandbox, iat=now, exp=now + 7200)
    elif problem == "expired":
        token = assertion(clean_sandbox, iat=now - 7200, exp=now - 3600)
    else:
        token = "not.a.jwt"

    answer = exchange(clean_sandbox, token)

    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_grant"
    assert answer.json()["error_description"]


def test_fcm_token_endpoint_refuses_another_grant_type(clean_sandbox: SandboxInfo) -> None:
    answer = exchange(clean_sandbox, assertion(clean_sandbox), grant_type="client_credentials")

    assert answer.status_code == 400
    assert answer.json()["error"] == "unsupported_grant_type"


@pytest.mark.parametrize("bearer", [None, "ya29.never-issued"])
def test_fcm_send_needs_a_live_access_token(clean_sandbox: SandboxInfo, bearer: str | None) -> None:
    answer = push(clean_sandbox, bearer)

    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == 401
    assert answer.json()["error"]["status"] == "UNAUTHENTICATED"
    if bearer is not None:
        assert (
            answer.json()["error"]["message"] == "Request had invalid authentication credentials."
        )
    assert clean_sandbox.messages("push") == []


def test_fcm_revoke_forces_a_new_token(clean_sandbox: SandboxInfo) -> None:
    old = fcm_token(clean_sandbox)
    assert push(clean_sandbox, old).status_code == 200

    httpx.post(f"{clean_sandbox.http_url}/control/fcm/revoke").raise_for_status()

    assert push(clean_sandbox, old).status_code == 401
    assert push(clean_sandbox, fcm_token(clean_sandbox)).status_code == 200
    assert len(clean_sandbox.messages("push")) == 2


def test_fcm_send_to_another_project_is_denied(clean_sandbox: SandboxInfo) -> None:
    answer = push(clean_sandbox, fcm_token(clean_sandbox), project="someone-elses-project")

    assert answer.status_code == 403
    assert answer.json()["error"]["status"] == "PERMISSION_DENIED"
    assert clean_sandbox.messages("push") == []


@pytest.mark.parametrize(
    "message",
    [
        {"notification": {"title": "no token"}},
        {"token": "device-token-1", "data": {"count": 3}},
        {"token": "device-token-1", "data": {"blob": "x" * 5000}},
        {"token": "device-token-1", "unknown_field": True},
    ],
    ids=["no-token", "non-string-data", "too-big", "unknown-field"],
)
def test_fcm_refuses_invalid_messages(clean_sandbox: SandboxInfo, message: dict[str, Any]) -> None:
    answer = push(clean_sandbox, fcm_token(clean_sandbox), message)

    assert answer.status_code == 400
    assert answer.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert fcm_error_code(answer) == "INVALID_ARGUMENT"
    assert clean_sandbox.messages("push") == []


def test_fcm_refuses_a_body_that_is_not_json(clean_sandbox: SandboxInfo) -> None:
    answer = httpx.post(
        f"{clean_sandbox.http_url}/v1/projects/{clean_sandbox.fcm_project}/messages:send",
        content=b"{not json",
        headers={
            "Authorization": f"Bearer {fcm_token(clean_sandbox)}",
            "Content-Type": "application/json",
        },
    )

    assert answer.status_code == 400
    assert fcm_error_code(answer) == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("error", "status", "google_status", "fcm_code"),
    [
        ("UNREGISTERED", 404, "NOT_FOUND", "UNREGISTERED"),
        ("INVALID_ARGUMENT", 400, "INVALID_ARGUMENT", "INVALID_ARGUMENT"),
        ("SENDER_ID_MISMATCH", 403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH"),
        ("THIRD_PARTY_AUTH_ERROR", 401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR"),
        ("QUOTA_EXCEEDED", 429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"),
        ("UNAVAILABLE", 503, "UNAVAILABLE", "UNAVAILABLE"),
        ("INTERNAL", 500, "INTERNAL", "INTERNAL"),
        ("429", 429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"),
        ("500", 500, "INTERNAL", "INTERNAL"),
        ("503", 503, "UNAVAILABLE", "UNAVAILABLE"),
    ],
)
def test_fcm_error_rules_map_to_google_errors(
    clean_sandbox: SandboxInfo, error: str, status: int, google_status: str, fcm_code: str
) -> None:
    clean_sandbox.fail(channel="push", recipient="device-token-err", error=error, times=1)
    message = {"token": "device-token-err", "notification": {"title": "t", "body": "b"}}

    answer = push(clean_sandbox, fcm_token(clean_sandbox), message)

    assert answer.status_code == status
    assert answer.json()["error"]["code"] == status
    assert answer.json()["error"]["status"] == google_status
    assert fcm_error_code(answer) == fcm_code
    assert clean_sandbox.messages("push") == []
    assert push(clean_sandbox, fcm_token(clean_sandbox), message).status_code == 200


def test_fcm_quota_exceeded_carries_retry_after(clean_sandbox: SandboxInfo) -> None:
    clean_sandbox.fail(
        channel="push", recipient="device-token-1", error="QUOTA_EXCEEDED", retry_after=60
    )

    answer = push(clean_sandbox, fcm_token(clean_sandbox))

    assert answer.status_code == 429
    assert answer.headers["Retry-After"] == "60"


def test_fcm_timeout_stores_the_message_then_holds_the_answer(clean_sandbox: SandboxInfo) -> None:
    token = fcm_token(clean_sandbox)
    clean_sandbox.fail(channel="push", recipient="device-token-1", error="timeout", seconds=2)

    with pytest.raises(httpx.ReadTimeout):
        push(clean_sandbox, token, timeout=0.5)

    clean_sandbox.wait_messages("push", "device-token-1")


# -- WeChat ------------------------------------------------------------------------------------


def wechat_token_answer(
    sandbox: SandboxInfo, appid: str | None = None, secret: str | None = None
) -> dict[str, Any]:
    answer = httpx.get(
        f"{sandbox.http_url}/cgi-bin/token",
        params={
            "grant_type": "client_credential",
            "appid": appid or sandbox.wechat_app_id,
            "secret": secret or sandbox.wechat_app_secret,
        },
    )
    assert answer.status_code == 200
    body: dict[str, Any] = answer.json()
    return body


def wechat_token(sandbox: SandboxInfo) -> str:
    token: str = wechat_token_answer(sandbox)["access_token"]
    return token


def template(
    sandbox: SandboxInfo, token: str, timeout: float = 10.0, **overrides: Any
) -> dict[str, Any]:
    body = {
        "touser": "openid-ada",
        "template_id": "tpl-order",
        "url": "https://shop.example/orders/42",
        "data": {"order": {"value": "42"}, "status": {"value": "shipped", "color": "#173177"}},
        **overrides,
    }
    body = {name: value for name, value in body.items() if value is not None}
    answer = httpx.post(
        f"{sandbox.http_url}/cgi-bin/message/template/send",
        params={"access_token": token},
        json=body,
        timeout=timeout,
    )
    assert answer.status_code == 200
    result: dict[str, Any] = answer.json()
    return result


def custom(sandbox: SandboxInfo, token: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = httpx.post(
        f"{sandbox.http_url}/cgi-bin/message/custom/send",
        params={"access_token": token},
        json=body,
    )
    assert answer.status_code == 200
    result: dict[str, Any] = answer.json()
    return result


def test_wechat_token_is_issued_and_counted(clean_sandbox: SandboxInfo) -> None:
    first = wechat_token_answer(clean_sandbox)

    assert first["expires_in"] == 7200
    assert first["access_token"]
    status = clean_sandbox.wechat_status()
    assert status["tokens_issued"] == 1
    assert 7100 <= status["current_token_expires_in"] <= 7200


@pytest.mark.parametrize(
    ("appid", "secret", "errcode", "errmsg"),
    [
        ("wxsomeoneelse", None, 40013, "invalid appid"),
        (None, "wrong-secret", 40125, "invalid appsecret"),
    ],
)
def test_wechat_token_refuses_bad_credentials(
    clean_sandbox: SandboxInfo, appid: str | None, secret: str | None, errcode: int, errmsg: str
) -> None:
    answer = wechat_token_answer(clean_sandbox, appid, secret)

    assert answer == {"errcode": errcode, "errmsg": errmsg}
    assert clean_sandbox.wechat_status()["tokens_issued"] == 0


def test_wechat_previous_token_stays_valid_during_the_overlap(clean_sandbox: SandboxInfo) -> None:
    old = wechat_token(clean_sandbox)
    new = wechat_token(clean_sandbox)

    assert old != new
    assert template(clean_sandbox, old)["errcode"] == 0
    assert template(clean_sandbox, new)["errcode"] == 0
    assert clean_sandbox.wechat_status()["tokens_issued"] == 2


def test_wechat_stable_token_returns_the_current_one_unless_forced(
    clean_sandbox: SandboxInfo,
) -> None:
    def stable(force: bool) -> dict[str, Any]:
        answer = httpx.post(
            f"{clean_sandbox.http_url}/cgi-bin/stable_token",
            json={
                "grant_type": "client_credential",
                "appid": clean_sandbox.wechat_app_id,
                "secret": clean_sandbox.wechat_app_secret,
                "force_refresh": force,
            },
        )
        body: dict[str, Any] = answer.json()
        return body

    first = stable(False)
    again = stable(False)
    forced = stable(True)

    assert first["access_token"] == again["access_token"]
    assert 0 < again["expires_in"] <= 7200
    assert forced["access_token"] != first["access_token"]
    assert clean_sandbox.wechat_status()["tokens_issued"] == 2
    assert template(clean_sandbox, forced["access_token"])["errcode"] == 0


def test_wechat_template_send_is_stored(clean_sandbox: SandboxInfo) -> None:
    answer = template(clean_sandbox, wechat_token(clean_sandbox), client_msg_id="order-42-shipped")

    assert answer["errcode"] == 0
    assert answer["errmsg"] == "ok"
    assert isinstance(answer["msgid"], int)
    [stored] = clean_sandbox.messages("wechat", "openid-ada")
    assert stored["kind"] == "template"
    assert stored["template_id"] == "tpl-order"
    assert stored["url"] == "https://shop.example/orders/42"
    assert stored["data"]["status"] == {"value": "shipped", "color": "#173177"}
    assert stored["client_msg_id"] == "order-42-shipped"
    assert stored["msgid"] == answer["msgid"]


def test_wechat_repeated_client_msg_id_is_sent_once(clean_sandbox: SandboxInfo) -> None:
    token = wechat_token(clean_sandbox)

    first = template(clean_sandbox, token, client_msg_id="welcome-ada")
    second = template(clean_sandbox, token, client_msg_id="welcome-ada")
    other = template(clean_sandbox, token, client_msg_id="welcome-ada-2")

    assert second == first
    assert other["msgid"] != first["msgid"]
    assert len(clean_sandbox.messages("wechat")) == 2


@pytest.mark.parametrize(
    ("overrides", "errcode"),
    [
        ({"template_id": "tpl-unknown"}, 40037),
        ({"data": {"order": "42"}}, 47003),
        ({"data": {"order": {"value": 42}}}, 47003),
        ({"data": ["order"]}, 47003),
    ],
)
def test_wechat_template_send_validates(
    clean_sandbox: SandboxInfo, overrides: dict[str, Any], errcode: int
) -> None:
    answer = template(clean_sandbox, wechat_token(clean_sandbox), **overrides)

    assert answer["errcode"] == errcode
    assert clean_sandbox.messages("wechat") == []


@pytest.mark.parametrize(("token", "errcode"), [("never-issued", 40001), ("", 41001)])
def test_wechat_send_needs_a_valid_token(
    clean_sandbox: SandboxInfo, token: str, errcode: int
) -> None:
    answer = template(clean_sandbox, token)

    assert answer["errcode"] == errcode
    if errcode == 40001:
        assert answer["errmsg"] == "invalid credential, access_token is invalid or not latest"
    assert clean_sandbox.messages("wechat") == []


def test_wechat_news_and_text_customer_service_messages(clean_sandbox: SandboxInfo) -> None:
    token = wechat_token(clean_sandbox)
    article = {
        "title": "New arrivals",
        "description": "Spring collection",
        "url": "https://shop.example/spring",
        "picurl": "https://shop.example/spring.jpg",
    }

    news = custom(
        clean_sandbox,
        token,
        {"touser": "openid-bob", "msgtype": "news", "news": {"articles": [article]}},
    )
    text = custom(
        clean_sandbox, token, {"touser": "openid-bob", "msgtype": "text", "text": {"content": "Hi"}}
    )

    assert news == {"errcode": 0, "errmsg": "ok"}
    assert text == {"errcode": 0, "errmsg": "ok"}
    stored_news, stored_text = clean_sandbox.messages("wechat", "openid-bob")
    assert stored_news["kind"] == "news"
    assert {name: stored_news[name] for name in article} == article
    assert stored_text["kind"] == "text"
    assert stored_text["content"] == "Hi"


def test_wechat_custom_send_refuses_an_unknown_msgtype(clean_sandbox: SandboxInfo) -> None:
    answer = custom(clean_sandbox, wechat_token(clean_sandbox), {"touser": "o", "msgtype": "x"})

    assert answer["errcode"] == 40008
    assert clean_sandbox.messages("wechat") == []


@pytest.mark.parametrize(
    ("error", "errcode"),
    [
        ("-1", -1),
        ("40001", 40001),
        ("42001", 42001),
        ("40003", 40003),
        ("43004", 43004),
        ("40037", 40037),
        ("47003", 47003),
        ("45009", 45009),
        ("45015", 45015),
        ("429", -1),
        ("500", -1),
        ("503", -1),
    ],
)
def test_wechat_errcode_rules(clean_sandbox: SandboxInfo, error: str, errcode: int) -> None:
    token = wechat_token(clean_sandbox)
    clean_sandbox.fail(channel="wechat", recipient="openid-err", error=error, times=2)

    templated = template(clean_sandbox, token, touser="openid-err")
    texted = custom(
        clean_sandbox, token, {"touser": "openid-err", "msgtype": "text", "text": {"content": "x"}}
    )

    for answer in (templated, texted):
        assert answer["errcode"] == errcode
        assert isinstance(answer["errmsg"], str)
        assert answer["errmsg"]
        assert "msgid" not in answer
    assert clean_sandbox.messages("wechat") == []
    assert template(clean_sandbox, token, touser="openid-err")["errcode"] == 0


def test_wechat_timeout_stores_then_holds_and_a_retry_is_not_a_duplicate(
    clean_sandbox: SandboxInfo,
) -> None:
    token = wechat_token(clean_sandbox)
    clean_sandbox.fail(
        channel="wechat", recipient="openid-ada", error="timeout", seconds=2, times=1
    )

    with pytest.raises(httpx.ReadTimeout):
        template(clean_sandbox, token, client_msg_id="retry-me", timeout=0.5)
    [stored] = clean_sandbox.wait_messages("wechat", "openid-ada")

    retried = template(clean_sandbox, token, client_msg_id="retry-me")
    assert retried["msgid"] == stored["msgid"]
    assert len(clean_sandbox.messages("wechat")) == 1


# -- email ---------------------------------------------------------------------------------------


def test_an_email_is_listed_parsed_with_its_arrival_time_however_it_is_asked_for(
    clean_sandbox: SandboxInfo,
) -> None:
    """The outbox parses an email when it is first listed, not on the SMTP path: the record
    is the same whether a filter on its subject or its recipient reads it first, a listing by
    subject finds a folded, encoded subject, and the record carries the time it arrived, not
    the time it was listed."""
    # A subject long enough to be folded, and RFC 2047-encoded: read from the headers alone
    # for a listing by subject, before the message is parsed.
    order = "Votre commande est partie, Zoë, et elle arrivera demain avant midi chez vous"
    for to, subject in (("ada@example.com", "Welcome, Ada"), ("bob@example.com", order)):
        message = EmailMessage()
        message["From"] = "Acme <shop@waypost.test>"
        message["To"] = to
        message["Subject"] = subject
        message["List-Unsubscribe"] = "<https://waypost.test/u/abc>"
        message.set_content(f"Hi {to}")
        message.add_alternative(f"<p>Hi <b>{to}</b></p>", subtype="html")
        with smtplib.SMTP("127.0.0.1", clean_sandbox.smtp_port, timeout=10) as client:
            client.send_message(message)
    sent_by = time.time()
    url = f"{clean_sandbox.http_url}/messages"

    def listed(**params: str) -> list[dict[str, Any]]:
        answer = httpx.get(url, params={"channel": "email", **params}, timeout=10)
        assert answer.status_code == 200, answer.text
        found: list[dict[str, Any]] = answer.json()["messages"]
        return found

    zoe = listed(subject_contains="ZOË, ET ELLE")
    assert [m["subject"] for m in zoe] == [order]
    by_subject = listed(subject_contains="welcome")
    assert [m["to"] for m in by_subject] == [["ada@example.com"]]
    ada = by_subject[0]
    assert ada["subject"] == "Welcome, Ada"
    assert ada["from"] == "shop@waypost.test"
    assert ada["headers"]["List-Unsubscribe"] == "<https://waypost.test/u/abc>"
    assert ada["text"] == "Hi ada@example.com\n"
    assert ada["html"] == "<p>Hi <b>ada@example.com</b></p>\n"
    assert datetime.fromisoformat(ada["received_at"]).timestamp() <= sent_by
    # Asked for by recipient, then all: the same records.
    bob = listed(to="BOB@example.com")
    assert bob == zoe
    assert listed() == [ada, bob[0]]
    assert listed(subject_contains="nothing like it") == []


def test_a_summary_listing_parses_no_email_and_the_next_full_listing_still_does(
    clean_sandbox: SandboxInfo,
) -> None:
    """`summary=true` lists emails as they arrived (who, when, the header block's subject), so
    a poller does not hold the SMTP server while thousands are parsed; a full listing later
    parses them as ever."""
    message = EmailMessage()
    message["From"] = "Acme <shop@waypost.test>"
    message["To"] = "cyd@example.com"
    message["Subject"] = "Welcome, Cyd"
    message.set_content("Hi Cyd")
    with smtplib.SMTP("127.0.0.1", clean_sandbox.smtp_port, timeout=10) as client:
        client.send_message(message)
    url = f"{clean_sandbox.http_url}/messages"
    params = {"channel": "email", "subject_contains": "welcome"}

    summary = httpx.get(url, params={**params, "summary": "true"}, timeout=10)
    assert summary.status_code == 200, summary.text
    (brief,) = summary.json()["messages"]
    assert (brief["to"], brief["subject"], brief["from"]) == (
        ["cyd@example.com"],
        "Welcome, Cyd",
        "shop@waypost.test",
    )
    assert "received_at" in brief
    assert "text" not in brief
    assert "headers" not in brief

    (full,) = httpx.get(url, params=params, timeout=10).json()["messages"]
    assert full["text"] == "Hi Cyd\n"
    assert full["received_at"] == brief["received_at"]


# -- email failure rules -----------------------------------------------------------------------


def mail(sandbox: SandboxInfo, to: str, timeout: float = 10.0) -> None:
    message = EmailMessage()
    message["From"] = "shop@waypost.test"
    message["To"] = to
    message["Subject"] = "Hello"
    message.set_content("Hi there")
    with smtplib.SMTP("127.0.0.1", sandbox.smtp_port, timeout=timeout) as client:
        client.send_message(message)


@pytest.mark.parametrize("code", ["550", "451", "552"])
def test_email_rules_refuse_the_recipient_with_that_code(
    clean_sandbox: SandboxInfo, code: str
) -> None:
    clean_sandbox.fail(channel="email", recipient="Bounce@Example.com", error=code, times=1)

    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        mail(clean_sandbox, "bounce@example.com")

    assert refused.value.recipients["bounce@example.com"][0] == int(code)
    assert clean_sandbox.messages("email") == []
    mail(clean_sandbox, "bounce@example.com")  # the rule was used up
    assert len(clean_sandbox.messages("email")) == 1


def test_email_timeout_stores_the_message_then_holds_the_answer(
    clean_sandbox: SandboxInfo,
) -> None:
    clean_sandbox.fail(channel="email", recipient="slow@example.com", error="timeout", seconds=2)

    with pytest.raises(smtplib.SMTPServerDisconnected):
        mail(clean_sandbox, "slow@example.com", timeout=0.5)

    clean_sandbox.wait_messages("email", "slow@example.com")


# -- email events (Mailgun style) --------------------------------------------------------------

EVENTS_DOMAIN = "mg.waypost.test"


def new_message_id() -> str:
    """A Message-ID as the header carries it, with its angle brackets."""
    return f"<{uuid.uuid4().hex}@waypost.test>"


async def send_email(
    sandbox: SandboxInfo,
    to: list[str],
    message_id: str | None,
    *,
    subject: str = "Your order has shipped",
    body: str = "It is on its way.",
    timeout: float = 10.0,
) -> bytes:
    """Send one message over SMTP (aiosmtplib) to every address in `to`; the exact bytes sent
    (CRLF lines ending in CRLF, so the server stores them unchanged)."""
    lines = [
        "From: Acme <shop@waypost.test>",
        f"To: {', '.join(to)}",
        f"Subject: {subject}",
        *([f"Message-ID: {message_id}"] if message_id is not None else []),
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "",
        body,
    ]
    raw = ("\r\n".join(lines) + "\r\n").encode()
    await aiosmtplib.send(
        raw,
        sender="bounces@waypost.test",
        recipients=to,
        hostname="127.0.0.1",
        port=sandbox.smtp_port,
        timeout=timeout,
    )
    return raw


async def get_events(
    sandbox: SandboxInfo,
    params: dict[str, str] | None = None,
    *,
    url: str | None = None,
    auth: tuple[str, str] | None = None,
    timeout: float = 10.0,
) -> httpx.Response:
    """GET /v3/{domain}/events with `params`, or a paging URL it answered with."""
    async with httpx.AsyncClient(timeout=timeout) as client:
        return await client.get(
            url or f"{sandbox.http_url}/v3/{EVENTS_DOMAIN}/events",
            params=params,
            auth=auth or ("api", sandbox.email_events_api_key),
        )


async def event_items(
    sandbox: SandboxInfo, params: dict[str, str] | None = None, *, url: str | None = None
) -> list[dict[str, Any]]:
    answer = await get_events(sandbox, params, url=url)
    assert answer.status_code == 200, answer.text
    items: list[dict[str, Any]] = answer.json()["items"]
    return items


def message_ids(items: list[dict[str, Any]]) -> list[str]:
    return [item["message"]["headers"]["message-id"] for item in items]


async def test_an_accepted_email_is_found_by_its_message_id_with_or_without_brackets(
    clean_sandbox: SandboxInfo,
) -> None:
    message_id = new_message_id()
    bare = message_id.strip("<>")
    before = time.time()
    raw = await send_email(clean_sandbox, ["ada@example.com"], message_id)
    after = time.time()

    answer = await get_events(clean_sandbox, {"message-id": bare})

    assert answer.status_code == 200, answer.text
    [event] = answer.json()["items"]
    assert isinstance(event["id"], str)
    assert event["id"]
    assert event["event"] == "accepted"
    assert before <= event["timestamp"] <= after
    assert event["recipient"] == "ada@example.com"
    assert event["envelope"] == {
        "sender": "bounces@waypost.test",
        "targets": "ada@example.com",
        "transport": "smtp",
    }
    assert event["message"] == {
        "headers": {
            "message-id": bare,
            "from": "Acme <shop@waypost.test>",
            "to": "ada@example.com",
            "subject": "Your order has shipped",
        },
        "size": len(raw),
    }
    assert set(answer.json()["paging"]) == {"first", "last", "next", "previous"}
    # Asked for with the brackets the header has: the same event.
    assert await event_items(clean_sandbox, {"message-id": message_id}) == [event]
    # The outbox's record of the message carries the same arrival time.
    [stored] = clean_sandbox.messages("email", "ada@example.com")
    assert datetime.fromisoformat(stored["received_at"]).timestamp() == pytest.approx(
        event["timestamp"], abs=1e-5
    )


async def test_an_email_whose_answer_never_came_has_its_accepted_event(
    clean_sandbox: SandboxInfo,
) -> None:
    """What the events API is for: the SMTP answer to DATA is held past the client's timeout,
    and the events say the message was accepted all the same."""
    message_id = new_message_id()
    clean_sandbox.fail(channel="email", recipient="ada@example.com", error="timeout", seconds=2)

    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        await send_email(clean_sandbox, ["ada@example.com"], message_id, timeout=0.5)

    [event] = await event_items(clean_sandbox, {"message-id": message_id})
    assert event["recipient"] == "ada@example.com"


async def test_a_message_to_three_recipients_has_an_event_for_each(
    clean_sandbox: SandboxInfo,
) -> None:
    message_id = new_message_id()
    bare = message_id.strip("<>")
    to = ["ada@example.com", "Bob@Example.com", "cy@example.org"]
    await send_email(clean_sandbox, to, message_id)
    await send_email(clean_sandbox, ["bob@example.com"], new_message_id())  # another message

    items = await event_items(clean_sandbox, {"message-id": bare})

    assert sorted(item["recipient"] for item in items) == sorted(to)
    assert len({item["id"] for item in items}) == 3
    assert all(item["envelope"]["targets"] == item["recipient"] for item in items)
    assert message_ids(items) == [bare] * 3
    assert {item["message"]["headers"]["to"] for item in items} == {", ".join(to)}
    # The recipient filter ignores case, and combines with the Message-ID.
    [bob] = await event_items(clean_sandbox, {"message-id": bare, "recipient": "BOB@example.com"})
    assert bob["recipient"] == "Bob@Example.com"
    bobs = await event_items(clean_sandbox, {"recipient": "bob@EXAMPLE.com"})
    assert len(bobs) == 2
    assert bare in message_ids(bobs)
    assert await event_items(clean_sandbox, {"message-id": bare, "recipient": "zed@x.org"}) == []


async def test_an_unknown_message_id_and_other_event_types_list_nothing(
    clean_sandbox: SandboxInfo,
) -> None:
    message_id = new_message_id()
    await send_email(clean_sandbox, ["ada@example.com"], message_id)
    # A Message-ID line in the body of a message without one is not its Message-ID.
    await send_email(
        clean_sandbox, ["ada@example.com"], None, body="Message-ID: <in-the-body@waypost.test>"
    )
    bare = message_id.strip("<>")

    assert await event_items(clean_sandbox, {"message-id": "never-sent@waypost.test"}) == []
    assert await event_items(clean_sandbox, {"message-id": "in-the-body@waypost.test"}) == []
    assert await event_items(clean_sandbox, {"message-id": bare, "event": "delivered"}) == []
    assert len(await event_items(clean_sandbox, {"message-id": bare, "event": "accepted"})) == 1
    either = await event_items(clean_sandbox, {"message-id": bare, "event": "failed OR accepted"})
    assert len(either) == 1
    everything = await event_items(clean_sandbox)
    assert [item["message"]["headers"]["message-id"] for item in everything] == [None, bare]


@pytest.mark.parametrize(
    "auth",
    [None, ("api", "wrong-key"), ("user", "waypost-sandbox-email-events-key")],
    ids=["missing", "wrong-key", "wrong-user"],
)
async def test_the_events_api_refuses_bad_credentials(
    clean_sandbox: SandboxInfo, auth: tuple[str, str] | None
) -> None:
    await send_email(clean_sandbox, ["ada@example.com"], new_message_id())
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.get(
            f"{clean_sandbox.http_url}/v3/{EVENTS_DOMAIN}/events",
            auth=auth or httpx.USE_CLIENT_DEFAULT,
        )

    assert answer.status_code == 401
    assert isinstance(answer.json()["message"], str)
    assert answer.json()["message"]
    assert answer.headers["WWW-Authenticate"].startswith("Basic")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "301"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "-5"}, "limit"),
        ({"ascending": "maybe"}, "ascending"),
        ({"begin": "yesterday"}, "begin"),
        ({"end": "nan"}, "end"),
        ({"message-id": "<>"}, "message-id"),
        ({"subject": "Your order"}, "subject"),
    ],
)
async def test_a_bad_events_query_is_a_400_naming_the_field(
    clean_sandbox: SandboxInfo, params: dict[str, str], field: str
) -> None:
    answer = await get_events(clean_sandbox, params)

    assert answer.status_code == 400
    assert field in answer.json()["message"]


async def test_events_pages_follow_each_other_both_ways(clean_sandbox: SandboxInfo) -> None:
    sent = [new_message_id().strip("<>") for _ in range(5)]
    for message_id in sent:
        await send_email(clean_sandbox, ["pager@example.com"], message_id)
    await send_email(clean_sandbox, ["someone-else@example.com"], new_message_id())

    first = await get_events(
        clean_sandbox, {"recipient": "pager@example.com", "ascending": "yes", "limit": "2"}
    )
    assert message_ids(first.json()["items"]) == sent[:2]
    paging = first.json()["paging"]
    assert paging["next"].startswith(f"{clean_sandbox.http_url}/v3/{EVENTS_DOMAIN}/events/")
    second = (await get_events(clean_sandbox, url=paging["next"])).json()
    assert message_ids(second["items"]) == sent[2:4]
    third = (await get_events(clean_sandbox, url=second["paging"]["next"])).json()
    assert message_ids(third["items"]) == sent[4:]
    end = (await get_events(clean_sandbox, url=third["paging"]["next"])).json()
    assert end["items"] == []
    back = await event_items(clean_sandbox, url=third["paging"]["previous"])
    assert message_ids(back) == sent[2:4]
    assert (
        message_ids(await event_items(clean_sandbox, url=second["paging"]["previous"]))
        == (sent[:2])
    )
    assert message_ids(await event_items(clean_sandbox, url=paging["first"])) == sent[:2]
    assert message_ids(await event_items(clean_sandbox, url=paging["last"])) == sent[3:]
    # An ascending listing's next page, empty at the end, later lists what arrived since.
    latest = new_message_id().strip("<>")
    await send_email(clean_sandbox, ["pager@example.com"], latest)
    assert message_ids(await event_items(clean_sandbox, url=end["paging"]["next"])) == [latest]

    # Newest first without `ascending`, page by page down to the oldest.
    newest = await get_events(clean_sandbox, {"recipient": "pager@example.com", "limit": "4"})
    assert message_ids(newest.json()["items"]) == [latest, *sent[::-1][:3]]
    older = await event_items(clean_sandbox, url=newest.json()["paging"]["next"])
    assert message_ids(older) == sent[1::-1]

    # A page URL carries its query: no parameters beside it, and only its own tokens.
    with_params = await get_events(clean_sandbox, {"limit": "1"}, url=paging["next"])
    assert with_params.status_code == 400
    forged = await get_events(clean_sandbox, url=f"{paging['first'].rpartition('/')[0]}/xyz")
    assert forged.status_code == 400
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(paging["next"])).status_code == 401


async def test_events_are_listed_within_the_time_range_in_its_order(
    clean_sandbox: SandboxInfo,
) -> None:
    early_id, late_id = new_message_id().strip("<>"), new_message_id().strip("<>")
    await send_email(clean_sandbox, ["clock@example.com"], early_id)
    [early] = await event_items(clean_sandbox, {"message-id": early_id})
    await send_email(clean_sandbox, ["clock@example.com"], late_id)
    [late] = await event_items(clean_sandbox, {"message-id": late_id})
    assert late["timestamp"] > early["timestamp"]
    t_early, t_late = str(early["timestamp"]), str(late["timestamp"])

    async def listed(**params: str) -> list[str]:
        return message_ids(
            await event_items(clean_sandbox, {"recipient": "clock@example.com", **params})
        )

    assert await listed(begin=t_early, end=t_early) == [early_id]
    assert await listed(begin=t_early, end=t_late) == [early_id, late_id]
    assert await listed(begin=t_late, end=t_early) == [late_id, early_id]  # end before begin
    assert await listed(begin=t_late, ascending="yes") == [late_id]
    assert await listed(begin=t_late) == [late_id]  # from a begin, ascending by default
    assert await listed(begin=t_early, ascending="no") == [early_id]  # back from the begin
    assert await listed(end=t_late, ascending="yes") == [early_id, late_id]
    assert await listed(end=t_late) == [late_id]  # newest first, down to the end
    assert await listed() == [late_id, early_id]
    assert await listed(ascending="yes") == [early_id, late_id]
    between = (early["timestamp"] + late["timestamp"]) / 2
    assert await listed(begin=str(between), ascending="yes") == [late_id]


async def test_a_list_rule_fails_the_events_query_of_its_message_id_times_times(
    clean_sandbox: SandboxInfo,
) -> None:
    message_id = new_message_id()
    bare = message_id.strip("<>")
    clean_sandbox.fail(
        channel="email", recipient=bare, error="503", action="list", times=2, retry_after=3
    )
    await send_email(clean_sandbox, ["ada@example.com"], message_id)  # sends are not affected
    # A query without the Message-ID matches no rule.
    assert len(await event_items(clean_sandbox, {"recipient": "ada@example.com"})) == 1
    assert [rule["times"] for rule in clean_sandbox.failures()] == [2]

    for _ in range(2):
        refused = await get_events(clean_sandbox, {"message-id": message_id})
        assert refused.status_code == 503
        assert refused.json()["message"]
        assert refused.headers["Retry-After"] == "3"

    assert len(await event_items(clean_sandbox, {"message-id": bare})) == 1
    assert clean_sandbox.failures() == []


async def test_a_list_rule_may_name_an_address_the_message_went_to(
    clean_sandbox: SandboxInfo,
) -> None:
    message_id = new_message_id()
    other = new_message_id()
    clean_sandbox.fail(
        channel="email", recipient="Ada@Example.com", error="500", action="list", times=1
    )
    await send_email(clean_sandbox, ["bob@example.com"], other)
    await send_email(clean_sandbox, ["ada@example.com"], message_id)

    # The query of a message to another address is not refused; the rule waits for Ada's.
    assert len(await event_items(clean_sandbox, {"message-id": other})) == 1
    refused = await get_events(clean_sandbox, {"message-id": message_id})
    assert refused.status_code == 500
    assert len(await event_items(clean_sandbox, {"message-id": message_id})) == 1
    assert clean_sandbox.failures() == []


async def test_a_429_list_rule_answers_with_retry_after(clean_sandbox: SandboxInfo) -> None:
    clean_sandbox.fail(
        channel="email",
        recipient="<limited@waypost.test>",
        error="429",
        action="list",
        retry_after=1.5,
        times=1,
    )

    refused = await get_events(clean_sandbox, {"message-id": "Limited@waypost.test"})

    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1.5"
    assert (await get_events(clean_sandbox, {"message-id": "limited@waypost.test"})).json()[
        "items"
    ] == []


async def test_a_timeout_list_rule_holds_the_events_answer(clean_sandbox: SandboxInfo) -> None:
    message_id = new_message_id()
    bare = message_id.strip("<>")
    await send_email(clean_sandbox, ["ada@example.com"], message_id)
    clean_sandbox.fail(
        channel="email", recipient=bare, error="timeout", action="list", seconds=2, times=1
    )

    with pytest.raises(httpx.ReadTimeout):
        await get_events(clean_sandbox, {"message-id": bare}, timeout=0.5)

    assert len(await event_items(clean_sandbox, {"message-id": bare})) == 1


async def test_a_slow_list_rule_answers_the_events_late(clean_sandbox: SandboxInfo) -> None:
    message_id = new_message_id()
    bare = message_id.strip("<>")
    await send_email(clean_sandbox, ["ada@example.com"], message_id)
    clean_sandbox.fail(channel="email", recipient=bare, error="slow", action="list", seconds=0.5)

    started = time.monotonic()
    answer = await get_events(clean_sandbox, {"message-id": bare})

    assert time.monotonic() - started >= 0.5
    assert len(answer.json()["items"]) == 1


async def test_latency_delays_the_events_answer(clean_sandbox: SandboxInfo) -> None:
    clean_sandbox.set_latency(0.4)

    started = time.monotonic()
    answer = await get_events(clean_sandbox, {"message-id": "any@waypost.test"})

    assert answer.status_code == 200
    assert time.monotonic() - started >= 0.4


async def test_clearing_the_outbox_or_a_reset_forgets_the_events(
    clean_sandbox: SandboxInfo,
) -> None:
    message_id = new_message_id()
    bare = message_id.strip("<>")
    await send_email(clean_sandbox, ["ada@example.com"], message_id)
    assert len(await event_items(clean_sandbox, {"message-id": bare})) == 1

    async with httpx.AsyncClient(timeout=10) as client:
        cleared = await client.delete(f"{clean_sandbox.http_url}/messages")
    assert cleared.json() == {"deleted": 1}
    assert await event_items(clean_sandbox, {"message-id": bare}) == []
    assert await event_items(clean_sandbox) == []

    await send_email(clean_sandbox, ["ada@example.com"], message_id)
    assert len(await event_items(clean_sandbox, {"message-id": bare})) == 1
    clean_sandbox.reset()
    assert await event_items(clean_sandbox, {"message-id": bare}) == []  # the key still works


# -- control API -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        ({"channel": "fax", "recipient": "x", "error": "500"}, "channel"),
        ({"channel": "push", "recipient": "x", "error": "NOT_A_CODE"}, "error"),
        ({"channel": "sms", "recipient": "+15551230001", "error": "30009"}, "error"),
        ({"channel": "wechat", "recipient": "o", "error": "UNREGISTERED"}, "error"),
        ({"channel": "email", "recipient": "a@b.c", "error": "250"}, "error"),
        ({"channel": "email", "recipient": "id@b.c", "error": "550", "action": "list"}, "error"),
        (
            {"channel": "email", "recipient": "id@b.c", "error": "UNAVAILABLE", "action": "list"},
            "error",
        ),
        ({"channel": "sms", "recipient": "", "error": "500"}, "recipient"),
        ({"channel": "sms", "recipient": "+1555", "error": "500", "times": 0}, "times"),
        ({"channel": "sms", "recipient": "+1555", "error": "slow", "seconds": -1}, "seconds"),
    ],
)
def test_failure_rules_are_validated(
    clean_sandbox: SandboxInfo, rule: dict[str, Any], field: str
) -> None:
    answer = httpx.post(f"{clean_sandbox.http_url}/control/failures", json=rule)

    assert answer.status_code == 422
    assert field in json.dumps(answer.json())
    assert any(problem["loc"][-1] == field for problem in answer.json()["detail"])
    assert clean_sandbox.failures() == []


def test_failure_rules_can_be_listed_and_cleared(clean_sandbox: SandboxInfo) -> None:
    clean_sandbox.fail(channel="push", recipient="t1", error="unregistered")
    clean_sandbox.fail(channel="email", recipient="a@example.com", error="550", times=2)

    rules = clean_sandbox.failures()
    assert [(r["channel"], r["error"], r["times"]) for r in rules] == [
        ("push", "UNREGISTERED", None),
        ("email", "550", 2),
    ]
    cleared = httpx.delete(f"{clean_sandbox.http_url}/control/failures").json()
    assert cleared == {"cleared": 2}
    assert clean_sandbox.failures() == []


def test_latency_delays_provider_answers_until_reset(clean_sandbox: SandboxInfo) -> None:
    clean_sandbox.set_latency(0.4)

    started = time.monotonic()
    assert send_sms(clean_sandbox).status_code == 201
    assert time.monotonic() - started >= 0.4
    started = time.monotonic()
    wechat_token(clean_sandbox)
    assert time.monotonic() - started >= 0.4

    clean_sandbox.reset()
    assert httpx.get(f"{clean_sandbox.http_url}/control/latency").json() == {"seconds": 0.0}


def test_reset_forgets_messages_rules_refusals_and_tokens(clean_sandbox: SandboxInfo) -> None:
    access = fcm_token(clean_sandbox)
    wechat = wechat_token(clean_sandbox)
    assert push(clean_sandbox, access).status_code == 200
    clean_sandbox.fail(channel="sms", recipient="+15551230001", error="500")
    httpx.post(
        f"{clean_sandbox.http_url}/control/smtp/refuse", json={"address": "x@example.com"}
    ).raise_for_status()

    clean_sandbox.reset()

    assert clean_sandbox.messages() == []
    assert clean_sandbox.failures() == []
    assert httpx.get(f"{clean_sandbox.http_url}/control/smtp/refuse").json() == {"rules": []}
    assert push(clean_sandbox, access).status_code == 401
    assert template(clean_sandbox, wechat)["errcode"] == 40001
    assert clean_sandbox.wechat_status() == {
        "tokens_issued": 0,
        "current_token_expires_in": None,
    }
    assert send_sms(clean_sandbox, "+15551230001").status_code == 201  # credentials kept


def test_bad_input_gets_an_answer_not_a_crash(clean_sandbox: SandboxInfo) -> None:
    url = clean_sandbox.http_url
    sms_url = f"{url}/2010-04-01/Accounts/{clean_sandbox.sms_account_sid}/Messages.json"
    auth = (clean_sandbox.sms_account_sid, clean_sandbox.sms_auth_token)
    answers = [
        httpx.post(sms_url, auth=auth, content=b"\xff\xfe", headers={"Content-Type": "x/y"}),
        httpx.post(sms_url, auth=auth, json={"To": "+15551230001"}),
        httpx.post(
            sms_url,
            auth=auth,
            content=b"--x\r\nbroken",
            headers={"Content-Type": "multipart/form-data; boundary=x"},
        ),
        httpx.post(f"{url}/token", content=b"\x00\x01"),
        httpx.post(f"{url}/cgi-bin/stable_token", content=b"[1, 2"),
        httpx.post(f"{url}/cgi-bin/message/template/send?access_token=x", content=b"{"),
        httpx.post(f"{url}/control/failures", content=b"not json"),
        httpx.post(f"{url}/control/latency", json={"seconds": "soon"}),
    ]

    assert all(400 <= a.status_code < 500 or a.json().get("errcode") for a in answers), [
        (a.status_code, a.text) for a in answers
    ]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


# -- a sandbox with short token lifetimes and latency -------------------------------------------


@pytest.fixture(scope="module")
def quick_sandbox(
    sandbox: SandboxInfo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SandboxInfo]:
    """A second sandbox: short token lifetimes, latency, its own templates, and the session
    sandbox's service-account file (copied) to show an existing file is reused."""
    workdir = tmp_path_factory.mktemp("quick-sandbox")
    shutil.copy(sandbox.fcm_service_account_file, workdir / "fcm-service-account.json")
    flags = [
        "--fcm-token-ttl",
        "1",
        "--wechat-token-ttl",
        "3",
        "--wechat-token-overlap",
        "0.5",
        "--wechat-templates",
        "tpl-a,tpl-b",
        "--latency-ms",
        "150",
    ]
    with running_sandbox(workdir, flags) as info:
        yield info


def test_an_existing_service_account_file_is_reused_and_repointed(
    sandbox: SandboxInfo, quick_sandbox: SandboxInfo
) -> None:
    original = service_account(sandbox)
    reused = service_account(quick_sandbox)

    assert reused["private_key"] == original["private_key"]
    assert reused["project_id"] == original["project_id"]
    assert reused["token_uri"] == f"{quick_sandbox.http_url}/token"
    assert Path(quick_sandbox.fcm_service_account_file).stat().st_mode & 0o077 == 0


def test_latency_flag_delays_every_provider_answer(quick_sandbox: SandboxInfo) -> None:
    started = time.monotonic()
    token = fcm_token(quick_sandbox)
    assert time.monotonic() - started >= 0.15
    assert token


def test_fcm_access_tokens_expire(quick_sandbox: SandboxInfo) -> None:
    token = fcm_token(quick_sandbox)
    assert push(quick_sandbox, token).status_code == 200

    expired = wait_for(
        lambda: push(quick_sandbox, token).status_code == 401,
        timeout=10,
        what="the 1 s FCM token to expire",
    )
    assert expired


def test_wechat_superseded_token_dies_after_the_overlap_and_tokens_expire(
    quick_sandbox: SandboxInfo,
) -> None:
    quick_sandbox.reset()  # latency goes back to the flag's value, tokens are forgotten
    old = wechat_token(quick_sandbox)
    new = wechat_token(quick_sandbox)
    assert template(quick_sandbox, old, template_id="tpl-a")["errcode"] == 0

    wait_for(
        lambda: template(quick_sandbox, old, template_id="tpl-a")["errcode"] == 40001,
        what="the superseded token to stop working",
    )
    assert template(quick_sandbox, new, template_id="tpl-b")["errcode"] == 0
    assert template(quick_sandbox, new, template_id="tpl-order")["errcode"] == 40037
    wait_for(
        lambda: template(quick_sandbox, new, template_id="tpl-a")["errcode"] == 42001,
        what="the 3 s token to expire",
    )
    assert quick_sandbox.wechat_status()["tokens_issued"] == 2


def test_fcm_dry_run_leaves_failure_rules_alone(clean_sandbox: SandboxInfo) -> None:
    clean_sandbox.fail(channel="push", recipient="device-token-1", error="UNREGISTERED", times=1)
    token = fcm_token(clean_sandbox)

    assert push(clean_sandbox, token, validate_only=True).status_code == 200
    assert push(clean_sandbox, token).status_code == 404


def test_email_slow_answers_after_the_delay_and_rules_can_be_removed_one_by_one(
    clean_sandbox: SandboxInfo,
) -> None:
    clean_sandbox.fail(channel="email", recipient="slow@example.com", error="slow", seconds=0.5)
    clean_sandbox.fail(channel="email", recipient="gone@example.com", error="550")

    started = time.monotonic()
    mail(clean_sandbox, "slow@example.com")
    assert time.monotonic() - started >= 0.5
    assert len(clean_sandbox.messages("email", "slow@example.com")) == 1

    gone = next(r for r in clean_sandbox.failures() if r["recipient"] == "gone@example.com")
    httpx.delete(f"{clean_sandbox.http_url}/control/failures/{gone['id']}").raise_for_status()
    mail(clean_sandbox, "gone@example.com")
    assert len(clean_sandbox.messages("email", "gone@example.com")) == 1


def test_stopping_the_sandbox_sends_a_held_answer_at_once(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """An answer held by a rule (or by latency) is a timer the stop ends: the client gets its
    answer, not a connection dropped once the server's graceful stop runs out."""
    answers: list[httpx.Response | Exception] = []
    with running_sandbox(tmp_path_factory.mktemp("stopping-sandbox")) as stopping:
        stopping.fail(channel="sms", recipient="+15551230077", error="timeout", seconds=600)

        def held() -> None:
            try:
                answers.append(send_sms(stopping, "+15551230077", timeout=60))
            except httpx.HTTPError as exc:
                answers.append(exc)

        client = threading.Thread(target=held, daemon=True)
        client.start()
        stopping.wait_messages("sms", "+15551230077")  # stored: its answer is now held
    client.join(timeout=60)

    [answer] = answers
    assert isinstance(answer, httpx.Response), answer
    assert answer.status_code == 201
    assert answer.json()["to"] == "+15551230077"
