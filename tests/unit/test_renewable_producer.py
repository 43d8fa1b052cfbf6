"""A producer that librdkafka declares failed for good is replaced, and what it held is failed
back to its senders (whose outage retries send it again); no broker is needed to see either."""

from __future__ import annotations

import time

from confluent_kafka import KafkaError, KafkaException

from shared.kafka import RenewableProducer

NO_BROKER = {"bootstrap.servers": "127.0.0.1:1", "log_level": 0, "enable.idempotence": True}
FATAL = KafkaError(KafkaError._FATAL, "sequence desynchronised", fatal=True)


def test_a_fatal_error_replaces_the_producer_and_fails_what_it_held() -> None:
    renewable = RenewableProducer(NO_BROKER, "test")
    first = renewable.usable()
    reports: list[KafkaError | None] = []
    first.produce("t", b"held", on_delivery=lambda err, _msg: reports.append(err))
    renewable._on_error(FATAL)  # what librdkafka reports from a poll

    second = renewable.usable()
    assert second is not first
    assert renewable.current is second
    assert renewable.retiring
    deadline = time.monotonic() + 10
    while renewable.retiring and time.monotonic() < deadline:
        renewable.poll_retired()
    assert not renewable.retiring
    assert len(reports) == 1
    assert reports[0] is not None
    assert reports[0].code() == KafkaError._PURGE_QUEUE
    second.purge()
    second.flush(0)


def test_an_error_librdkafka_recovers_from_keeps_the_producer() -> None:
    renewable = RenewableProducer(NO_BROKER, "test")
    first = renewable.usable()
    renewable._on_error(KafkaError(KafkaError._TRANSPORT, "broker went away"))
    assert renewable.usable() is first


def test_a_fatal_error_raised_by_a_call_is_noticed() -> None:
    renewable = RenewableProducer(NO_BROKER, "test")
    first = renewable.usable()
    renewable.noticed(KafkaException(FATAL))
    assert renewable.usable() is not first


def test_a_transactional_producer_is_never_replaced() -> None:
    """Its owner must register a new one (init_transactions) to fence the old one."""
    renewable = RenewableProducer({**NO_BROKER, "transactional.id": "test-tx"}, "test")
    first = renewable.usable()
    renewable._on_error(FATAL)
    assert renewable.usable() is first
