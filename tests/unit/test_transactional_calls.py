"""A transactional call that never returns is reported as a wedged producer, on a thread of its
own; one that returns or raises is awaited as it is. Retries of a call that meets an earlier
one of its API still in progress (its caller was cancelled, its thread blocked in librdkafka)
count toward the same limit."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from structlog.testing import capture_logs

from shared import kafka
from shared.kafka import (
    ProducerWedged,
    TransactionDoomed,
    _blocking,
    _transactional,
    fatal_error,
)


async def test_a_call_blocked_past_its_deadline_is_a_wedged_producer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kafka, "RUNNING_STEP_SECONDS", 0.05)
    release = threading.Event()
    try:
        with pytest.raises(ProducerWedged) as raised:
            await _blocking(lambda: release.wait(30) and None, deadline=0.2)
        # A worker that catches a doomed transaction catches this too.
        assert isinstance(raised.value, TransactionDoomed)
    finally:
        release.set()


async def test_time_the_process_spent_stopped_does_not_count_toward_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process stopped past a call's deadline (SIGSTOP) wakes with the wall clock's deadline
    gone: the call still gets its running time, and what it then answers counts."""
    monkeypatch.setattr(kafka, "RUNNING_STEP_SECONDS", 0.1)
    reads = [0]

    def clock() -> float:
        # From its second reading on, 1,000 s later: the first step seems to have taken that
        # long (the process was stopped during it).
        reads[0] += 1
        return time.monotonic() + (1000.0 if reads[0] > 1 else 0.0)

    finished: list[bool] = []
    await _blocking(
        lambda: finished.append(not threading.Event().wait(0.5)), deadline=1.0, clock=clock
    )
    assert finished == [True]


async def test_the_call_runs_on_a_thread_of_its_own() -> None:
    seen: list[str] = []
    await _blocking(lambda: seen.append(threading.current_thread().name), deadline=5)
    assert seen == ["kafka-transactional-call"]


async def test_what_the_call_raises_reaches_the_caller() -> None:
    def refuse() -> None:
        raise KafkaException(KafkaError(KafkaError._FENCED, "fenced", fatal=True))

    with pytest.raises(KafkaException):
        await _blocking(refuse, deadline=5)


async def test_a_retriable_error_is_asked_again_then_the_call_returns() -> None:
    calls: list[int] = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "timed out", retriable=True))

    await _transactional(flaky, deadline=5)
    assert len(calls) == 3


async def test_calls_that_keep_timing_out_are_a_wedged_producer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a broker restart librdkafka can leave a request to the transaction coordinator
    queued on a connection it never makes again: every call times out after its own timeout,
    for ever. Once those timeouts add up to the wedge limit, the producer is taken for wedged
    (and replaced), not asked again."""
    monkeypatch.setattr(kafka, "WEDGED_AFTER_SECONDS", 0.5)
    calls: list[int] = []

    def never_answered() -> None:
        calls.append(1)
        time.sleep(0.2)  # the call's own timeout, shortened
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "timed out", retriable=True))

    with pytest.raises(ProducerWedged):
        await _transactional(never_answered, deadline=5)
    assert len(calls) == 3  # 0.2 + 0.2 + 0.2 s of timeouts reach the 0.5 s limit


async def test_other_retriable_errors_are_asked_again_without_limit() -> None:
    calls: list[int] = []

    def loading() -> None:
        calls.append(1)
        if len(calls) < 8:
            raise KafkaException(
                KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS, "loading", retriable=True)
            )

    await _transactional(loading, deadline=5)
    assert len(calls) == 8


def test_only_a_fatal_producer_error_counts_as_the_fatal_error() -> None:
    fatal = KafkaException(KafkaError(KafkaError._FATAL, "epoch bumped", fatal=True))
    abortable = KafkaException(KafkaError(KafkaError._STATE, "abort", txn_requires_abort=True))
    assert fatal_error(fatal)
    assert not fatal_error(abortable)
    assert not fatal_error(KafkaException(KafkaError(KafkaError._TIMED_OUT)))
    assert not fatal_error(RuntimeError("not Kafka's"))


async def test_an_earlier_call_still_in_progress_ends_as_a_wedged_producer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kafka, "WEDGED_AFTER_SECONDS", 0.05)
    monkeypatch.setattr(kafka, "RETRY_PAUSE_SECONDS", 0.01)
    calls = [0]

    def still_in_progress() -> None:
        calls[0] += 1
        raise KafkaException(KafkaError(KafkaError._PREV_IN_PROGRESS, retriable=True))

    with pytest.raises(ProducerWedged):
        await _transactional(still_in_progress, deadline=5.0, what="prove_offsets")
    assert 1 < calls[0] <= 5  # at least 0.01 s counted per wait: 0.05 s within 5 calls


async def test_another_retriable_answer_is_asked_again_until_it_passes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kafka, "RETRY_PAUSE_SECONDS", 0.0)
    answers = [KafkaError(KafkaError._TRANSPORT, retriable=True)] * 3

    def flaky() -> None:
        if answers:
            raise KafkaException(answers.pop())

    await _transactional(flaky, deadline=5.0)
    assert answers == []


async def test_a_call_given_up_on_is_logged_when_it_ends_not_left_unretrieved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The wedged call's thread may end long after the worker gave up on it (a broker back):
    what it raised is logged, and asyncio has no exception never retrieved to report."""
    monkeypatch.setattr(kafka, "RUNNING_STEP_SECONDS", 0.05)
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    release = threading.Event()

    def blocked_then_refused() -> None:
        release.wait(30)
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "after 60008ms"))

    try:
        with capture_logs() as logs:
            with pytest.raises(ProducerWedged):
                await _blocking(blocked_then_refused, deadline=0.2, name="send_offsets")
            release.set()
            deadline = time.monotonic() + 10
            while not logs and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        release.set()
        loop.set_exception_handler(previous)
    assert [(e["event"], e["what"], e["outcome"]) for e in logs] == [
        ("kafka.abandoned_call_ended", "send_offsets", "raised")
    ]
    assert "60008ms" in logs[0]["error"]
    assert unhandled == []
