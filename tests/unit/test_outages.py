"""Outages are waited out; a record's own fault is not (the dead-letter decision)."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException
from pydantic import BaseModel, ValidationError
from pymongo.errors import (
    AutoReconnect,
    DuplicateKeyError,
    NetworkTimeout,
    OperationFailure,
    ServerSelectionTimeoutError,
)

import shared.deadletter as deadletter
from shared.deadletter import is_outage, through_outages
from shared.kafka import DeliveryFailed, ProducerBusy, TopicMismatch


class _Strict(BaseModel):
    n: int


def _validation_error() -> ValidationError:
    try:
        _Strict.model_validate({"n": "x"})
    except ValidationError as exc:
        return exc
    raise AssertionError("expected a validation error")


@pytest.mark.parametrize(
    "exc",
    [
        DeliveryFailed("Local: Message timed out"),
        ProducerBusy("Local: Queue full"),
        KafkaException(KafkaError(KafkaError._TRANSPORT)),
        TopicMismatch("waypost.events.v1 has 3 partitions, 6 expected"),
        TimeoutError("no answer"),
        ConnectionRefusedError(111, "refused"),
        AutoReconnect("connection closed"),
        NetworkTimeout("timed out"),
        ServerSelectionTimeoutError("no server"),
        OperationFailure(
            "stepped down", code=189, details={"errorLabels": ["RetryableWriteError"]}
        ),
    ],
)
def test_infrastructure_failures_are_outages(exc: BaseException) -> None:
    assert is_outage(exc)


@pytest.mark.parametrize(
    "exc",
    [
        DeliveryFailed("Broker: Message size too large", refused=True),
        _validation_error(),
        ValueError("merge_into needs another contact"),
        KeyError("step"),
        DuplicateKeyError("E11000"),
        OperationFailure("bad query", code=2),
        ZeroDivisionError(),
    ],
)
def test_a_records_own_failures_are_not(exc: BaseException) -> None:
    assert not is_outage(exc)


async def test_work_is_retried_through_an_outage_until_it_passes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(deadletter, "OUTAGE_BACKOFF_MAX_SECONDS", 0.01)
    calls = []

    async def work() -> None:
        calls.append(len(calls))
        if len(calls) < 4:
            raise DeliveryFailed("Local: Message timed out")

    await through_outages(work, what="test")
    assert calls == [0, 1, 2, 3]


async def test_other_failures_are_raised_at_once() -> None:
    calls = []

    async def work() -> None:
        calls.append(1)
        raise ValueError("poison")

    with pytest.raises(ValueError, match="poison"):
        await through_outages(work, what="test")
    assert calls == [1]
