"""Shared fixtures: the real local stack, started once per test session on its own ports."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy" / "local"))

import stack as local_stack  # noqa: E402

# WAYPOST_TEST_PORT_OFFSET moves every test port (and the stack's folder), so a second test
# session can run beside one that already uses the default ports.
PORT_OFFSET = int(os.environ.get("WAYPOST_TEST_PORT_OFFSET", "0"))


def ports_at(offset: int) -> local_stack.Ports:
    """A test stack's ports, all moved by `offset`."""
    return local_stack.Ports(
        kafka=19092 + offset,
        kafka_controller=19093 + offset,
        postgres=15432 + offset,
        mongo=17017 + offset,
        smtp=11025 + offset,
        outbox=18025 + offset,
        ingest=18000 + offset,
        admin=18001 + offset,
        dispatcher_metrics=19464 + offset,
        kafka_sasl=19094 + offset,
    )


TEST_PORTS = ports_at(PORT_OFFSET)
# Delivery timing scaled down so retries, pauses and timeouts play out within a test.
TEST_DELIVERY_ENV = {
    "WAYPOST_RETRY_SHORT_SECONDS": "1",
    "WAYPOST_RETRY_MEDIUM_SECONDS": "2",
    "WAYPOST_RETRY_LONG_SECONDS": "3",
    "WAYPOST_PROVIDER_PAUSE_SECONDS": "3",
    "WAYPOST_PROVIDER_TIMEOUT_SECONDS": "2",
    "WAYPOST_SMTP_TIMEOUT_SECONDS": "2",
    # Not scaled down: the product's default. A settle counted from the try's start once took
    # a killed worker's last requests, not yet read by the busy sandbox, for absent (the
    # settle now counts from when the new owner took the partition).
    "WAYPOST_SMS_RECONCILE_SETTLE_SECONDS": "10",
    "WAYPOST_SMS_RECONCILE_AGAIN_SECONDS": "[3, 10, 30]",
    "WAYPOST_EMAIL_RECONCILE_SETTLE_SECONDS": "3",
    "WAYPOST_EMAIL_RECONCILE_AGAIN_SECONDS": "[3, 10, 30]",
    "WAYPOST_FREQUENCY_CAPS": '{"sms": {"per_day": 1}}',
}
TEST_HOME = ROOT / ".local" / ("test-stack" if PORT_OFFSET == 0 else f"test-stack-{PORT_OFFSET}")


def session_stack() -> local_stack.Stack:
    """The test stack on this session's ports (not started)."""
    return local_stack.Stack(
        home=TEST_HOME, ports=TEST_PORTS, partitions=3, extra_env=TEST_DELIVERY_ENV
    )


@contextlib.contextmanager
def fresh_stack() -> Iterator[local_stack.Stack]:
    """The test stack, wiped and started; stopped afterwards, also on a failure, unless
    `WAYPOST_KEEP_TEST_STACK=1`."""
    running = session_stack()
    running.down()
    shutil.rmtree(TEST_HOME, ignore_errors=True)
    local_stack.setup()
    try:
        running.up()
        yield running
    finally:
        if os.environ.get("WAYPOST_KEEP_TEST_STACK") != "1":
            running.down()


@pytest.fixture(scope="session")
def stack() -> Iterator[local_stack.Stack]:
    """Kafka, FerretDB, the SMTP sandbox and all five services, fresh for this session.

    With `WAYPOST_TEST_STACK=attach` (how `make test` runs pytest, see tests/run.py) the tests
    use a test stack that is already up, and leave it up: several pytest runs, and the worker
    processes of one run, share it."""
    running = session_stack()
    if os.environ.get("WAYPOST_TEST_STACK") == "attach":
        down = sorted(name for name, pid in running.status().items() if pid is None)
        if down:
            pytest.fail(f"WAYPOST_TEST_STACK=attach, but the test stack is not up: {down} stopped")
        yield running
        # Services this run started again (after a test killed one) run on for the next run:
        # their process handles are let go without the warning of a child still running.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            running.children.clear()
            gc.collect()
        return
    with fresh_stack() as started:
        yield started


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """First-start tests go first, on the brand-new stack they check. Chaos tests go last: the
    thousands of contacts and messages they leave behind would slow the stack under the tests
    that come after them. The soak goes after them all: the demo's journeys it publishes keep
    working on the stack (audiences, waits) and would slow even the chaos tests."""

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("first_start") is not None:
            return 0
        if item.get_closest_marker("soak") is not None:
            return 3
        return 2 if item.get_closest_marker("chaos") is not None else 1

    items.sort(key=rank)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test that ran on the stack reports where the stack stood: processes, consumer
    groups and each service's last warnings (tests/e2e/diagnose.py). The process and group lines
    also go into the failure's one-line summary, which survives any truncation of the output."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    running = getattr(item, "funcargs", {}).get("stack")
    if report.when != "call" or not report.failed or running is None:
        return
    from tests.e2e.diagnose import stack_report, summary

    try:
        text = stack_report(running)
    except Exception as exc:  # noqa: BLE001 (the diagnosis must never hide the failure)
        text = f"no stack report: {exc!r}"
    report.sections.append(("stack when the test failed", text))
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        crash.message = f"{crash.message} [stack: {summary(text)}]"
