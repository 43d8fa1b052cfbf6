"""Shared fixtures: the real local stack, started once per test session on its own ports."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy" / "local"))

import stack as local_stack  # noqa: E402

TEST_PORTS = local_stack.Ports(
    kafka=19092,
    kafka_controller=19093,
    mongo=37017,
    smtp=11025,
    outbox=18025,
    ingest=18000,
    admin=18001,
)


@pytest.fixture(scope="session")
def stack() -> Iterator[local_stack.Stack]:
    """Kafka, FerretDB, the SMTP sandbox and all five services, fresh for this session."""
    home = ROOT / ".local" / "test-stack"
    running = local_stack.Stack(home=home, ports=TEST_PORTS, partitions=3)
    running.down()
    shutil.rmtree(home, ignore_errors=True)
    local_stack.setup()
    try:
        running.up()
        yield running
    finally:
        if os.environ.get("WAYPOST_KEEP_TEST_STACK") != "1":
            running.down()
