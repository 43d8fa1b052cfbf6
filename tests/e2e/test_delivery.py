"""Delivery on the real pipeline: channel priority (S1), one-click unsubscribe, frequency caps,
retries, configuration pauses, dead push tokens, delivery reports and tracked links.

Every message goes through ingest, the segmenter, the orchestrator and the dispatcher to the
sandbox's SMTP server or its SMS, FCM and WeChat APIs; the test stack caps SMS at one per day
and scales retry delays down to seconds (tests/conftest.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pymongo import MongoClient

from shared.docstore import connect_blocking
from shared.settings import CommonSettings
from shared.topics import SUPPRESSIONS
from tests.e2e.helpers import (
    outbox,
    post,
    publish_inline,
    publish_journey,
    read_topic,
    unique,
    wait_for,
)

pytestmark = pytest.mark.e2e
ADMIN = {"Authorization": "Bearer wp_dev_admin_key"}


@pytest.fixture(scope="module")
def ledger(stack: Any) -> Any:
    client: MongoClient[dict[str, Any]] = connect_blocking(
        CommonSettings(mongo_url=stack.mongo_url), "tests"
    )
    yield client["waypost"]["messages"]
    client.close()


# The failure rules a test added, removed after it (only its own: other tests run beside it).
ADDED_RULES: list[int] = []


@pytest.fixture(autouse=True)
def _remove_own_failure_rules(stack: Any) -> Iterator[None]:
    yield
    while ADDED_RULES:
        rule = ADDED_RULES.pop()
        httpx.delete(f"{stack.outbox_url}/control/failures/{rule}", timeout=10)  # 404: used up


def _fail(stack: Any, **rule: Any) -> int:
    answer = httpx.post(f"{stack.outbox_url}/control/failures", json=rule, timeout=10)
    answer.raise_for_status()
    rule_id: int = answer.json()["id"]
    ADDED_RULES.append(rule_id)
    return rule_id


def _identify(stack: Any, user: str, **traits: Any) -> None:
    answer = post(stack, "identify", {"userId": user, "traits": traits})
    assert answer.status_code == 200, answer.text


# The ledger view may show a send first when a delivery report has moved it on already.
SENT_OR_LATER = ["sent", "delivered", "opened", "clicked"]


def _entries(ledger: Any, user: str, **query: Any) -> list[dict[str, Any]]:
    return list(ledger.find({"contact_key": user, **query}))


def _another_message_during_the_try(stack: Any, held: int, phone: str) -> None:
    """Once the user's SMS is at the provider, held there by the failure rule `held` (used up,
    the sandbox drops it), another message to the number. The sandbox says so at once, where
    the ledger view's `sending` may show only after the dispatcher has listed the messages."""

    def used_up() -> bool:
        rules = httpx.get(f"{stack.outbox_url}/control/failures", timeout=10).json()["rules"]
        return all(rule["id"] != held for rule in rules)

    wait_for(used_up, what="the try at the provider")
    other = httpx.post(
        f"{stack.outbox_url}/2010-04-01/Accounts/ACwaypostsandbox/Messages.json",
        data={"To": phone, "From": "+15005550006", "Body": "Another message"},
        auth=("ACwaypostsandbox", "waypost-sandbox-sms-token"),
        timeout=10,
    )
    assert other.status_code == 201, other.text


def _templates(tag: str) -> dict[str, dict[str, str]]:
    return {
        f"{tag}-wechat": {
            "channel": "wechat",
            "subject": "Spring is here",
            "text": "Hello {{ contact.first_name | default('there') }}, see https://acme.example/spring",
        },
        f"{tag}-email": {
            "channel": "email",
            "subject": "Spring, {{ contact.first_name | default('there') }}",
            "text": "Hi {{ contact.first_name | default('there') }}: https://acme.example/spring",
            "html": '<p>Hi</p><a href="https://acme.example/spring">Spring</a>',
        },
        f"{tag}-sms": {"channel": "sms", "text": "Acme: spring is here. Reply STOP to opt out."},
        f"{tag}-push": {"channel": "push", "subject": "Spring", "text": "New arrivals"},
    }


