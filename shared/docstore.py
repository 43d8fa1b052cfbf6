"""The document store client (MongoDB wire protocol: MongoDB in production, FerretDB locally).

Every client gets one deadline (`WAYPOST_MONGO_TIMEOUT_SECONDS`): a call that gets no answer in
time fails with a timeout error (an outage to retry) instead of hanging its caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pymongo import AsyncMongoClient, MongoClient, ReplaceOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, PyMongoError, WriteConcernError

from shared.settings import CommonSettings


def client_options(settings: CommonSettings, app_name: str) -> dict[str, Any]:
    """The options every client of ours gets, blocking or async."""
    deadline_ms = int(settings.mongo_timeout_seconds * 1000)
    return {
        "appname": app_name,
        "tz_aware": True,
        # Client-side operation timeout: covers choosing the server, waiting for a pooled
        # connection, the round trip and any retry, and is sent to the server as maxTimeMS.
        "timeoutMS": deadline_ms,
        # The same bound where an older code path reads the classic timeouts instead.
        "serverSelectionTimeoutMS": deadline_ms,
        "connectTimeoutMS": deadline_ms,
        "socketTimeoutMS": deadline_ms,
        "waitQueueTimeoutMS": deadline_ms,
    }


def connect(
    settings: CommonSettings, app_name: str, *, max_connections: int = 100
) -> AsyncMongoClient[dict[str, Any]]:
    """`max_connections` bounds the operations in flight; the rest wait their turn in order."""
    return AsyncMongoClient(
        settings.mongo_url.get_secret_value(),
        maxPoolSize=max_connections,
        **client_options(settings, app_name),
    )


def connect_blocking(settings: CommonSettings, app_name: str) -> MongoClient[dict[str, Any]]:
    """A blocking client with the same deadline, for scripts and benchmarks."""
    return MongoClient(settings.mongo_url.get_secret_value(), **client_options(settings, app_name))


def connect_or_exit(settings: CommonSettings, app_name: str) -> MongoClient[dict[str, Any]]:
    """For a command: a blocking client, once the store has answered a ping; when it does not
    answer within the deadline, the command exits with one line naming the store."""
    client = connect_blocking(settings, app_name)
    try:
        client.admin.command("ping")
    except PyMongoError as exc:
        client.close()
        # pymongo's message goes on with the timeouts and the whole topology: keep its cause
        reason = str(exc).split(" (configured timeouts")[0].split(", Timeout:")[0]
        raise SystemExit(
            f"waypost: the document store at {settings.redacted_mongo_url()} did not answer within "
            f"{settings.mongo_timeout_seconds:g}s ({reason or type(exc).__name__})"
        ) from exc
    return client


def database(
    client: AsyncMongoClient[dict[str, Any]], settings: CommonSettings
) -> AsyncDatabase[dict[str, Any]]:
    return client[settings.mongo_db]


# FerretDB 1.24 keeps a backend connection open for every statement of an `update` command
# until the whole command ends (each statement's query iterator is closed by a `defer` in the
# command's loop). A bulk update with more statements than its pool holds (80 locally) waits
# for itself forever, and the store stops answering everyone: the wedge seen after the demo.
# Bulk writes therefore go out as commands of at most this many statements; MongoDB does not
# care either way.
STATEMENTS_PER_COMMAND = 16
# FerretDB 1.24 also ignores `ordered: false` in an `update` command: the first statement it
# refuses (an upsert meeting a stored `_id`) ends the command, the statements after it are never
# carried out, and the answer names that one refusal alone. A command of several replacements
# that comes back with an error is therefore sent again one statement at a time (a replacement
# is idempotent), so no statement is lost behind another's refusal. (`insert` and `delete`
# commands go on past a refusal as they should.)


async def bulk_write_unordered(
    collection: AsyncCollection[dict[str, Any]], operations: Sequence[Any]
) -> None:
    """`collection.bulk_write(operations, ordered=False)` in commands the store can finish.

    Raises `BulkWriteError` once every command ran when some documents were refused, with
    each error's `index` into `operations`, as one bulk write would."""
    write_errors: list[dict[str, Any]] = []
    concern_errors: list[dict[str, Any]] = []
    for start in range(0, len(operations), STATEMENTS_PER_COMMAND):
        chunk = list(operations[start : start + STATEMENTS_PER_COMMAND])
        try:
            await collection.bulk_write(chunk, ordered=False)
        except BulkWriteError as exc:
            concern_errors += exc.details.get("writeConcernErrors", [])
            errors = exc.details.get("writeErrors", [])
            updates = [i for i, op in enumerate(chunk) if isinstance(op, ReplaceOne)]
            if len(updates) > 1:
                # The replacements' command may have ended early (above): each one alone.
                errors = [e for e in errors if not isinstance(chunk[e["index"]], ReplaceOne)]
                for i in updates:
                    try:
                        await collection.bulk_write([chunk[i]], ordered=False)
                    except BulkWriteError as alone:
                        errors += [{**e, "index": i} for e in alone.details.get("writeErrors", [])]
                        concern_errors += alone.details.get("writeConcernErrors", [])
            write_errors += [{**error, "index": error["index"] + start} for error in errors]
    if write_errors or concern_errors:
        raise BulkWriteError({"writeErrors": write_errors, "writeConcernErrors": concern_errors})


async def replace_unless_newer(
    collection: AsyncCollection[dict[str, Any]], documents: Sequence[dict[str, Any]], field: str
) -> list[dict[str, Any]]:
    """Each document replaces the stored one with its `_id` when that holds a lower `field`, or
    is inserted when none is stored; one stored with the same `field` or a higher one does not
    match, so the upsert's insert meets the unique `_id` and is refused as a duplicate key. No
    read comes first. Returns the write errors, duplicate keys included, each with its `index`
    into `documents`.

    The `update` commands are sent as they are, in commands the store can finish: pymongo's
    bulk write cannot merge FerretDB's answer to an update with write errors, which leaves out
    `nModified`."""
    errors: list[dict[str, Any]] = []
    for start in range(0, len(documents), STATEMENTS_PER_COMMAND):
        chunk = documents[start : start + STATEMENTS_PER_COMMAND]
        refused = await _replace_unless_newer(collection, chunk, field)
        if refused and len(chunk) > 1:
            # The command may have ended at its first refusal (above): each statement alone.
            refused = []
            for i, doc in enumerate(chunk):
                refused += [
                    {**e, "index": i} for e in await _replace_unless_newer(collection, [doc], field)
                ]
        errors += [{**error, "index": int(error["index"]) + start} for error in refused]
    return errors


async def _replace_unless_newer(
    collection: AsyncCollection[dict[str, Any]], chunk: Sequence[dict[str, Any]], field: str
) -> list[dict[str, Any]]:
    """One `update` command of `replace_unless_newer`; its write errors."""
    answer = await collection.database.command(
        {
            "update": collection.name,
            "updates": [
                {"q": {"_id": doc["_id"], field: {"$lt": doc[field]}}, "u": doc, "upsert": True}
                for doc in chunk
            ],
            "ordered": False,
        }
    )
    if answer.get("writeConcernError"):
        raise WriteConcernError(str(answer["writeConcernError"]))
    return list(answer.get("writeErrors", []))
