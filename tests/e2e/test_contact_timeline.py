"""A contact's timeline on the real stack: events posted through ingest, the journey steps they
started and the message it sent, merged newest first by the admin
(`GET /v1/contacts/{key}/timeline`, and the contact's page); and the why of an order that did
not end a wait for an event, on the contact's journey log and timeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo import MongoClient

from tests.e2e.helpers import (
    outbox,
    post,
    publish_inline,
    publish_journey,
    unique,
    wait_for,
    write_journey,
)
from tests.e2e.test_ui import own_admin

pytestmark = pytest.mark.e2e
ADMIN = {"Authorization": "Bearer wp_dev_admin_key"}


def _timeline(stack: Any, user: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{stack.admin_url}/v1/contacts/{user}/timeline", headers=ADMIN, timeout=10)
    assert answer.status_code == 200, answer.text
    lines: list[dict[str, Any]] = answer.json()["lines"]
    return lines


def test_the_timeline_merges_events_journey_steps_and_messages_newest_first(
    stack: Any, tmp_path: Path
) -> None:
    journey = unique("timeline")
    trigger = f"Signed Up {journey}"
    publish_journey(stack, write_journey(tmp_path, journey, trigger, "1h"))
    user = unique("tina")
    email = f"{user}@example.com"
    identify = {"userId": user, "traits": {"email": email, "first_name": "Tina"}}
    assert post(stack, "identify", identify).status_code == 200
    viewed = {"userId": user, "event": "Product Viewed", "properties": {"sku": "A-1", "price": 12}}
    assert post(stack, "track", viewed).status_code == 200
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200
    wait_for(lambda: outbox(stack, to=email), what="the welcome email")

    def complete() -> list[dict[str, Any]] | None:
        lines = _timeline(stack, user)
        kinds = {(line["kind"], line.get("name") or line.get("log_kind")) for line in lines}
        wanted = {
            ("event", "identify"),
            ("event", "Product Viewed"),
            ("event", trigger),
            ("journey", "entered"),
            ("journey", "waiting"),
        }
        sent = any(m["kind"] == "message" and m["state"] != "requested" for m in lines)
        return lines if wanted <= kinds and sent else None

    lines = wait_for(complete, timeout=90, what="the events, steps and message in the timeline")

    def at(kind: str, name: str) -> int:
        return next(
            n
            for n, line in enumerate(lines)
            if line["kind"] == kind and name in (line.get("name"), line.get("log_kind"))
        )

    message = next(n for n, line in enumerate(lines) if line["kind"] == "message")
    # Newest first: the message (at its latest state), the wait, the entry, then the events
    # in the order they were posted, newest first.
    assert message < at("journey", "waiting") < at("journey", "entered") < at("event", trigger)
    assert at("event", trigger) < at("event", "Product Viewed") < at("event", "identify")
    assert lines[at("event", "Product Viewed")]["text"] == "Product Viewed (sku = A-1, price = 12)"
    welcome = lines[message]
    assert (welcome["journey_id"], welcome["step_id"], welcome["channel"]) == (
        journey,
        "welcome",
        "email",
    )
    assert welcome["states"][0]["state"] == "requested"
    assert welcome["states"][-1]["state"] == welcome["state"]
    assert all(line["kind"] != "journey" or line["journey_id"] == journey for line in lines)

    # The API answers only keys with the viewer role or more.
    anonymous = httpx.get(f"{stack.admin_url}/v1/contacts/{user}/timeline", timeout=10)
    assert anonymous.status_code == 401


def test_an_order_that_fails_a_wait_s_where_says_why_the_journey_did_not_move_on(
    stack: Any, tmp_path: Path
) -> None:
    journey = unique("big-order")
    trigger, order = f"Cart Viewed {journey}", f"Order Completed {journey}"
    publish_inline(
        stack,
        tmp_path,
        journey,
        {"type": "event", "event": trigger},
        [
            {
                "id": "wait-order",
                "type": "wait_for_event",
                "event": order,
                "where": {"field": "event.properties.total", "op": "gte", "value": 100},
                "timeout": "2d",
            },
            {"id": "done", "type": "exit"},
        ],
    )
    user = unique("bea")
    assert post(stack, "identify", {"userId": user, "traits": {"plan": "free"}}).status_code == 200
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200

    def waiting() -> bool:
        return any(line.get("log_kind") == "waiting" for line in _timeline(stack, user))

    wait_for(waiting, timeout=60, what="the instance waiting for the order")
    small = {"userId": user, "event": order, "properties": {"total": 40}}
    assert post(stack, "track", small).status_code == 200
    expected = (
        f"not moved on: {order} arrived, but where event.properties.total ≥ 100 failed"
        " (event.properties.total = 40); still waiting until "
    )

    def explained() -> list[dict[str, Any]] | None:
        answer = httpx.get(
            f"{stack.admin_url}/v1/journey-log",
            params={"contact_key": user},
            headers=ADMIN,
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        (path,) = [p for p in answer.json()["paths"] if p["journey_id"] == journey]
        found = [line for line in path["lines"] if line["why"].startswith(expected)]
        return found or None

    (line,) = wait_for(explained, timeout=60, what="the why of the order that did not count")
    assert (line["kind"], line["step_id"]) == ("waiting", "wait-order")
    answer = httpx.get(
        f"{stack.admin_url}/v1/journey-log", params={"contact_key": user}, headers=ADMIN, timeout=10
    ).json()
    assert [(i["state"], i["step_id"]) for i in answer["instances"]] == [("waiting", "wait-order")]
    # The store leaves out what a record holds at its default; the API puts it back.
    (entered,) = [r for r in answer["records"] if r["kind"] == "entered"]
    assert (entered["step_id"], entered["reason"], entered["holdout"]) == (None, None, False)
    client: MongoClient[dict[str, Any]] = MongoClient(stack.mongo_url, timeoutMS=30_000)
    try:
        stored = client["waypost"]["journey_log"].find_one({"contact_key": user, "kind": "entered"})
    finally:
        client.close()
    assert stored is not None
    assert {"step_id", "reason", "holdout"}.isdisjoint(stored)
    assert any(t["text"].startswith(expected) for t in _timeline(stack, user))


def test_with_recent_events_off_the_admin_keeps_none_and_drops_what_was_kept(stack: Any) -> None:
    """`WAYPOST_ADMIN_RECENT_EVENTS=false`: no recent-events view runs, and what an earlier run
    kept is dropped at start (a view that does not run would not erase a forgotten contact's
    events). The timeline still answers, with journey steps and messages only."""
    name = f"timeline_off_{unique('db').replace('-', '_')}"
    client: MongoClient[dict[str, Any]] = MongoClient(stack.mongo_url, timeoutMS=30_000)
    try:
        kept = client[name]["recent_events"]
        kept.insert_one({"_id": "u-kept", "events": [{"event": "Product Viewed"}]})
        env = {"WAYPOST_MONGO_DB": name, "WAYPOST_ADMIN_RECENT_EVENTS": "false"}
        with own_admin(stack, 6, "waypost-admin-timeline-off", env) as admin:
            wait_for(
                lambda: "recent_events" not in client[name].list_collection_names(),
                timeout=60,
                what="the kept recent events dropped",
            )
            answer = httpx.get(
                f"{admin.url}/v1/contacts/u-kept/timeline",
                headers={"Authorization": f"Bearer {admin.viewer[1]}"},
                timeout=10,
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["lines"] == []
    finally:
        client.drop_database(name)
        client.close()
