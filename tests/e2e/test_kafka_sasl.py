"""A cluster that asks for credentials: Waypost's clients and a service over the stack's
SASL_PLAINTEXT listener (mechanism PLAIN), and a wrong password refused, not waited on."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from shared.kafka import (
    AsyncProducer,
    ConsumerLoop,
    KafkaAuthenticationFailed,
    Record,
    ensure_topics,
    topic_record_count,
    wait_for_broker,
)
from shared.kafka_connection import KafkaConnection
from shared.topics import EVENTS, Topic
from tests.e2e.helpers import WRITE_KEY, read_topic, unique, wait_for

pytestmark = pytest.mark.e2e

WRONG_PASSWORD = "not-the-kafka-password-7f3"
# Process names of the extra ingest services (beyond the stack's own, on PLAINTEXT).
SASL_INGEST, REFUSED_INGEST = 7, 8


def sasl(stack: Any, password: str | None = None) -> KafkaConnection:
    """The SASL listener, with the stack's credentials or `password`."""
    env = stack.sasl_env(*([password] if password is not None else []))
    return KafkaConnection(
        bootstrap=env["WAYPOST_KAFKA_BOOTSTRAP"],
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username=env["WAYPOST_KAFKA_SASL_USERNAME"],
        sasl_password=SecretStr(env["WAYPOST_KAFKA_SASL_PASSWORD"]),
    )


async def _first_record(consumer: ConsumerLoop, seconds: float) -> Record:
    async with asyncio.timeout(seconds):
        async for batch in consumer.records(timeout=0.5):
            if batch:
                return batch[0]
    raise AssertionError("the consumer stopped before a record came")


async def test_waypost_clients_round_trip_a_record_over_sasl(stack: Any) -> None:
    kafka = sasl(stack)
    wait_for_broker(kafka, timeout=60)
    topic = Topic(unique("sasl.round-trip"), "a scratch topic of this test")
    assert ensure_topics(kafka, 1, topics=[topic]) == [topic.name]
    producer = AsyncProducer(kafka, client_id="sasl-test")
    consumer = ConsumerLoop(
        kafka, group_id=unique("sasl-test"), topics=[topic.name], client_id="sasl-test"
    )
    try:
        await producer.send(topic.name, "contact-1", b'{"hello": "sasl"}')
        record = await _first_record(consumer, 60)
    finally:
        consumer.close()
        producer.close()
    assert (record.key, record.value) == ("contact-1", b'{"hello": "sasl"}')
    assert topic_record_count(kafka, topic.name) == 1


def test_a_wrong_password_is_refused_at_once_and_kept_out_of_the_error(stack: Any) -> None:
    # The deadline bounds the wait; an authentication error ends it long before.
    with pytest.raises(KafkaAuthenticationFailed) as refused:
        wait_for_broker(sasl(stack, WRONG_PASSWORD), timeout=60)
    message = str(refused.value)
    assert f"SASL_PLAINTEXT://{stack.sasl_bootstrap} as waypost (PLAIN)" in message
    assert "refused the credentials" in message
    assert "Authentication failed" in message
    assert WRONG_PASSWORD not in message
    # Nor does the listener let a client in without SASL: what goes through it authenticated.
    with pytest.raises(TimeoutError):
        wait_for_broker(stack.sasl_bootstrap, timeout=5)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_ingest_configured_for_sasl_puts_a_posted_event_on_kafka(stack: Any) -> None:
    port = _free_port()
    name = f"ingest-{SASL_INGEST}"
    env = {**stack.sasl_env(), "WAYPOST_INGEST_PORT": str(port), "WAYPOST_INGEST_WORKERS": "1"}
    stack.start_service("ingest", worker=SASL_INGEST, env=env)
    try:
        stack.wait_http(f"http://127.0.0.1:{port}/health", timeout=120)
        user, message_id = unique("sasl-user"), unique("sasl-msg")
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/track",
            json={"userId": user, "event": "Product Viewed", "messageId": message_id},
            auth=(WRITE_KEY, ""),
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        # acks=all: the 200 came once the record was written. A reader may still wait for
        # another worker's open transaction on the topic to end before it sees the record.
        landed = wait_for(
            lambda: [
                json.loads(value)
                for key, value in read_topic(stack.bootstrap, EVENTS.name)
                if key == user and value is not None
            ],
            timeout=60,
            what="the event on the topic",
        )
        assert [event["messageId"] for event in landed] == [message_id]
    finally:
        stack.stop(name)


def test_ingest_with_a_wrong_kafka_password_exits_naming_the_refusal(stack: Any) -> None:
    name = f"ingest-{REFUSED_INGEST}"
    env = {**stack.sasl_env(WRONG_PASSWORD), "WAYPOST_INGEST_PORT": str(_free_port())}
    stack.start_service("ingest", worker=REFUSED_INGEST, env=env)
    try:
        wait_for(
            lambda: stack.children[name].poll() is not None,
            timeout=90,
            what="ingest to give up on refused credentials",
        )
        assert stack.children[name].returncode != 0
    finally:
        stack.stop(name)
    log = stack.logfile(name).read_text()
    assert "KafkaAuthenticationFailed" in log
    assert "refused the credentials" in log
    assert WRONG_PASSWORD not in log
