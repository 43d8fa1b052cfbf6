"""What a provider adapter is handed: one rendered message for one address (pure values)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from services.dispatcher.domain.outcomes import Outcome
from shared.contracts import Channel
from shared.links import LinkClaims, LinkSigner


@dataclass(frozen=True)
class MessageContent:
    """A rendered message of one channel (each channel's package defines its own)."""


@dataclass(frozen=True)
class Delivery:
    """One message for one address; `message_id` is the ledger's deterministic id."""

    message_id: str
    contact_key: str
    channel: Channel
    address: str
    content: MessageContent


@dataclass(frozen=True)
class RenderContext:
    """What rendering a send needs besides the template and the variables: the link signer and
    this send's link claims (unsubscribe, tracking, status callbacks), and whether it is list
    mail."""

    links: LinkSigner
    claims: LinkClaims
    transactional: bool
    track_opens: bool = True
    track_clicks: bool = True


class Provider(Protocol):
    """One channel's provider: deliver and classify the answer; never raises for the answer."""

    channel: Channel

    async def send(self, delivery: Delivery) -> Outcome: ...


class Staged(Protocol):
    """A message handed to its provider all but its last step: until `start` or `finish` takes
    that step, the provider cannot have accepted it, so a worker that stops or `abandon`s it now
    has sent nothing. `start` takes what of the step can be taken at once, without a wait (SMTP
    writes its "."), so that it goes out in the turn of the event loop that decided it rather
    than the call task's first; `finish` takes the rest and returns the answer. `abandon` once
    `finish` began does nothing (a call cancelled before it started is abandoned that way; after
    `start`, what went out may have arrived)."""

    def start(self) -> None: ...

    async def finish(self) -> Outcome: ...

    def abandon(self) -> None: ...


@runtime_checkable
class StagingProvider(Provider, Protocol):
    """A provider whose call can stop short of its last step (`Staged`): SMTP holds a message
    until the "." that ends its DATA. The ledger marks the try `sending` between the two, so a
    crash leaves `unknown` only the tries whose last step may have gone out, not the ones still
    talking to the server. `stage` answers an Outcome when the provider refused the message (or
    could not be reached) before it could accept it."""

    async def stage(self, delivery: Delivery) -> Staged | Outcome: ...