def _priority_journey(stack: Any, tmp_path: Path, tag: str, channels: list[str]) -> str:
    trigger = f"Enter {tag}"
    publish_inline(
        stack,
        tmp_path,
        tag,
        {"type": "event", "event": trigger},
        [
            {
                "id": "announce",
                "type": "send",
                "channels": [{"channel": c, "template": f"{tag}-{c}"} for c in channels],
            },
            {"id": "done", "type": "exit"},
        ],
        _templates(tag),
    )
    return trigger


def test_s1_channel_priority_takes_the_first_reachable_channel_and_falls_back(
    stack: Any, tmp_path: Path, ledger: Any
) -> None:
    tag = unique("s1")
    trigger = _priority_journey(stack, tmp_path, tag, ["wechat", "email", "sms"])
    on_wechat, union_only, bounced, unfollowed = (unique(n) for n in ("wx", "un", "bo", "uf"))
    _identify(
        stack,
        on_wechat,
        wechat_openid=f"o-{on_wechat}",
        email=f"{on_wechat}@ex.com",
        first_name="Wu",
    )
    # A unionid alone cannot be sent to: the email is the first choice, no WeChat is requested.
    _identify(
        stack,
        union_only,
        wechat_unionid=f"u-{union_only}",
        email=f"{union_only}@ex.com",
        first_name="Ana",
    )
    # Email bounces permanently: the SMS goes out instead.
    _identify(stack, bounced, email=f"{bounced}@ex.com", phone="+48500100201", first_name="Bo")
    httpx.post(
        f"{stack.outbox_url}/control/smtp/refuse",
        json={"address": f"{bounced}@ex.com", "code": 550},
        timeout=10,
    ).raise_for_status()
    # The contact unfollowed the Official Account (43004): email instead.
    _identify(
        stack,
        unfollowed,
        wechat_openid=f"o-{unfollowed}",
        email=f"{unfollowed}@ex.com",
        first_name="Uf",
    )
    _fail(stack, channel="wechat", recipient=f"o-{unfollowed}", error="43004")
    for user in (on_wechat, union_only, bounced, unfollowed):
        assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200

    news = wait_for(lambda: outbox(stack, channel="wechat", to=f"o-{on_wechat}"), what="news")
    assert news[0]["kind"] == "news"
    assert news[0]["title"] == "Spring is here"
    assert news[0]["url"] == "https://acme.example/spring"
    wait_for(lambda: outbox(stack, channel="email", to=f"{union_only}@ex.com"), what="email")
    texts = wait_for(lambda: outbox(stack, channel="sms", to="+48500100201"), what="the SMS")
    assert texts[0]["body"].startswith("Acme: spring is here")
    wait_for(lambda: outbox(stack, channel="email", to=f"{unfollowed}@ex.com"), what="fallback")

    # Each contact got exactly one message, and the ledger tells why the others did not go.
    assert outbox(stack, to=f"{on_wechat}@ex.com") == []
    assert outbox(stack, to=f"{bounced}@ex.com") == []
    sent = {"$in": ["sent", "delivered", "opened", "clicked"]}
    wait_for(lambda: _entries(ledger, union_only, state=sent), what="the email in the ledger")
    assert [e["channel"] for e in _entries(ledger, union_only)] == ["email"]
    failed = wait_for(lambda: _entries(ledger, bounced, state="failed"), what="bounce")
    assert failed[0]["code"] == "550"
    unfollow = wait_for(lambda: _entries(ledger, unfollowed, state="failed"), what="43004")
    assert unfollow[0]["code"] == "43004"


def test_a_hard_bounce_suppresses_the_address_for_every_contact_without_storing_it(
    stack: Any, tmp_path: Path, ledger: Any
) -> None:
    tag = unique("bounce")
    trigger = _priority_journey(stack, tmp_path, tag, ["email"])
    first, second = unique("first"), unique("second")
    shared = f"{tag}@ex.com"
    httpx.post(
        f"{stack.outbox_url}/control/smtp/refuse",
        json={"address": shared, "code": 550},
        timeout=10,
    ).raise_for_status()
    _identify(stack, first, email=shared, first_name="Fi")
    assert post(stack, "track", {"userId": first, "event": trigger}).status_code == 200
    failed = wait_for(lambda: _entries(ledger, first, state="failed"), what="the bounce")
    assert failed[0]["code"] == "550"

    # Another contact with the same address (in another case) is not sent to at all.
    _identify(stack, second, email=shared.upper(), first_name="Se")
    assert post(stack, "track", {"userId": second, "event": trigger}).status_code == 200
    skipped = wait_for(lambda: _entries(ledger, second, state="skipped"), what="the skip")
    assert skipped[0]["reason"].startswith("suppressed: ")
    assert outbox(stack, channel="email", to=shared) == []

    # The list holds a keyed hash and the reason, never the address.
    records = read_topic(stack.bootstrap, SUPPRESSIONS.name)
    assert records
    for key, value in records:
        assert shared.split("@")[0] not in (key or "")
        assert shared.split("@")[0].encode() not in (value or b"")


