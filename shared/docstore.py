"""The document store client (MongoDB wire protocol: MongoDB in production, FerretDB locally)."""

from __future__ import annotations

from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from shared.settings import CommonSettings


def connect(settings: CommonSettings, app_name: str) -> AsyncMongoClient[dict[str, Any]]:
    return AsyncMongoClient(
        settings.mongo_url, appname=app_name, tz_aware=True, serverSelectionTimeoutMS=10_000
    )


def database(
    client: AsyncMongoClient[dict[str, Any]], settings: CommonSettings
) -> AsyncDatabase[dict[str, Any]]:
    return client[settings.mongo_db]
