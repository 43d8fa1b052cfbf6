"""Input that must not break anything, on the real stack: ingest and the admin API answer hostile
bodies (deep JSON, deep or alias-bombed YAML text) with a 4xx naming the field, a record too
deep for the segmenter that reaches the topic by another route is dead-lettered with the reason
while the contact keeps working, and a schemathesis run over both OpenAPI documents finds no
5xx."""

from __future__ import annotations

import base64
import gzip
import json
import time
from typing import Any

import httpx
import pytest
import schemathesis
from confluent_kafka import Producer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from shared.bodies import MAX_JSON_DEPTH
from shared.contracts import DeadLetter, Event
from shared.deadletter import read_dead_letters
from shared.topics import EVENTS
from tests.e2e.helpers import WRITE_KEY, post, unique, wait_for

pytestmark = pytest.mark.e2e

ADMIN = {"Authorization": "Bearer wp_dev_admin_key"}
WRITE_KEY_AUTH = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}
# Per API operation and generation mode (fitting the schema, and not): about 500 requests in all
# over both documents.
EXAMPLES_PER_OPERATION = 6
# Each schemathesis run's own bound, well under the suite's global timeout (a run took about 40 s
# on an idle test stack): past its budget a run starts no further operation and fails naming
# those it did not reach; the timeout marker stops a call that hangs within one operation (each
# request has a 30 s deadline of its own). The stack's start, when the run is the first test,
# is not counted.
FUZZ_BUDGET_SECONDS = 240
FUZZ_TIMEOUT_SECONDS = 300


def _deep(levels: int) -> str:
    return '{"a":' * levels + "1" + "}" * levels


def _contact(stack: Any, key: str) -> dict[str, Any] | None:
    answer = httpx.get(f"{stack.admin_url}/v1/contacts/{key}", headers=ADMIN, timeout=10)
    return answer.json() if answer.status_code == 200 else None


# --- ingest -----------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH + 1, 199, 250, 5000])
def test_ingest_refuses_nesting_past_the_limit_naming_the_field(stack: Any, levels: int) -> None:
    body = '{"userId":"deep","event":"E","properties":' + _deep(levels) + "}"

    answer = httpx.post(
        f"{stack.ingest_url}/v1/track", content=body, auth=(WRITE_KEY, ""), timeout=30
    )

    assert answer.status_code in (400, 413), answer.text
    if answer.status_code == 400:
        assert answer.json()["field"] == "properties"


def test_a_gzipped_batch_is_accepted_and_a_gzip_bomb_is_refused(stack: Any) -> None:
    user = unique("gzip")
    batch = {"batch": [{"type": "identify", "userId": user, "traits": {"plan": "gz"}}]}
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}

    packed = httpx.post(
        f"{stack.ingest_url}/v1/batch",
        content=gzip.compress(json.dumps(batch).encode()),
        headers=headers,
        auth=(WRITE_KEY, ""),
        timeout=30,
    )
    bomb = httpx.post(
        f"{stack.ingest_url}/v1/batch",
        content=gzip.compress(b'{"batch":[' + b" " * 50_000_000 + b"]}"),
        headers=headers,
        auth=(WRITE_KEY, ""),
        timeout=30,
    )

    assert packed.status_code == 200, packed.text
    assert bomb.status_code == 413, bomb.text
    assert wait_for(
        lambda: (_contact(stack, user) or {}).get("traits", {}).get("plan") == "gz",
        what="the gzipped identify in the profile",
    )


def test_a_non_ascii_write_key_is_unauthorized(stack: Any) -> None:
    answer = httpx.post(
        f"{stack.ingest_url}/v1/track",
        content=b'{"userId":"u","event":"E"}',
        headers=[(b"authorization", b"Basic \xc3\xa9\xc3\xa9")],
        timeout=30,
    )

    assert answer.status_code == 401


# --- the admin API ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ('{"segments":' + _deep(MAX_JSON_DEPTH + 1) + "}", 400, "segments"),
        ('{"segments":' + _deep(3000) + "}", 400, "segments"),
        ('{"segments":[{"id":"\\ud800"}]}', 400, "segments[0].id"),
    ],
    ids=["33-levels", "3000-levels", "lone-surrogate"],
)
def test_the_admin_refuses_hostile_json_naming_the_field(
    stack: Any, body: str, status: int, field: str
) -> None:
    answer = httpx.put(
        f"{stack.admin_url}/v1/segments",
        content=body,
        headers={**ADMIN, "Content-Type": "application/json"},
        timeout=30,
    )

    assert answer.status_code == status, answer.text
    assert answer.json()["field"] == field