def test_one_click_unsubscribe_stops_the_next_send(stack: Any, tmp_path: Path, ledger: Any) -> None:
    tag = unique("unsub")
    trigger = f"Enter {tag}"
    publish_inline(
        stack,
        tmp_path,
        tag,
        {"type": "event", "event": trigger},
        [
            {"id": "first", "type": "send", "channel": "email", "template": f"{tag}-email"},
            # Long enough for the unsubscribe to reach the orchestrator on a loaded machine:
            # the first email alone has taken more than 6 s to reach the outbox there.
            {"id": "pause", "type": "wait", "duration": "30s"},
            {"id": "second", "type": "send", "channel": "email", "template": f"{tag}-email"},
            {"id": "done", "type": "exit"},
        ],
        _templates(tag),
    )
    user = unique("reader")
    email = f"{user}@ex.com"
    _identify(stack, user, email=email, first_name="Ida")
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200

    (first,) = wait_for(lambda: outbox(stack, channel="email", to=email), what="the first email")
    header = first["headers"]["List-Unsubscribe"]
    assert first["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = header.strip("<>")
    # A link scanner's GET only shows the confirmation page.
    page = httpx.get(url, timeout=10)
    assert page.status_code == 200
    assert "<form" in page.text
    answer = httpx.post(url, data={"List-Unsubscribe": "One-Click"}, timeout=10)
    assert answer.status_code == 200

    # The orchestrator already knows the contact withdrew: the step is skipped as unreachable
    # and no request is made; the dispatcher holds the same word for requests in flight.
    log = ledger.database["journey_log"]
    skipped = wait_for(
        lambda: list(log.find({"contact_key": user, "step_id": "second", "kind": "skipped"})),
        what="the second send skipped",
    )
    assert skipped[0]["reason"] == "unreachable"

    # The dispatcher's own word, in its consent table (read from the table's changelog).
    def words() -> list[dict[str, Any]]:
        return [
            json.loads(value)
            for key, value in read_topic(stack.bootstrap, "waypost-dispatcher-consent-changelog")
            if key == f"email|{user}" and value
        ]

    assert wait_for(words, what="the dispatcher's consent word")[-1]["given"] is False
    wait_for(
        lambda: list(log.find({"contact_key": user, "kind": "exited"})), what="the journey's end"
    )
    assert len(outbox(stack, channel="email", to=email)) == 1
    assert _entries(ledger, user, step_id="second") == []


def test_a_frequency_cap_skips_and_the_journey_goes_on(
    stack: Any, tmp_path: Path, ledger: Any
) -> None:
    tag = unique("cap")
    trigger = f"Enter {tag}"
    publish_inline(
        stack,
        tmp_path,
        tag,
        {"type": "event", "event": trigger},
        [
            {"id": "first", "type": "send", "channel": "sms", "template": f"{tag}-sms"},
            {"id": "second", "type": "send", "channel": "sms", "template": f"{tag}-sms"},
            {"id": "after", "type": "update_contact", "add_tags": [f"{tag}-went-on"]},
            {"id": "done", "type": "exit"},
        ],
        _templates(tag),
    )
    user = unique("capped")
    phone = "+4850010" + str(abs(hash(user)) % 10000).zfill(4)
    _identify(stack, user, phone=phone)
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200

    capped = wait_for(lambda: _entries(ledger, user, state="skipped"), what="the capped second SMS")
    assert capped[0]["reason"].startswith("frequency_capped")

    def tagged() -> bool:
        answer = httpx.get(f"{stack.admin_url}/v1/contacts/{user}", headers=ADMIN, timeout=10)
        return answer.status_code == 200 and f"{tag}-went-on" in answer.json()["tags"]

    wait_for(tagged, what="the step after the capped send")
    assert len(outbox(stack, channel="sms", to=phone)) == 1


@pytest.mark.serial
def test_throttling_is_retried_and_a_configuration_error_pauses_the_channel(
    stack: Any, tmp_path: Path, ledger: Any
) -> None:
    tag = unique("retry")
    trigger = _priority_journey(stack, tmp_path, tag, ["wechat"])
    throttled, misconfigured = unique("thr"), unique("cfg")
    _identify(stack, throttled, wechat_openid=f"o-{throttled}", first_name="Tao")
    _identify(stack, misconfigured, wechat_openid=f"o-{misconfigured}", first_name="Mei")
    _fail(stack, channel="wechat", recipient=f"o-{throttled}", error="-1", times=2)
    # A bad template id is the account's problem, not the contact's: pause, keep, resend.
    _fail(stack, channel="wechat", recipient=f"o-{misconfigured}", error="40037", times=1)
    for user in (throttled, misconfigured):
        assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200

    def paused() -> bool:
        metrics = httpx.get(
            f"http://127.0.0.1:{stack.ports.dispatcher_metrics}/metrics", timeout=10
        )
        return any(
            line.startswith('waypost_dispatcher_channel_paused_until_seconds{channel="wechat"}')
            and float(line.split()[-1]) > 0
            for line in metrics.text.splitlines()
        )

    wait_for(paused, what="the paused-channel alert metric")
    for user in (throttled, misconfigured):
        wait_for(lambda u=user: outbox(stack, channel="wechat", to=f"o-{u}"), what=f"{user} sent")
        (entry,) = wait_for(
            lambda u=user: _entries(ledger, u, state={"$in": SENT_OR_LATER}), what="sent entry"
        )
        states = [h["state"] for h in entry["history"]]
        assert states[:3] == ["requested", "sending", "retrying"]
        assert states[-2:] == ["sending", "sent"]
    (throttled_entry,) = _entries(ledger, throttled)
    assert throttled_entry["attempt"] == 3  # two refusals, then the send
    assert len(outbox(stack, channel="wechat", to=f"o-{throttled}")) == 1


def _sign_in(client: httpx.Client) -> None:
    """Sign a browser-like client in to the stack's admin UI with its dev key."""
    form = client.get("/sign-in")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token is not None, form.text
    answer = client.post(
        "/sign-in", data={"key": "wp_dev_admin_key", "csrf_token": token[1], "next": "/delivery"}
    )
    assert answer.status_code == 200, answer.text


@pytest.mark.serial
def test_a_paused_channel_is_listed_by_the_admin_with_its_reason_and_alert(
    stack: Any, tmp_path: Path
) -> None:
    tag = unique("pause")
    trigger = _priority_journey(stack, tmp_path, tag, ["wechat"])
    user = unique("cfg")
    _identify(stack, user, wechat_openid=f"o-{user}", first_name="Lin")
    # A bad template id, three times: the channel pauses, and pauses again at each retry.
    _fail(stack, channel="wechat", recipient=f"o-{user}", error="40037", times=3)
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200

    def listed() -> dict[str, Any] | None:
        answer = httpx.get(
            f"{stack.admin_url}/v1/delivery/paused-channels", headers=ADMIN, timeout=10
        )
        assert answer.status_code == 200, answer.text
        return next((p for p in answer.json()["paused"] if p["channel"] == "wechat"), None)

    paused = wait_for(listed, what="the paused WeChat channel in the admin")
    assert "40037" in paused["reason"]
    assert paused["alert_metric"] == (
        'waypost_dispatcher_channel_paused_until_seconds{channel="wechat"}'
    )
    assert "WAYPOST_WECHAT_APP_SECRET" in paused["what_to_fix"]
    assert paused["since"] <= paused["until"]
    with httpx.Client(base_url=stack.admin_url, timeout=30, follow_redirects=True) as client:
        _sign_in(client)

        def alert_shown() -> bool:
            page = client.get("/delivery")
            return 'data-channel="wechat"' in page.text and "40037" in page.text

        wait_for(alert_shown, what="the paused channel's alert on the Delivery page")
    # Once the provider accepts again, the message goes out and the pause ends.
    wait_for(lambda: outbox(stack, channel="wechat", to=f"o-{user}"), what="the send after it")
    wait_for(lambda: listed() is None, what="the pause to end in the admin's list")


def test_retries_end_in_the_dead_letter_topic(stack: Any, tmp_path: Path, ledger: Any) -> None:
    tag = unique("dlq")
    trigger = _priority_journey(stack, tmp_path, tag, ["sms"])
    user = unique("down")
    phone = "+4850020" + str(abs(hash(user)) % 10000).zfill(4)
    _identify(stack, user, phone=phone)
    _fail(stack, channel="sms", recipient=phone, error="503")
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200
    failed = wait_for(
        lambda: _entries(ledger, user, state="failed"), timeout=120, what="retries exhausted"
    )
    assert failed[0]["reason"].startswith("retries_exhausted after 5 attempts")
    assert outbox(stack, channel="sms", to=phone) == []


def test_a_dead_push_token_leaves_the_profile_and_email_takes_over(
    stack: Any, tmp_path: Path, ledger: Any
) -> None:
    tag = unique("push")
    trigger = _priority_journey(stack, tmp_path, tag, ["push", "email"])
    user = unique("device")
    _identify(stack, user, push_tokens=["tok-live", f"tok-dead-{user}"], email=f"{user}@ex.com")
    _fail(stack, channel="push", recipient=f"tok-dead-{user}", error="UNREGISTERED")
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200

    wait_for(lambda: outbox(stack, channel="email", to=f"{user}@ex.com"), what="the email")

    def token_gone() -> list[str] | None:
        answer = httpx.get(f"{stack.admin_url}/v1/contacts/{user}", headers=ADMIN, timeout=10)
        if answer.status_code != 200:  # not in the profile view yet
            return None
        tokens = answer.json()["traits"].get("push_tokens", [])
        return tokens if f"tok-dead-{user}" not in tokens else None

    assert wait_for(token_gone, what="the dead token removed") == ["tok-live"]


def test_reports_and_tracked_links_move_the_ledger(stack: Any, tmp_path: Path, ledger: Any) -> None:
    tag = unique("track")
    trigger = _priority_journey(stack, tmp_path, tag, ["email"])
    user = unique("clicker")
    email = f"{user}@ex.com"
    _identify(stack, user, email=email, first_name="Cy")
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200
    (message,) = wait_for(lambda: outbox(stack, channel="email", to=email), what="the email")
    html = message["html"]
    pixel = html.split('<img src="', 1)[1].split('"', 1)[0]
    click = html.split('href="', 1)[1].split('"', 1)[0].replace("&amp;", "&")
    assert httpx.get(pixel, timeout=10).headers["content-type"] == "image/gif"
    wait_for(lambda: _entries(ledger, user, state="opened"), what="opened")
    answer = httpx.get(click, timeout=10)
    assert answer.status_code == 302
    assert answer.headers["location"] == "https://acme.example/spring"
    (entry,) = wait_for(lambda: _entries(ledger, user, state="clicked"), what="clicked")
    assert [h["state"] for h in entry["history"]] == [
        "requested",
        "sending",
        "sent",
        "opened",
        "clicked",
    ]

    # SMS: the provider's signed status callback reaches ingest and marks the entry delivered.
    sms_tag = unique("delivered")
    sms_trigger = _priority_journey(stack, tmp_path, sms_tag, ["sms"])
    texter = unique("texter")
    _identify(stack, texter, phone="+4850030" + str(abs(hash(texter)) % 10000).zfill(4))
    assert post(stack, "track", {"userId": texter, "event": sms_trigger}).status_code == 200
    wait_for(lambda: _entries(ledger, texter, state="delivered"), what="delivered")


def test_an_unanswered_sms_the_provider_lists_is_sent_not_unknown(
    stack: Any, tmp_path: Path, ledger: Any
) -> None:
    tag = unique("unknown")
    trigger = _priority_journey(stack, tmp_path, tag, ["sms"])
    user = unique("limbo")
    phone = "+4850040" + str(abs(hash(user)) % 10000).zfill(4)
    _identify(stack, user, phone=phone)
    # The provider takes the message and never answers in time; its listing shows it.
    _fail(stack, channel="sms", recipient=phone, error="timeout", seconds=5)
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200
    (entry,) = wait_for(
        lambda: _entries(ledger, user, state={"$in": SENT_OR_LATER}), what="reconciled"
    )
    (text,) = outbox(stack, channel="sms", to=phone)
    assert entry["provider_id"] == text["sid"]
    assert entry["reason"].startswith("reconciled")
    assert entry["attempt"] == 1


def test_an_unanswered_sms_is_asked_about_again_while_the_listing_cannot_be_had(
    stack: Any, tmp_path: Path, ledger: Any
) -> None:
    tag = unique("unlisted")
    trigger = _priority_journey(stack, tmp_path, tag, ["sms"])
    user = unique("limbo")
    phone = "+4850090" + str(abs(hash(user)) % 10000).zfill(4)
    _identify(stack, user, phone=phone)
    # The provider takes the message and never answers in time, and its listing of the number
    # fails twice: the send is not left unknown, the provider is asked again later (the test
    # stack asks after 3 s, then 10 s) until its listing shows the message.
    _fail(stack, channel="sms", recipient=phone, error="timeout", seconds=5)
    _fail(stack, channel="sms", recipient=phone, error="503", times=2, action="list")
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200
    (entry,) = wait_for(
        lambda: _entries(ledger, user, state={"$in": SENT_OR_LATER}), what="reconciled", timeout=90
    )
    (text,) = outbox(stack, channel="sms", to=phone)
    assert entry["provider_id"] == text["sid"]
    assert entry["reason"].startswith("reconciled")
    assert entry["attempt"] == 1
    rules = httpx.get(f"{stack.outbox_url}/control/failures", timeout=10).json()["rules"]
    assert not [r for r in rules if r["recipient"] == phone and r["action"] == "list"]


def test_an_unanswered_email_the_provider_accepted_is_sent_not_unknown(
    stack: Any, tmp_path: Path, ledger: Any
) -> None:
    tag = unique("unanswered")
    trigger = _priority_journey(stack, tmp_path, tag, ["email"])
    user = unique("limbo")
    email = f"{user}@ex.com"
    _identify(stack, user, email=email)
    # The SMTP server takes the message and holds its answer past the client's timeout; the
    # sandbox's events log shows it accepted under its Message-ID.
    _fail(stack, channel="email", recipient=email, error="timeout", seconds=5)
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200
    (entry,) = wait_for(
        lambda: _entries(ledger, user, state={"$in": SENT_OR_LATER}), what="reconciled"
    )
    (message,) = outbox(stack, channel="email", to=email)
    assert entry["provider_id"] == message["headers"]["Message-ID"]
    assert entry["reason"].startswith("reconciled")
    assert entry["attempt"] == 1


def test_an_unanswered_email_is_asked_about_again_while_the_events_cannot_be_had(
    stack: Any, tmp_path: Path, ledger: Any
) -> None:
    tag = unique("unlogged")
    trigger = _priority_journey(stack, tmp_path, tag, ["email"])
    user = unique("limbo")
    email = f"{user}@ex.com"
    _identify(stack, user, email=email)
    # No answer in time, and the events API refuses the first two queries about the message:
    # the send stays `sending` and is asked about again (after 3 s, then 10 s on the test
    # stack) until the log shows it accepted. Never resent meanwhile.
    _fail(stack, channel="email", recipient=email, error="timeout", seconds=5)
    _fail(stack, channel="email", recipient=email, error="503", times=2, action="list")
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200
    (entry,) = wait_for(
        lambda: _entries(ledger, user, state={"$in": SENT_OR_LATER}), what="reconciled", timeout=90
    )
    (message,) = outbox(stack, channel="email", to=email)
    assert entry["provider_id"] == message["headers"]["Message-ID"]
    assert entry["reason"].startswith("reconciled")
    assert entry["attempt"] == 1
    rules = httpx.get(f"{stack.outbox_url}/control/failures", timeout=10).json()["rules"]
    assert not [r for r in rules if r["recipient"] == email and r["action"] == "list"]


def test_an_unanswered_sms_the_provider_never_stored_is_sent_once(
    stack: Any, tmp_path: Path, ledger: Any
) -> None:
    tag = unique("unstored")
    trigger = _priority_journey(stack, tmp_path, tag, ["sms"])
    user = unique("limbo")
    phone = "+4850060" + str(abs(hash(user)) % 10000).zfill(4)
    _identify(stack, user, phone=phone)
    # The provider holds the request past the client's timeout, then refuses it unstored.
    _fail(stack, channel="sms", recipient=phone, error="503", seconds=5, times=1)
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200
    (entry,) = wait_for(
        lambda: _entries(ledger, user, state={"$in": SENT_OR_LATER}), what="the send after"
    )
    assert entry["attempt"] == 2
    assert len(outbox(stack, channel="sms", to=phone)) == 1  # marketing: still at most once


def test_a_marketing_send_the_provider_cannot_tell_about_is_not_repeated(
    stack: Any, tmp_path: Path, ledger: Any
) -> None:
    tag = unique("unknown")
    trigger = _priority_journey(stack, tmp_path, tag, ["sms"])
    user = unique("limbo")
    phone = "+4850070" + str(abs(hash(user)) % 10000).zfill(4)
    _identify(stack, user, phone=phone)
    # The provider holds the request past the client's timeout and refuses it unstored, while
    # another message reaches the number: the listing cannot tell whether ours arrived.
    held = _fail(stack, channel="sms", recipient=phone, error="503", seconds=5, times=1)
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200
    _another_message_during_the_try(stack, held, phone)
    (entry,) = wait_for(lambda: _entries(ledger, user, state="unknown"), what="unknown")
    assert "timed out" in entry["reason"] or "timeout" in entry["reason"].lower()
    assert "not reconciled" in entry["reason"]
    assert len(outbox(stack, channel="sms", to=phone)) == 1  # the other one; ours not resent


def test_a_transactional_send_in_the_unknown_window_is_sent_again(
    stack: Any, tmp_path: Path, ledger: Any
) -> None:
    tag = unique("receipt")
    trigger = f"Enter {tag}"
    path = tmp_path / f"{tag}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "journey": {
                    "id": tag,
                    "name": tag,
                    "transactional": True,
                    "trigger": {"type": "event", "event": trigger},
                    "steps": [
                        {
                            "id": "receipt",
                            "type": "send",
                            "channel": "sms",
                            "template": f"{tag}-sms",
                        },
                        {"id": "done", "type": "exit"},
                    ],
                },
                "templates": {f"{tag}-sms": _templates(tag)[f"{tag}-sms"]},
            },
            sort_keys=False,
        )
    )
    publish_journey(stack, path)
    user = unique("buyer")
    phone = "+4850050" + str(abs(hash(user)) % 10000).zfill(4)
    _identify(stack, user, phone=phone)
    # No answer, and another message to the number meanwhile: the listing cannot tell.
    held = _fail(stack, channel="sms", recipient=phone, error="503", seconds=5, times=1)
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200
    _another_message_during_the_try(stack, held, phone)

    (entry,) = wait_for(
        lambda: _entries(ledger, user, state={"$in": SENT_OR_LATER}), what="the resent receipt"
    )
    assert entry["attempt"] == 2
    # At least once: an unknown receipt is sent again.
    assert len(outbox(stack, channel="sms", to=phone)) == 2  # the other one, and ours


