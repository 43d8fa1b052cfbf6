"""Segments and contacts on the real stack: publishing segment files through the admin API and the
`waypost segments` CLI (refusals name the segment and the rule), the segments, members and
aggregates endpoints, deleting segments that nothing refers to, the profile view materialising
profiles into FerretDB, and forgetting a contact."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Producer

from shared.cli import DefinitionError, delete_segment, publish_segments
from shared.contracts import ContactCommand, Profile, SegmentCount
from shared.settings import CommonSettings
from shared.topics import CONTACT_COMMANDS, PROFILES, SEGMENT_COUNTS
from tests.e2e.helpers import post, read_partitions, unique, wait_for

pytestmark = pytest.mark.e2e
ADMIN = {"Authorization": "Bearer wp_dev_admin_key"}


def _admin(stack: Any, method: str, path: str, body: Any = None, **params: Any) -> httpx.Response:
    return httpx.request(
        method, f"{stack.admin_url}{path}", headers=ADMIN, json=body, params=params, timeout=30
    )


def _settings(stack: Any) -> CommonSettings:
    return CommonSettings(
        kafka_bootstrap=stack.bootstrap,
        mongo_url=stack.mongo_url,
        topic_partitions=stack.partitions,
    )


def _segment_file(prefix: str) -> dict[str, Any]:
    """Two aggregates and two segments, one reading the other; ids unique to this test."""
    return {
        "aggregates": [
            {"id": f"{prefix}_views_7d", "event": "Product Viewed", "window": "7d"},
            {
                "id": f"{prefix}_value",
                "event": "Order Completed",
                "function": "sum",
                "property": "total",
            },
        ],
        "segments": [
            {
                "id": f"{prefix}-browsers",
                "name": "Browsers",
                "condition": {"field": f"aggregates.{prefix}_views_7d", "op": "gte", "value": 2},
            },
            {
                "id": f"{prefix}-big-browsers",
                "condition": {
                    "all": [
                        {"segment": f"{prefix}-browsers"},
                        {"field": f"aggregates.{prefix}_value", "op": "gt", "value": 100},
                    ]
                },
            },
        ],
    }


def _prefix() -> str:
    return unique("t").replace("-", "")


# --- publishing through the admin ------------------------------------------------------------


def test_a_bad_segment_file_is_refused_naming_segment_and_rule(stack: Any) -> None:
    prefix = _prefix()
    bad = {
        "segments": [
            {
                "id": f"{prefix}-bad",
                "condition": {
                    "all": [
                        {"field": "event.properties.plan", "op": "eq", "value": "pro"},
                        {"field": f"aggregates.{prefix}_nothing", "op": "gt", "value": 0},
                    ]
                },
            }
        ]
    }
    refused = _admin(stack, "PUT", "/v1/segments", bad)
    assert refused.status_code == 422, refused.text
    problems = {(p["segment"], p["rule"]) for p in refused.json()["problems"]}
    assert problems == {(f"{prefix}-bad", "segment-roots"), (f"{prefix}-bad", "unknown-aggregate")}
    assert f"segment '{prefix}-bad'" in refused.json()["detail"]

    shape = _admin(stack, "PUT", "/v1/segments", {"segments": [{"id": "Bad Id", "condition": {}}]})
    assert shape.status_code == 422, shape.text
    assert {p["segment"] for p in shape.json()["problems"]} == {"Bad Id"}

    listed = _admin(stack, "GET", "/v1/segments").json()["segments"]
    assert f"{prefix}-bad" not in {s["id"] for s in listed}


def test_published_segments_are_listed_with_counts_and_deleted_when_unused(stack: Any) -> None:
    prefix = _prefix()
    browsers, big = f"{prefix}-browsers", f"{prefix}-big-browsers"
    published = _admin(stack, "PUT", "/v1/segments", _segment_file(prefix))
    assert published.status_code == 201, published.text
    assert published.json() == {
        "published": [
            f"aggregate:{prefix}_views_7d",
            f"aggregate:{prefix}_value",
            f"segment:{browsers}",
            f"segment:{big}",
        ],
        "unchanged": [],
    }
    again = _admin(stack, "PUT", "/v1/segments", _segment_file(prefix))
    assert again.status_code == 200, again.text
    assert again.json()["published"] == []
    assert len(again.json()["unchanged"]) == 4

    listed = _admin(stack, "GET", "/v1/segments")
    assert listed.status_code == 200
    by_id = {s["id"]: s for s in listed.json()["segments"]}
    assert by_id[browsers]["name"] == "Browsers"
    assert by_id[big]["definition"]["condition"]["all"][0] == {"segment": browsers}
    assert by_id[big]["reads"] == {"aggregates": [f"{prefix}_value"], "segments": [browsers]}
    for item in (by_id[browsers], by_id[big]):
        assert isinstance(item["members"], int)
        assert item["members"] >= 0
        assert "counted_at" in item

    one = _admin(stack, "GET", f"/v1/segments/{browsers}")
    assert one.status_code == 200
    assert one.json()["id"] == browsers
    assert set(one.json()) >= {"definition", "members", "counted_at", "published_at"}
    missing = _admin(stack, "GET", f"/v1/segments/{prefix}-nothing")
    assert missing.status_code == 404
    assert f"{prefix}-nothing" in missing.json()["detail"]

    aggregates = {a["id"]: a for a in _admin(stack, "GET", "/v1/aggregates").json()["aggregates"]}
    assert aggregates[f"{prefix}_views_7d"]["definition"]["window"] == "7d"
    assert aggregates[f"{prefix}_views_7d"]["read_by"] == [browsers]
    assert aggregates[f"{prefix}_value"]["definition"]["property"] == "total"

    members = _admin(stack, "GET", f"/v1/segments/{browsers}/members", limit=5)
    assert members.status_code == 200, members.text
    assert members.json()["limit"] == 5
    assert isinstance(members.json()["members"], list)
    for limit in (0, 501, "many"):
        wrong = _admin(stack, "GET", f"/v1/segments/{browsers}/members", limit=limit)
        assert wrong.status_code == 422
        assert wrong.json()["detail"][0]["loc"] == ["query", "limit"]
    no_members = _admin(stack, "GET", f"/v1/segments/{prefix}-nothing/members")
    assert no_members.status_code == 404

    in_use = _admin(stack, "DELETE", f"/v1/segments/{browsers}")
    assert in_use.status_code == 409, in_use.text
    assert in_use.json()["problems"][0]["rule"] == "segment-in-use"
    assert f"segment '{big}' refers to it" in in_use.json()["detail"]

    assert _admin(stack, "DELETE", f"/v1/segments/{big}").status_code == 200
    assert _admin(stack, "DELETE", f"/v1/segments/{browsers}").json() == {
        "id": browsers,
        "deleted": True,
    }
    assert _admin(stack, "GET", f"/v1/segments/{browsers}").status_code == 404
    assert _admin(stack, "DELETE", f"/v1/segments/{browsers}").status_code == 404
    listed_after = {s["id"] for s in _admin(stack, "GET", "/v1/segments").json()["segments"]}
    assert not {browsers, big} & listed_after


def test_a_segment_a_journey_enters_on_is_deleted_only_once_the_journey_is_archived(
    stack: Any,
) -> None:
    prefix = _prefix()
    segment = f"{prefix}-browsers"
    assert _admin(stack, "PUT", "/v1/segments", _segment_file(prefix)).status_code == 201
    template = f"{prefix}-hello"
    assert (
        _admin(stack, "PUT", f"/v1/templates/{template}", {"subject": "Hi", "text": "Hello"})
    ).status_code == 200
    assert _admin(stack, "POST", f"/v1/templates/{template}/ready").status_code == 200
    journey = f"{prefix}-nudge"
    definition = {
        "journey": {
            "id": journey,
            "name": "Nudge browsers",
            "trigger": {"type": "segment", "segment": segment},
            "steps": [{"id": "hello", "type": "send", "template": template}],
        }
    }
    assert _admin(stack, "PUT", f"/v1/journeys/{journey}/draft", definition).status_code == 200
    assert _admin(stack, "POST", f"/v1/journeys/{journey}/publish").status_code == 201
    assert _admin(stack, "DELETE", f"/v1/segments/{prefix}-big-browsers").status_code == 200

    refused = _admin(stack, "DELETE", f"/v1/segments/{segment}")
    assert refused.status_code == 409, refused.text
    assert f"journey '{journey}' (active) refers to it" in refused.json()["detail"]

    assert _admin(stack, "POST", f"/v1/journeys/{journey}/archive").status_code == 200
    assert _admin(stack, "DELETE", f"/v1/segments/{segment}").status_code == 200


# --- publishing with the CLI -----------------------------------------------------------------


def test_the_cli_publishes_reports_unchanged_and_refuses_to_delete_what_is_in_use(
    stack: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = _prefix()
    path = tmp_path / "segments.json"
    path.write_text(json.dumps(_segment_file(prefix)))
    settings = _settings(stack)

    assert publish_segments(settings, [path]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"published  aggregate {prefix}_views_7d (count of Product Viewed over 7d)",
        f"published  aggregate {prefix}_value (sum of Order Completed)",
        f"published  segment {prefix}-browsers",
        f"published  segment {prefix}-big-browsers",
    ]
    assert publish_segments(settings, [path]) == 0
    assert all(line.startswith("unchanged  ") for line in capsys.readouterr().out.splitlines())

    # The admin follows the definitions topic: it lists what was published a moment later.
    def listed() -> bool:
        ids = {s["id"] for s in _admin(stack, "GET", "/v1/segments").json()["segments"]}
        return {f"{prefix}-browsers", f"{prefix}-big-browsers"} <= ids

    wait_for(listed, timeout=60, what="the published segments in the admin's list")

    with pytest.raises(DefinitionError, match=r"\[segment-in-use\]"):
        delete_segment(settings, f"{prefix}-browsers")
    with pytest.raises(DefinitionError, match=r"\[segment-published\]"):
        delete_segment(settings, f"{prefix}-nothing")
    assert delete_segment(settings, f"{prefix}-big-browsers") == 0
    assert capsys.readouterr().out == f"deleted    segment {prefix}-big-browsers\n"
    wait_for(
        lambda: _admin(stack, "GET", f"/v1/segments/{prefix}-big-browsers").status_code == 404,
        what="the admin to see the deletion",
    )


def test_the_cli_refuses_a_file_against_what_is_published(stack: Any, tmp_path: Path) -> None:
    prefix = _prefix()
    path = tmp_path / "reader.yaml"
    path.write_text(
        f"segments: [{{id: {prefix}-reader, condition: {{segment: {prefix}-elsewhere}}}}]\n"
    )
    with pytest.raises(DefinitionError) as refused:
        publish_segments(_settings(stack), [path])
    assert str(refused.value) == (
        f"{path}: segment '{prefix}-reader': refers to segment '{prefix}-elsewhere', which is "
        "neither in the file nor published [unknown-segment]"
    )


# --- contacts: the profile view and forgetting -----------------------------------------------


def _contact(stack: Any, key: str) -> dict[str, Any] | None:
    answer = _admin(stack, "GET", f"/v1/contacts/{key}")
    if answer.status_code == 404:
        return None
    assert answer.status_code == 200, answer.text
    contact: dict[str, Any] = answer.json()
    return contact


def test_an_identified_contact_is_stored_and_forgetting_it_is_accepted(stack: Any) -> None:
    user = unique("forget-me")
    traits = {"email": f"{user}@example.com", "plan.tier": "gold", "$score": 7}
    assert post(stack, "identify", {"userId": user, "traits": traits}).status_code == 200

    stored = wait_for(lambda: _contact(stack, user), what=f"the profile of {user} in the store")
    assert stored["contact_key"] == user
    assert stored["traits"] == traits
    assert stored["first_seen"].startswith(str(datetime.now(UTC).year))

    forgotten = _admin(stack, "DELETE", f"/v1/contacts/{user}")
    assert forgotten.status_code == 202, forgotten.text
    assert forgotten.json()["contact_key"] == user
    command_id = forgotten.json()["command_id"]
    commands = wait_for(
        lambda: [c for c in _commands(stack, user) if c.command_id == command_id],
        what="the forget command on the contact-commands topic",
    )
    assert commands[0].kind == "forget"
    assert commands[0].reason == "admin"


def _commands(stack: Any, key: str) -> list[ContactCommand]:
    """The contact commands keyed by `key`, read from the start of every partition to its end
    (a partition that ends in a transaction marker included)."""
    return [
        ContactCommand.model_validate_json(value or b"")
        for _partition, found, value in read_partitions(stack.bootstrap, CONTACT_COMMANDS.name)
        if found == key
    ]


def test_the_profile_view_keeps_the_last_profile_and_deletes_on_a_tombstone(stack: Any) -> None:
    key = unique("view")
    now = datetime.now(UTC)
    profile = Profile(
        contact_key=key,
        first_seen=now,
        last_seen=now,
        updated_at=now,
        traits={"name": "Ada"},
        recent_message_ids=("m-1",),
    )
    producer = Producer({"bootstrap.servers": stack.bootstrap, "enable.idempotence": True})
    for segments in (("a",), ("a", "b"), ("b",)):
        changed = profile.model_copy(update={"segments": segments})
        producer.produce(PROFILES.name, key=key, value=changed.to_wire())
    assert producer.flush(10) == 0

    stored = wait_for(
        lambda: (c := _contact(stack, key)) and c["segments"] == ["b"] and c,
        what="the last profile in the store",
    )
    assert stored["traits"] == {"name": "Ada"}
    assert "recent_message_ids" not in stored

    producer.produce(PROFILES.name, key=key, value=None)
    assert producer.flush(10) == 0
    wait_for(lambda: _contact(stack, key) is None, what="the tombstone to delete the profile")


def test_members_are_sampled_from_the_stored_profiles(stack: Any) -> None:
    prefix = _prefix()
    # A condition no contact of the shared stack meets: publishing a segment re-checks every
    # stored contact, and other tests' shoppers would join one on product views, say.
    segment = f"{prefix}-sampled"
    file = {"segments": [{"id": segment, "condition": {"tag": f"{prefix}-nobody-has-this"}}]}
    assert _admin(stack, "PUT", "/v1/segments", file).status_code == 201
    now = datetime.now(UTC)
    producer = Producer({"bootstrap.servers": stack.bootstrap, "enable.idempotence": True})
    keys = [unique(f"member-{n}") for n in range(3)]
    for key in keys:
        profile = Profile(
            contact_key=key, first_seen=now, last_seen=now, updated_at=now, segments=(segment,)
        )
        producer.produce(PROFILES.name, key=key, value=profile.to_wire())
    assert producer.flush(10) == 0

    def sample(limit: int) -> list[str]:
        answer = _admin(stack, "GET", f"/v1/segments/{segment}/members", limit=limit)
        assert answer.status_code == 200, answer.text
        return [m["contact_key"] for m in answer.json()["members"]]

    def all_three() -> list[str] | None:
        found = sample(500)
        return found if len(found) == 3 else None

    assert sorted(wait_for(all_three, what="three members in the store")) == sorted(keys)
    assert len(sample(2)) == 2


def test_counts_sum_the_latest_count_of_every_partition(stack: Any) -> None:
    prefix = _prefix()
    segment = f"{prefix}-tagged"
    file = {"segments": [{"id": segment, "condition": {"tag": f"{prefix}-nobody-has-this"}}]}
    assert _admin(stack, "PUT", "/v1/segments", file).status_code == 201
    # Partitions the topics do not have, so no worker writes these keys. The workers publish the
    # real partitions' zero counts as of now; these times lie ahead of theirs.
    ahead = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    first, second, newest = (ahead + timedelta(minutes=minute) for minute in (0, 5, 9))
    producer = Producer({"bootstrap.servers": stack.bootstrap, "enable.idempotence": True})
    for partition, members, at in ((900, 3, first), (901, 4, newest), (900, 5, second)):
        count = SegmentCount(segment_id=segment, partition=partition, members=members, at=at)
        producer.produce(SEGMENT_COUNTS.name, key=f"{segment}/{partition}", value=count.to_wire())
    assert producer.flush(10) == 0

    def counted() -> dict[str, Any] | None:
        answer: dict[str, Any] = _admin(stack, "GET", f"/v1/segments/{segment}").json()
        return answer if answer["members"] == 9 else None

    found = wait_for(counted, what="the counts of both partitions, the latest of each")
    assert datetime.fromisoformat(found["counted_at"]) == newest
    listed = {s["id"]: s for s in _admin(stack, "GET", "/v1/segments").json()["segments"]}
    assert listed[segment]["members"] == 9
