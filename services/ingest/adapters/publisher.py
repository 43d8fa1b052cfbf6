"""Publishes accepted events to Kafka, keyed by contact key, and waits once per request for the
broker to acknowledge all of them (idempotent producer, acks=all).

Delivery reports are served on the event loop's own thread (`shared.kafka.LoopPoller`):
`poll(0)` every millisecond while records are in flight, and not at all when none are.
confluent-kafka calls back into Python once per record, taking the GIL each time; from a
separate poll thread every one of those calls waits for the busy loop to let go of the GIL, up
to the interpreter's switch interval (5 ms), and those waits, not the work, set ingest's
latency (docs/ingest-performance.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Message

from services.ingest.domain.calls import EncodedEvent
from shared.kafka import DeliveryFailed, LoopPoller, ProducerBusy, RenewableProducer
from shared.kafka_connection import KafkaConnection, client_config
from shared.topics import EVENTS


def producer_config(
    kafka: KafkaConnection | str,
    client_id: str,
    linger_ms: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The producer settings of ingest (the benchmark's raw producer uses them too)."""
    config: dict[str, Any] = {
        **client_config(kafka),
        "client.id": client_id,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": linger_ms,
        # Produce requests go out at once, not after the previous one's TCP acknowledgement.
        "socket.nagle.disable": True,
        "queue.buffering.max.messages": 100_000,
        "message.timeout.ms": 30_000,
    }
    config.update(extra or {})
    return config


class EventPublisher(Protocol):
    async def publish(self, events: Sequence[EncodedEvent]) -> None:
        """Return only after the broker acknowledged every event."""


class Acknowledgements:
    """One request's wait: a single future, completed when the broker acknowledged every record
    of the request, or failed by the first record it did not."""

    __slots__ = ("future", "generation", "pending", "renewable")

    def __init__(
        self, future: asyncio.Future[None], pending: int, renewable: RenewableProducer
    ) -> None:
        self.future = future
        self.pending = pending
        # The producer's generation the request's records go to (taken after `usable`).
        self.generation = renewable.generation
        # Told of every report, so that a producer that only ever times out is replaced
        # (`RenewableProducer.reported`).
        self.renewable = renewable

    def delivered(self, err: KafkaError | None, msg: Message) -> None:
        """The producer's delivery callback, called from `poll` on the loop's thread."""
        self.renewable.reported(err, msg, self.generation)
        if self.future.done():  # failed already, or the client went away
            return
        if err is not None:
            self.future.set_exception(DeliveryFailed(str(err)))
            return
        self.pending -= 1
        if self.pending == 0:
            self.future.set_result(None)


class KafkaEventPublisher:
    """An idempotent, acks=all producer of `waypost.events.v1` served from the event loop."""

    def __init__(
        self,
        kafka: KafkaConnection | str,
        *,
        client_id: str = "ingest",
        linger_ms: float = 2.0,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        config = producer_config(kafka, client_id, linger_ms, extra)
        # Replaced by a new producer after a fatal error (shared.kafka.RenewableProducer).
        self._renewable = RenewableProducer(config, client_id)
        self._queue_limit = int(config["queue.buffering.max.messages"])
        self._poller = LoopPoller(self._renewable)

    async def publish(self, events: Sequence[EncodedEvent]) -> None:
        if not events:
            return
        producer = self._renewable.usable()
        if len(producer) + len(events) > self._queue_limit:
            # Refuse the request whole rather than queue part of it and fail on the rest.
            raise ProducerBusy(f"{len(producer)} records already queued")
        loop = asyncio.get_running_loop()
        acks = Acknowledgements(loop.create_future(), len(events), self._renewable)
        produce = producer.produce
        topic = EVENTS.name
        try:
            for event in events:
                produce(topic, event.value, event.key, on_delivery=acks.delivered)
        except BufferError as exc:
            # The records queued before this one are still written: the client repeats the
            # call, and consumers de-duplicate on messageId.
            acks.future.cancel()
            raise ProducerBusy(str(exc)) from exc
        except KafkaException as exc:
            acks.future.cancel()
            self._renewable.noticed(exc)
            raise DeliveryFailed(str(exc)) from exc
        finally:
            self._poller.soon(loop)
        await acks.future

    def close(self, timeout: float = 10.0) -> int:
        """Wait (blocking) for what is still in flight; returns the records left undelivered."""
        self._poller.stop()
        return int(self._renewable.current.flush(timeout))
