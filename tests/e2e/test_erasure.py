"""Erasure that erases, on the real stack: a contact is forgotten mid-journey (its welcome email
sent, its reminder an hour away, products it viewed in the fan-out index on other partitions),
and then no document of the `waypost` database (the admin's recent events for the timeline
included) and no latest value of a compacted topic holds its key, anonymous id, e-mail or phone;
a send request for it queued after the erasure, and a retry of a send the provider refused
before it, end `skipped` and are never delivered."""

from __future__ import annotations

import json
import secrets
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from services.admin.settings import AdminSettings
from shared.contracts import Profile, SendRequest
from shared.docstore import connect_blocking
from shared.settings import CommonSettings
from shared.topics import ALL_TOPICS, OBJECT_RELATIONS, PROFILES, SEND_REQUESTS
from tests.e2e.helpers import (
    outbox,
    partitions_of,
    post,
    publish_inline,
    publish_journey,
    read_topic,
    unique,
    wait_drained,
    wait_for,
    write_journey,
)

pytestmark = pytest.mark.e2e
ADMIN = {"Authorization": "Bearer wp_dev_admin_key"}
RELATIONS_CHANGELOG = "waypost-segmenter-relations-changelog"


def _compacted_topics(bootstrap: str) -> list[str]:
    """The registry's compacted topics and every stream worker's table changelog."""
    listed = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
    changelogs = sorted(n for n in listed if n.startswith("waypost-") and n.endswith("-changelog"))
    return [t.name for t in ALL_TOPICS if t.compacted] + changelogs


def _latest_values(bootstrap: str, topic: str) -> dict[str | None, bytes]:
    """What the compacted topic says now: the latest value per key, tombstones taking the key
    out (compaction drops the tombstone itself a day later, `delete.retention.ms`)."""
    latest: dict[str | None, bytes | None] = {}
    for key, value in read_topic(bootstrap, topic):
        latest[key] = value or None
    return {key: value for key, value in latest.items() if value is not None}


def _traces(stack: Any, database: Any, needles: list[str]) -> list[str]:
    """Where any of `needles` is still found: `collection/_id` or `topic/key`."""
    found: list[str] = []
    lowered = [n.casefold() for n in needles]

    def holds(text: str) -> bool:
        text = text.casefold()
        return any(n in text for n in lowered)

    for name in database.list_collection_names():
        for document in database[name].find({}):
            if holds(json.dumps(document, default=str)):
                found.append(f"{name}/{document.get('_id')}")
    for topic in _compacted_topics(stack.bootstrap):
        for key, value in _latest_values(stack.bootstrap, topic).items():
            if holds(key or "") or holds(value.decode("utf-8", "replace")):
                found.append(f"{topic}/{key}")
    return found


def _indexed(stack: Any, who: str, object_key: str = "") -> bool:
    """Whether the entry of an object (of any, without `object_key`) in the fan-out index, as
    its table's changelog says, names `who`."""
    return any(
        who in json.loads(value)
        for row, value in _latest_values(stack.bootstrap, RELATIONS_CHANGELOG).items()
        if (row or "").startswith(object_key)
    )


def _elsewhere(stack: Any, user: str, object_prefix: str) -> str:
    """A product id whose object key the default partitioner (CRC32 of the key) puts on
    another partition than the contact's."""
    home = zlib.crc32(user.encode()) % stack.partitions
    while True:
        sku = unique("sku")
        if zlib.crc32(f"{object_prefix}{sku}".encode()) % stack.partitions != home:
            return sku


def _contact(stack: Any, user: str) -> int:
    answer = httpx.get(f"{stack.admin_url}/v1/contacts/{user}", headers=ADMIN, timeout=10)
    return answer.status_code


