"""SMS through a Twilio-style REST API: one form POST per message, the answer classified.

Twilio has no idempotency key, so a POST that got no answer may have been delivered ("unknown");
the messages listed for the number (`sent_to`) tell the dispatcher which it was.
"""

from __future__ import annotations

from urllib.parse import quote

from services.dispatcher.channels.common import (
    answer_object,
    retry_after_seconds,
    transport_failure,
)
from services.dispatcher.channels.http import (
    ProviderClient,
    ProviderHttpError,
    ProviderUrlError,
    RequestMaybeSent,
    RequestNotSent,
    basic_auth,
)
from services.dispatcher.channels.sms.domain import SmsContent, classify_sms, sms_form
from services.dispatcher.channels.sms.reconcile import SmsListing, parse_sms_listing
from services.dispatcher.domain.messages import Delivery
from services.dispatcher.domain.outcomes import Outcome
from services.dispatcher.settings import DispatcherSettings
from shared.contracts import Channel


class SmsSender:
    """Sends one SMS per call with the account's Basic credentials."""

    channel: Channel = "sms"

    def __init__(self, settings: DispatcherSettings, client: ProviderClient) -> None:
        self._settings = settings
        self._client = client
        base = settings.sms_base_url.rstrip("/")
        account = quote(settings.sms_account_sid, safe="")
        self._url = f"{base}/2010-04-01/Accounts/{account}/Messages.json"
        self._headers = {
            "Accept": "application/json",
            "Authorization": basic_auth(
                settings.sms_account_sid, settings.sms_auth_token.get_secret_value()
            ),
        }

    async def send(self, delivery: Delivery) -> Outcome:
        content = delivery.content
        if not isinstance(content, SmsContent):
            raise TypeError(f"SmsSender was handed {type(content).__name__}")
        form = sms_form(
            delivery.address,
            content,
            self._settings.sms_from,
            self._settings.sms_messaging_service_sid,
        )
        try:
            response = await self._client.post(
                self._url,
                data=form,
                headers=self._headers,
                timeout=self._settings.provider_timeout_seconds,
            )
        except ProviderUrlError as exc:
            return Outcome("config", f"sms base URL: {exc}")
        except RequestNotSent as exc:
            return transport_failure("sms", str(exc), request_sent=False)
        except RequestMaybeSent as exc:
            return transport_failure("sms", str(exc), request_sent=True)
        return classify_sms(
            response.status_code,
            answer_object(response.content),
            retry_after_seconds(response.headers.get("Retry-After")),
        )

    async def sent_to(self, to: str) -> SmsListing | str:
        """The provider's newest messages to `to`, or why it could not list them."""
        try:
            response = await self._client.get(
                self._url,
                params={"To": to, "PageSize": "100"},
                headers=self._headers,
                timeout=self._settings.provider_timeout_seconds,
            )
        except ProviderHttpError as exc:
            return f"sms listing: {exc}"
        return parse_sms_listing(response.status_code, answer_object(response.content))
