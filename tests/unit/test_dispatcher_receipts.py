"""The receipt reader's broker queries: asked again while the broker says the partition's
leader is passing (a topic just made, a leader moving), not on any other error."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import KafkaError, KafkaException

from services.dispatcher.adapters import receipts
from services.dispatcher.adapters.receipts import _again_while_passing


class Flaky:
    """Raises the given errors in turn, then answers 42."""

    def __init__(self, *codes: int) -> None:
        self.codes = list(codes)
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        if self.codes:
            raise KafkaException(KafkaError(self.codes.pop(0)))
        return 42


@pytest.fixture(autouse=True)
def no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(receipts, "PASSING_PAUSE_SECONDS", 0.0)


def test_a_query_is_asked_again_while_the_leader_is_passing() -> None:
    flaky = Flaky(KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE)
    assert _again_while_passing(flaky, time.monotonic() + 30) == 42
    assert flaky.calls == 3


def test_any_other_error_is_raised_at_once() -> None:
    flaky = Flaky(KafkaError._TRANSPORT)
    with pytest.raises(KafkaException):
        _again_while_passing(flaky, time.monotonic() + 30)
    assert flaky.calls == 1


def test_a_passing_error_past_the_deadline_is_raised() -> None:
    flaky = Flaky(KafkaError.UNKNOWN_TOPIC_OR_PART)
    with pytest.raises(KafkaException):
        _again_while_passing(flaky, time.monotonic() - 1)
    assert flaky.calls == 1
