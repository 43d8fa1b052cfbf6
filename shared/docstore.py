"""The document store client (MongoDB wire protocol: MongoDB in production, FerretDB locally)."""

from __future__ import annotations

from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from shared.settings import CommonSettings


def connect(
    settings: CommonSettings, app_name: str, *, max_connections: int = 100
) -> AsyncMongoClient[dict[str, Any]]:
    """`max_connections` bounds the operations in flight; the rest wait their turn in order."""
    return AsyncMongoClient(
        settings.mongo_url,
        appname=app_name,
        tz_aware=True,
        serverSelectionTimeoutMS=10_000,
        maxPoolSize=max_connections,
    )


def database(
    client: AsyncMongoClient[dict[str, Any]], settings: CommonSettings
) -> AsyncDatabase[dict[str, Any]]:
    return client[settings.mongo_db]
