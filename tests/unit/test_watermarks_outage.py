"""A broker that does not answer the watermarks' ask is an outage (`KafkaException`, which the
progress checks wait out), never a `TimeoutError` that would end the consumer's loop."""

from __future__ import annotations

import socket

import pytest
from confluent_kafka import KafkaError, KafkaException

from shared.membership import Watermarks


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_a_broker_that_does_not_answer_raises_kafka_s_timeout() -> None:
    watermarks = Watermarks(
        {"bootstrap.servers": f"127.0.0.1:{_closed_port()}", "log_level": 0}, timeout=0.3
    )
    with pytest.raises(KafkaException) as raised:
        watermarks([("orders", 0), ("orders", 1)])
    assert raised.value.args[0].code() == KafkaError._TIMED_OUT
    assert watermarks([]) == {}  # nothing asked: nothing to wait for
