"""The admin API over the real stack, and SMTP refusals classified by the dispatcher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo import MongoClient

from shared.docstore import connect_blocking
from shared.settings import CommonSettings
from tests.e2e.helpers import outbox, post, publish_journey, unique, wait_for, write_journey

pytestmark = pytest.mark.e2e
ADMIN = {"Authorization": "Bearer wp_dev_admin_key"}


@pytest.fixture(scope="module")
def ledger(stack: Any) -> Any:
    client: MongoClient[dict[str, Any]] = connect_blocking(
        CommonSettings(mongo_url=stack.mongo_url), "tests"
    )
    yield client["waypost"]["messages"]
    client.close()


def _refuse(stack: Any, address: str, code: int) -> None:
    answer = httpx.post(
        f"{stack.outbox_url}/control/smtp/refuse",
        json={"address": address, "code": code, "message": "test refusal"},
        timeout=10,
    )
    answer.raise_for_status()


def _enter(stack: Any, tmp_path: Path, name: str) -> tuple[str, str]:
    journey = unique(name)
    trigger = f"Enter {journey}"
    publish_journey(stack, write_journey(tmp_path, journey, trigger, "1h"))
    user = unique(name)
    email = f"{user}@example.com"
    post(stack, "identify", {"userId": user, "traits": {"email": email, "first_name": "Lee"}})
    return user, trigger


def test_admin_requires_its_own_key(stack: Any) -> None:
    assert httpx.get(f"{stack.admin_url}/v1/journeys", timeout=10).status_code == 401
    write_key_as_bearer = {"Authorization": "Bearer wp_dev_write_key"}
    answer = httpx.get(f"{stack.admin_url}/v1/journeys", headers=write_key_as_bearer, timeout=10)
    assert answer.status_code == 401
    assert httpx.get(f"{stack.admin_url}/health", timeout=10).status_code == 200


def test_admin_lists_published_journeys_and_counts_entries(stack: Any, tmp_path: Path) -> None:
    user, trigger = _enter(stack, tmp_path, "listed")
    journey_id = trigger.removeprefix("Enter ")

    def listed() -> list[dict[str, Any]]:
        answer = httpx.get(f"{stack.admin_url}/v1/journeys", headers=ADMIN, timeout=10)
        return [j for j in answer.json()["journeys"] if j["id"] == journey_id]

    journeys = wait_for(listed, what="the journey in the admin list")
    assert journeys[0]["version"] == 1
    assert journeys[0]["trigger"]["event"] == trigger

    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200

    def counted() -> dict[str, int] | None:
        stats = httpx.get(f"{stack.admin_url}/v1/stats", headers=ADMIN, timeout=10).json()
        kinds: dict[str, int] = stats["journeys"].get(journey_id, {})
        return kinds if kinds.get("waiting") == 1 else None

    kinds = wait_for(counted, what="the entry in the journey log")
    assert kinds["entered"] == 1
    detail = httpx.get(f"{stack.admin_url}/v1/journeys/{journey_id}", headers=ADMIN, timeout=10)
    assert detail.json()["versions"][0]["journey"]["steps"][1]["duration"] == "1h"
    missing = httpx.get(f"{stack.admin_url}/v1/journeys/nope", headers=ADMIN, timeout=10)
    assert missing.status_code == 404


def test_permanent_smtp_refusal_fails_the_message(stack: Any, tmp_path: Path, ledger: Any) -> None:
    user, trigger = _enter(stack, tmp_path, "bounce")
    _refuse(stack, f"{user}@example.com", 550)
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200

    entry = wait_for(
        lambda: ledger.find_one({"contact_key": user, "state": "failed"}),
        what="the failed ledger entry",
    )
    assert "550" in entry["reason"]
    # Refused at RCPT, while staged: never `sending`, since it could not have arrived.
    assert [h["state"] for h in entry["history"]] == ["requested", "failed"]
    assert outbox(stack, to=f"{user}@example.com") == []


def test_transient_smtp_refusal_is_retried_until_it_is_sent(
    stack: Any, tmp_path: Path, ledger: Any
) -> None:
    user, trigger = _enter(stack, tmp_path, "retry")
    email = f"{user}@example.com"
    # The server refuses the first two tries with 451, then takes the message: no race with the
    # retries' timing on a loaded machine (the rule is used up, and so gone, once answered).
    httpx.post(
        f"{stack.outbox_url}/control/failures",
        json={"channel": "email", "recipient": email, "error": "451", "times": 2},
        timeout=10,
    ).raise_for_status()
    assert post(stack, "track", {"userId": user, "event": trigger}).status_code == 200

    wait_for(lambda: outbox(stack, to=email), what="the email after the retries")
    entry = wait_for(
        lambda: ledger.find_one({"contact_key": user, "state": "sent"}),
        what="the sent ledger entry",
    )
    states = [h["state"] for h in entry["history"]]
    # The two refused tries were refused while staged: only the third was ever `sending`.
    assert states[:2] == ["requested", "retrying"]
    assert states[-2:] == ["sending", "sent"]
    assert states.count("sending") == 1
    assert entry["attempt"] == 3
    assert len(outbox(stack, to=email)) == 1