def test_the_admin_refuses_a_body_over_its_cap_and_a_non_ascii_key(stack: Any) -> None:
    big = httpx.put(
        f"{stack.admin_url}/v1/segments",
        content=b'{"segments":"' + b"x" * (3 * 1024 * 1024) + b'"}',
        headers={**ADMIN, "Content-Type": "application/json"},
        timeout=30,
    )
    foreign_key = httpx.get(
        f"{stack.admin_url}/v1/segments",
        headers=[(b"authorization", b"Bearer \xc3\xa9t\xc3\xa9")],
        timeout=30,
    )

    assert big.status_code == 413
    assert foreign_key.status_code == 401


# Nine anchors, each a list of nine of the one before: a billion strings once expanded.
ALIAS_BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{name}: &{name} [{', '.join(['*' + before] * 9)}]\n"
    for before, name in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("journey: " + "[" * 3000 + "]" * 3000, "definition: line 1: nested deeper than 32"),
        (ALIAS_BOMB, "definition: line 2: an alias (*name) is not allowed"),
    ],
    ids=["3000-levels", "alias-bomb"],
)
def test_the_admin_refuses_hostile_yaml_naming_the_definition(
    stack: Any, text: str, said: str
) -> None:
    answer = httpx.post(
        f"{stack.admin_url}/v1/journeys/dry-run",
        json={"definition": text, "contact_key": unique("dry-run")},
        headers=ADMIN,
        timeout=30,
    )

    assert answer.status_code == 422, answer.text
    (problem,) = answer.json()["problems"]
    assert problem["rule"] == "yaml"
    assert problem["message"].startswith(said)
    assert httpx.get(f"{stack.admin_url}/health", timeout=10).status_code == 200


# --- the segmenter ----------------------------------------------------------------------------


def test_a_record_too_deep_for_the_segmenter_is_dead_lettered_and_the_contact_keeps_working(
    stack: Any,
) -> None:
    user = unique("deep-record")
    assert post(stack, "identify", {"userId": user, "traits": {"plan": "basic"}}).status_code == 200
    deep = Event.model_validate(
        {
            "type": "identify",
            "userId": user,
            "messageId": unique("deep"),
            "timestamp": "2026-01-01T00:00:00Z",
            "receivedAt": "2026-01-01T00:00:00Z",
            "traits": {"nested": json.loads(_deep(150))},
        }
    )
    producer = Producer({"bootstrap.servers": stack.bootstrap})
    producer.produce(EVENTS.name, key=user.encode(), value=deep.to_wire())
    assert producer.flush(10) == 0
    assert post(stack, "identify", {"userId": user, "traits": {"plan": "pro"}}).status_code == 200

    def dead_lettered() -> DeadLetter | None:
        found = [s.letter for s in read_dead_letters(stack.bootstrap) if s.letter.key == user]
        return found[0] if found else None

    letter = wait_for(dead_lettered, what="the deep record in the dead-letter topic")
    assert "nested deeper than 32 levels" in letter.reason
    assert wait_for(
        lambda: (_contact(stack, user) or {}).get("traits", {}).get("plan") == "pro",
        what="the later identify in the profile",
    )


# --- schemathesis over both OpenAPI documents -------------------------------------------------

# Every generated case of every operation, without shrinking: the same requests each run
# (derandomized), so a failure here reproduces.
FUZZ = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def _server_errors(schema: Any, headers: dict[str, str]) -> tuple[int, list[str]]:
    """Runs every operation of `schema` within `FUZZ_BUDGET_SECONDS`; how many operations, and
    the ones that answered 5xx (or were not reached in time)."""
    failures: list[str] = []
    operations = 0
    deadline = time.monotonic() + FUZZ_BUDGET_SECONDS
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if time.monotonic() > deadline:
                failures.append(
                    f"{operation.label} ({mode}): not run, the {FUZZ_BUDGET_SECONDS} s budget "
                    "was spent"
                )
                continue

            @FUZZ
            @given(case=operation.as_strategy(mode))
            def run(case: Any) -> None:
                answer = case.call(headers=headers, timeout=30)
                case.validate_response(answer, checks=[not_a_server_error])

            try:
                run()
            except Unsatisfiable:
                continue  # nothing of this operation breaks its schema (a free string, say)
            except Exception as exc:  # noqa: BLE001 - every operation runs; all failures are shown
                failures.append(f"{operation.label} ({mode}): {exc}")
    return operations, failures


@pytest.mark.timeout(FUZZ_TIMEOUT_SECONDS, func_only=True)
def test_no_ingest_operation_answers_5xx(stack: Any) -> None:
    schema = schemathesis.openapi.from_url(f"{stack.ingest_url}/openapi.json")

    operations, failures = _server_errors(schema, WRITE_KEY_AUTH)

    assert operations >= 10
    assert failures == []


@pytest.mark.timeout(FUZZ_TIMEOUT_SECONDS, func_only=True)
def test_no_admin_operation_answers_5xx(stack: Any) -> None:
    schema = schemathesis.openapi.from_url(f"{stack.admin_url}/openapi.json", headers=ADMIN)

    operations, failures = _server_errors(schema, ADMIN)

    assert operations >= 20
    assert failures == []
