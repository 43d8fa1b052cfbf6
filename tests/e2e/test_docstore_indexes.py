"""The local document store serves lookups from indexes, not by reading whole collections.

FerretDB 1.x pushes an equality filter down to PostgreSQL as `_jsonb -> $1 @> $2`, which its own
btree indexes cannot serve; the local stack gives every single-field index a GIN twin that can
(deploy/local/ferretdb/index_twins.sql). These tests read PostgreSQL's plan through FerretDB's
`explain` command, for a collection made after the stack started and for an index added later.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.database import Database

from tests.conftest import local_stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

DOCUMENTS = 3000


@pytest.fixture
def db(stack: local_stack.Stack) -> Iterator[Database[dict[str, Any]]]:
    client: MongoClient[dict[str, Any]] = MongoClient(stack.mongo_url, timeoutMS=30_000)
    name = f"indexes_{uuid.uuid4().hex[:8]}"
    try:
        yield client[name]
    finally:
        client.drop_database(name)
        client.close()


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(plan_nodes(child))
    return nodes


def index_used(db: Database[dict[str, Any]], collection: str, filter_: dict[str, Any]) -> str:
    explained = db.command("explain", {"find": collection, "filter": filter_})
    assert explained.get("filterPushdown") is True, explained
    nodes = plan_nodes(explained["queryPlanner"]["Plan"])
    names = [str(n["Index Name"]) for n in nodes if "Index Name" in n]
    assert names, f"the filter {filter_} read the whole table: {explained['queryPlanner']}"
    return names[0]


def test_lookups_by_id_and_by_an_indexed_field_use_an_index(
    db: Database[dict[str, Any]],
) -> None:
    docs = db["ledger"]
    docs.insert_many(
        [{"_id": f"m{i}", "contact_key": f"c{i % 300}", "state": "sent"} for i in range(DOCUMENTS)]
    )
    docs.create_index("contact_key")  # an index added to a collection that already exists

    assert index_used(db, "ledger", {"_id": "m1234"}).endswith("_gin")
    assert index_used(db, "ledger", {"contact_key": "c17"}).endswith("_gin")
    # The twins answer as the table would: the same documents.
    found = docs.find_one({"_id": "m1234"})
    assert found == {"_id": "m1234", "contact_key": "c34", "state": "sent"}
    assert docs.count_documents({"contact_key": "c17"}) == DOCUMENTS // 300
    # An upsert by _id finds its document through the twin too: one document, updated.
    docs.update_one({"_id": "m1234"}, {"$set": {"state": "delivered"}}, upsert=True)
    assert docs.count_documents({"_id": "m1234"}) == 1
    assert docs.find_one({"_id": "m1234"}, {"state": 1}) == {"_id": "m1234", "state": "delivered"}
