"""Where the admin puts a template's test send: on the send-requests topic, keyed by the
contact, so the dispatcher delivers it as it delivers every message."""

from __future__ import annotations

from shared.contracts import SendRequest
from shared.kafka import AsyncProducer
from shared.topics import SEND_REQUESTS


class TestSends:
    __test__ = False  # not a pytest test class

    def __init__(self, producer: AsyncProducer) -> None:
        self._producer = producer

    async def send(self, request: SendRequest) -> None:
        """Returns once Kafka acknowledged the request (acks=all)."""
        await self._producer.send(SEND_REQUESTS.name, request.contact_key, request.to_wire())