def _timeline(stack: Any, user: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{stack.admin_url}/v1/contacts/{user}/timeline", headers=ADMIN, timeout=10)
    assert answer.status_code == 200, answer.text
    lines: list[dict[str, Any]] = answer.json()["lines"]
    return lines


def test_a_contact_forgotten_mid_journey_leaves_no_trace_and_gets_nothing_more(
    stack: Any, tmp_path: Path
) -> None:
    journey = unique("erasure")
    trigger = f"Trial Started {journey}"
    publish_journey(stack, write_journey(tmp_path, journey, trigger, "1h"))
    # A fan-out journey, so that product views are kept in the object index.
    viewed = f"Product Viewed {journey}"
    publish_inline(
        stack,
        tmp_path,
        f"{journey}-drop",
        {
            "type": "object_event",
            "event": f"Price Dropped {journey}",
            "object_property": "product_id",
            "related_by": {"event": viewed, "property": "product_id", "within": "30d"},
        },
        [{"id": "done", "type": "exit"}],
    )
    user, anonymous = unique("erased"), unique("erased-anon")
    email = f"{user}@example.com"
    phone = "+1555" + "".join(secrets.choice("0123456789") for _ in range(7))
    needles = [user, anonymous, email, phone]
    prefix = f"{viewed}|product_id|"
    anonymous_sku, known_sku = _elsewhere(stack, user, prefix), _elsewhere(stack, user, prefix)

    def view(field: str, who: str, sku: str) -> bool:
        """View the product until the index holds the relation (the fan-out journey may still
        be on its way to the segmenter's definitions)."""
        body = {field: who, "event": viewed, "properties": {"product_id": sku}}
        assert post(stack, "track", body).status_code == 200
        return _indexed(stack, who, prefix + sku)

    # An anonymous visitor who views a product and signs up: the anonymous history (its place in
    # the object index included) merges into the known contact.
    wait_for(lambda: view("anonymousId", anonymous, anonymous_sku), what="the anonymous view")
    seen = post(stack, "track", {"anonymousId": anonymous, "event": f"Page Seen {journey}"})
    assert seen.status_code == 200, seen.text
    traits = {"email": email, "phone": phone, "first_name": "Erin"}
    identify = post(stack, "identify", {"userId": user, "anonymousId": anonymous, "traits": traits})
    assert identify.status_code == 200, identify.text
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200
    wait_for(lambda: view("userId", user, known_sku), what="the contact's view in the index")
    wait_for(
        lambda: not _indexed(stack, anonymous) and _indexed(stack, user, prefix + anonymous_sku),
        what="the anonymous relation taken over by the known contact",
    )
    # The objects live on other partitions than the contact (the premise of this check).
    [home] = partitions_of(stack.bootstrap, PROFILES.name, user)
    for sku in (anonymous_sku, known_sku):
        assert home not in partitions_of(stack.bootstrap, OBJECT_RELATIONS.name, prefix + sku)

    # Mid-journey: the welcome is sent and the instance waits an hour for the reminder.
    wait_for(lambda: outbox(stack, to=email), what="the welcome email")
    client = connect_blocking(CommonSettings(mongo_url=stack.mongo_url), "tests")
    database = client["waypost"]
    try:
        wait_for(
            lambda: database["journey_log"].find_one({"contact_key": user, "kind": "waiting"}),
            what="the instance waiting in the journey log",
        )
        wait_for(
            lambda: database["messages"].find_one({"contact_key": user, "state": "sent"}),
            what="the welcome in the ledger view",
        )
        # The admin's timeline keeps the recent events of the contact and of its anonymous
        # history (those came under the anonymous id, before the merge).
        recent = database["recent_events"]
        wait_for(
            lambda: recent.find_one({"_id": user, "events.name": trigger}),
            what="the contact's recent events in the timeline's view",
        )
        wait_for(
            lambda: recent.find_one({"_id": anonymous, "events.name": f"Page Seen {journey}"}),
            what="the anonymous history's recent events in the timeline's view",
        )
        assert _timeline(stack, user)
        assert _contact(stack, user) == 200
        assert _traces(stack, database, needles)  # the search finds what is there

        answer = httpx.delete(f"{stack.admin_url}/v1/contacts/{user}", headers=ADMIN, timeout=10)
        assert answer.status_code == 202, answer.text

        left: list[str] = []

        def erased() -> bool:
            left[:] = _traces(stack, database, needles)
            return not left

        try:
            wait_for(erased, timeout=120, what="every trace of the contact erased")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; still found in: {left}") from None
        assert _contact(stack, user) == 404
        assert recent.find_one({"_id": user}) is None
        assert recent.find_one({"_id": anonymous}) is None
        assert _timeline(stack, user) == []
        welcome = database["messages"].find_one({"journey_id": journey, "step_id": "welcome"})
        assert welcome is not None
        assert (welcome["state"], welcome["contact_key"]) == ("sent", "forgotten")

        # A send request for the contact queued after the erasure (a copy the orchestrator
        # wrote before it, say) is never delivered.
        now = datetime.now(UTC)
        message_id = unique("after-erasure")
        queued = SendRequest(
            message_id=message_id,
            contact_key=user,
            channel="email",
            template_id=f"{journey}-reminder",
            journey_id=journey,
            journey_version=1,
            instance_id=unique("instance"),
            step_id="reminder",
            requested_at=now,
            profile=Profile(
                contact_key=user,
                user_id=user,
                traits=traits,
                first_seen=now,
                last_seen=now,
                updated_at=now,
            ),
        )
        producer = Producer({"bootstrap.servers": stack.bootstrap})
        producer.produce(SEND_REQUESTS.name, key=user.encode(), value=queued.to_wire())
        assert producer.flush(10) == 0

        skipped = wait_for(
            lambda: database["messages"].find_one({"_id": message_id, "state": "skipped"}),
            what="the request queued after the erasure to end skipped",
        )
        assert (skipped["reason"], skipped["contact_key"]) == ("contact_forgotten", "forgotten")
        assert [m["subject"] for m in outbox(stack, to=email)] == ["Welcome Erin"]
        assert _traces(stack, database, needles) == []
        # The admin's access log named the contact's calls (a read, the forget) by a digest.
        access_log = stack.logfile("admin").read_text()
        contact_digest = AdminSettings().contact_digest()  # the session admin's, as it reads it
        assert f"/v1/contacts/{contact_digest(user)}" in access_log
        assert [n for n in needles if n in access_log] == []
    finally:
        client.close()


def test_a_retry_queued_before_the_erasure_is_skipped_and_never_delivered(
    stack: Any, tmp_path: Path
) -> None:
    journey = unique("erased-retry")
    trigger = f"Enter {journey}"
    publish_inline(
        stack,
        tmp_path,
        journey,
        {"type": "event", "event": trigger},
        [
            {"id": "text", "type": "send", "channel": "sms", "template": f"{journey}-sms"},
            {"id": "done", "type": "exit"},
        ],
        {f"{journey}-sms": {"channel": "sms", "text": "Acme: your trial starts today."}},
    )
    user = unique("erased-retry")
    phone = "+1555" + "".join(secrets.choice("0123456789") for _ in range(7))
    # The provider refuses every try for now (429, try again in 15 s): a retry is queued.
    rule = httpx.post(
        f"{stack.outbox_url}/control/failures",
        json={"channel": "sms", "recipient": phone, "error": "429", "retry_after": 15},
        timeout=10,
    )
    rule.raise_for_status()
    identify = post(stack, "identify", {"userId": user, "traits": {"phone": phone}})
    assert identify.status_code == 200, identify.text
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200

    client = connect_blocking(CommonSettings(mongo_url=stack.mongo_url), "tests")
    messages = client["waypost"]["messages"]
    try:
        retrying = wait_for(
            lambda: messages.find_one({"contact_key": user, "state": "retrying"}),
            what="the refused text waiting for its retry",
        )
        message_id = retrying["_id"]
        answer = httpx.delete(f"{stack.admin_url}/v1/contacts/{user}", headers=ADMIN, timeout=10)
        assert answer.status_code == 202, answer.text
        # The dispatcher has the erasure (the entry no longer names the contact) while the
        # retry is still queued; from now on the provider would take the text.
        wait_for(
            lambda: messages.find_one({"_id": message_id, "contact_key": "forgotten"}),
            what="the erasure at the dispatcher",
        )
        removed = httpx.delete(
            f"{stack.outbox_url}/control/failures/{rule.json()['id']}", timeout=10
        )
        removed.raise_for_status()

        skipped = wait_for(
            lambda: messages.find_one({"_id": message_id, "state": "skipped"}),
            timeout=120,
            what="the queued retry to end skipped",
        )
        assert (skipped["reason"], skipped["contact_key"]) == ("contact_forgotten", "forgotten")
        wait_drained(stack)
        assert outbox(stack, channel="sms", to=phone) == []
        assert messages.find_one({"_id": message_id})["state"] == "skipped"
    finally:
        client.close()
