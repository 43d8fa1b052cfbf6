"""CSV import of tags and traits on the real stack, through an admin process of its own with a
publisher key and a viewer key: a dry run counts and sends nothing, a file with problems is
refused whole by row and column, an import reaches the profiles through the segmenter, the
audit log keeps its counts (not the file), and a viewer is refused."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.helpers import post, unique, wait_for
from tests.e2e.test_ui import UiAdmin, own_admin

pytestmark = pytest.mark.e2e
CSV = {"Content-Type": "text/csv"}


@pytest.fixture(scope="module")
def admin(stack: Any) -> Iterator[UiAdmin]:
    with own_admin(stack, 5, "waypost-admin-import") as started:
        yield started


def _as(key: tuple[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key[1]}"}


def _import(admin: UiAdmin, text: str, key: tuple[str, str], **params: str) -> httpx.Response:
    return httpx.post(
        f"{admin.url}/v1/contacts/import",
        content=text.encode(),
        headers={**_as(key), **CSV},
        params=params,
        timeout=60,
    )


def _profile(admin: UiAdmin, user: str) -> dict[str, Any] | None:
    answer = httpx.get(f"{admin.url}/v1/contacts/{user}", headers=_as(admin.viewer), timeout=10)
    return answer.json() if answer.status_code == 200 else None


def test_a_csv_import_tags_contacts_and_sets_their_traits(stack: Any, admin: UiAdmin) -> None:
    users = [unique("imp") for _ in range(3)]
    tag = unique("vip")
    for user in users:
        answer = post(stack, "identify", {"userId": user, "traits": {"plan": "free"}})
        assert answer.status_code == 200, answer.text
    for user in users:
        wait_for(lambda u=user: _profile(admin, u), what=f"{user}'s stored profile")
    text = (
        "contact_key,tags,plan,city\n"
        f"{users[0]},{tag};beta,gold,Lyon\n"
        f"{users[1]},{tag},,Oslo\n"
        f"{users[2]},,silver,\n"
        f"{users[0]},{tag}-again,,\n"
    )

    checked = _import(admin, text, admin.publisher, dry_run="true")
    assert checked.status_code == 200, checked.text
    counts = {"rows": 4, "contacts": 3, "tags_added": 4, "traits_set": 4}
    assert checked.json() == {"dry_run": True, **counts}

    bad = text + f"{unique('nobody')},x,,\n,y,,\n{users[1]},,,{'z' * 2000}\n"
    refused = _import(admin, bad, admin.publisher)
    assert refused.status_code == 422, refused.text
    assert [(p["row"], p["column"]) for p in refused.json()["problems"]] == [
        (7, "contact_key"),
        (8, "city"),
    ]
    refused = _import(admin, text + f"{unique('nobody')},x,,\n", admin.publisher)
    assert refused.status_code == 422, refused.text
    assert [(p["row"], p["column"]) for p in refused.json()["problems"]] == [(6, "contact_key")]

    done = _import(admin, text, admin.publisher)
    assert done.status_code == 202, done.text
    assert done.json() == {"dry_run": False, **counts, "commands": 8}

    expected = {
        users[0]: ({tag, "beta", f"{tag}-again"}, {"plan": "gold", "city": "Lyon"}),
        users[1]: ({tag}, {"plan": "free", "city": "Oslo"}),
        users[2]: (set(), {"plan": "silver"}),
    }
    for user, (tags, traits) in expected.items():

        def applied(u: str = user, t: set[str] = tags, v: dict[str, str] = traits) -> bool:
            profile = _profile(admin, u)
            return (
                profile is not None
                and t <= set(profile.get("tags") or [])
                and all(profile["traits"].get(name) == value for name, value in v.items())
            )

        wait_for(applied, what=f"{user}'s imported tags and traits")

    audit = httpx.get(
        f"{admin.url}/v1/audit",
        headers=_as(admin.publisher),
        params={"key": admin.publisher[0], "limit": 10},
        timeout=10,
    )
    assert audit.status_code == 200, audit.text
    imports = [e for e in audit.json()["entries"] if e["route"] == "/v1/contacts/import"]
    assert [e["status"] for e in imports] == [202, 422, 422, 200]
    assert imports[0]["counts"] == {**counts}
    assert imports[1]["counts"] == {"problems": 1}
    assert all(user not in str(imports) and tag not in str(imports) for user in users)


def test_an_import_needs_the_publisher_role_and_a_csv_body(admin: UiAdmin) -> None:
    text = "contact_key,tags\nsomeone,vip\n"
    refused = _import(admin, text, admin.viewer)
    assert refused.status_code == 403, refused.text
    assert refused.json()["required_role"] == "publisher"
    as_json = httpx.post(
        f"{admin.url}/v1/contacts/import",
        json={"contact_key": "someone"},
        headers=_as(admin.publisher),
        timeout=10,
    )
    assert as_json.status_code == 415, as_json.text
    assert "Content-Type" in as_json.json()["detail"]
    too_big = _import(admin, "contact_key,plan\n" + "u,x\n" * 600_000, admin.publisher)
    assert too_big.status_code == 413, too_big.text
    assert too_big.json()["field"] == "Content-Length"
    too_long = _import(admin, "contact_key,plan\n" + "u,x\n" * 10_001, admin.publisher)
    assert too_long.status_code == 422, too_long.text
    assert too_long.json()["problems"] == [
        {"row": 10_002, "column": None, "message": "at most 10000 rows after the header"}
    ]
