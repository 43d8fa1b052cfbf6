"""SMS status callbacks (Twilio style): a provider's signed report that a text was delivered
or not, turned into the event the segmenter and the dispatcher read.

Two for every text sent, so at sending speed they are ingest's second-largest traffic after the
tracking calls. `TrackingCalls` serves the usual form-encoded ones straight from ASGI, and the
FastAPI route serves the rest (a multipart body, say) and documents them; both hand the form to
`SmsStatusCallbacks.handle`, so they check and publish alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from services.ingest.domain.tracking import UnknownSmsStatus, sms_status_changed
from services.ingest.intake import Rejected
from shared.clock import Clock
from shared.contracts import Event
from shared.links import InvalidLink, LinkSigner, twilio_signature_valid

PREFIX = "/v1/sms/status/"
SIGNATURE_HEADER = "X-Twilio-Signature"


class SmsStatusCallbacks:
    def __init__(
        self,
        signer: LinkSigner,
        auth_token: str,
        clock: Clock,
        publish: Callable[[list[Event]], Awaitable[None]],
    ) -> None:
        self._signer = signer
        self._auth_token = auth_token
        self._clock = clock
        self._publish = publish

    async def handle(
        self, token: str, path: str, query: str, params: Mapping[str, str], signature: str
    ) -> None:
        """One callback to `path` (`?query`), its form `params` and `signature`; raises
        `Rejected` for what it refuses. The provider signed the URL it was given, which the
        dispatcher built on the public URL."""
        if not self._auth_token:  # SMS is off: nothing can vouch for a callback
            raise Rejected(
                403,
                "SMS status callbacks are off (WAYPOST_SMS_AUTH_TOKEN is not set)",
                field=SIGNATURE_HEADER,
            )
        seen_url = self._signer.public_url + path + (f"?{query}" if query else "")
        if not twilio_signature_valid(seen_url, params, self._auth_token, signature):
            raise Rejected(
                403, f"{SIGNATURE_HEADER} is missing or does not match", field=SIGNATURE_HEADER
            )
        now = self._clock.now()
        try:
            claims = self._signer.read(token, "sms_status", now)
        except InvalidLink as exc:
            raise Rejected(400, f"token: {exc}", field="token") from exc
        status = params.get("MessageStatus")
        if not status:
            raise Rejected(400, "MessageStatus is required", field="MessageStatus")
        try:
            event = sms_status_changed(
                claims,
                now,
                status=status,
                provider_id=params.get("MessageSid"),
                error_code=params.get("ErrorCode"),
            )
        except UnknownSmsStatus as exc:
            raise Rejected(400, f"MessageStatus: {exc}", field="MessageStatus") from exc
        if event is not None:
            await self._publish([event])
