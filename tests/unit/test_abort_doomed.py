"""A doomed batch's abort (`StreamWorker._abort_doomed`), without servers: an abort refused
because no transaction is open any more (another step of the batch aborted it) ends the abort,
where it once asked again every 2 s forever; a broker away is still asked again."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from shared import streams
from shared.streams import StreamWorker


class Producer:
    def __init__(self, *answers: KafkaException | None) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def abort_transaction(self) -> None:
        self.calls += 1
        answer = self.answers.pop(0)
        if answer is not None:
            raise answer


async def abort(producer: Producer) -> bool:
    async def never(*_args: Any) -> None:
        raise AssertionError("the worker started over")

    worker = SimpleNamespace(producer=producer, _after_wedged=never, _after_producer_fenced=never)
    done: bool = await StreamWorker._abort_doomed(worker, {("t", 0): 5})  # type: ignore[arg-type]
    return done


@pytest.fixture(autouse=True)
def no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streams, "RESTORE_RETRY_SECONDS", 0.0)


async def test_an_abort_refused_for_want_of_an_open_transaction_is_done() -> None:
    ready = KafkaException(KafkaError(KafkaError._STATE, "Operation not valid in state Ready"))
    producer = Producer(ready)
    assert await abort(producer) is True
    assert producer.calls == 1


async def test_an_abort_refused_in_another_state_is_asked_again() -> None:
    committing = KafkaException(
        KafkaError(KafkaError._STATE, "Operation not valid in state CommittingTransaction")
    )
    producer = Producer(committing, None)
    assert await abort(producer) is True
    assert producer.calls == 2


async def test_an_abort_the_broker_could_not_take_is_asked_again() -> None:
    away = KafkaException(KafkaError(KafkaError._TRANSPORT, "Broker transport failure"))
    producer = Producer(away, away, None)
    assert await abort(producer) is True
    assert producer.calls == 3