def test_a_transactional_send_the_provider_lists_is_not_sent_again(
    stack: Any, tmp_path: Path, ledger: Any
) -> None:
    tag = unique("receipt")
    trigger = f"Enter {tag}"
    path = tmp_path / f"{tag}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "journey": {
                    "id": tag,
                    "name": tag,
                    "transactional": True,
                    "trigger": {"type": "event", "event": trigger},
                    "steps": [
                        {
                            "id": "receipt",
                            "type": "send",
                            "channel": "sms",
                            "template": f"{tag}-sms",
                        },
                        {"id": "done", "type": "exit"},
                    ],
                },
                "templates": {f"{tag}-sms": _templates(tag)[f"{tag}-sms"]},
            },
            sort_keys=False,
        )
    )
    publish_journey(stack, path)
    user = unique("buyer")
    phone = "+4850080" + str(abs(hash(user)) % 10000).zfill(4)
    _identify(stack, user, phone=phone)
    _fail(stack, channel="sms", recipient=phone, error="timeout", seconds=5, times=1)
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200

    (entry,) = wait_for(
        lambda: _entries(ledger, user, state={"$in": SENT_OR_LATER}), what="the receipt"
    )
    assert entry["attempt"] == 1
    assert len(outbox(stack, channel="sms", to=phone)) == 1
