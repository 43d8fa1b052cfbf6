"""What a provider adapter is handed: one rendered message for one address (pure values)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from services.dispatcher.domain.outcomes import Outcome
from shared.contracts import Channel


@dataclass(frozen=True)
class EmailContent:
    subject: str
    text: str
    html: str | None = None
    # Signed links the message carries (List-Unsubscribe; None leaves the headers out).
    unsubscribe_url: str | None = None


@dataclass(frozen=True)
class SmsContent:
    body: str
    # Where the provider reports delivery (a signed ingest URL); None asks for no reports.
    status_callback: str | None = None


@dataclass(frozen=True)
class PushContent:
    title: str
    body: str
    data: Mapping[str, str] = field(default_factory=dict)
    image_url: str | None = None


@dataclass(frozen=True)
class WechatContent:
    """A template message (`template_id` + `data`) or a customer-service news/text message."""

    kind: Literal["template", "news", "text"]
    title: str = ""
    description: str = ""
    url: str | None = None
    image_url: str | None = None
    template_id: str | None = None
    data: Mapping[str, str] = field(default_factory=dict)


Content = EmailContent | SmsContent | PushContent | WechatContent


@dataclass(frozen=True)
class Delivery:
    """One message for one address; `message_id` is the ledger's deterministic id."""

    message_id: str
    contact_key: str
    channel: Channel
    address: str
    content: Content


class Provider(Protocol):
    """One channel's provider: deliver and classify the answer; never raises for the answer."""

    channel: Channel

    async def send(self, delivery: Delivery) -> Outcome: ...
