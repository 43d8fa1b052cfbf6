"""The email provider's events API (Mailgun's `GET /v3/{domain}/events`), asked what became of
a message by its Message-ID (`reconcile.reconcile_email` decides from the answer)."""

from __future__ import annotations

import asyncio

from services.dispatcher.channels.common import answer_object
from services.dispatcher.channels.email.reconcile import EmailEvents, bare, parse_email_events
from services.dispatcher.channels.http import ProviderClient, ProviderHttpError, basic_auth
from services.dispatcher.settings import DispatcherSettings

# Events of one message: an accepted event per recipient (one here), and the few that follow.
_LIMIT = "50"
# Queries under way at once: a worker taking over a stopped one's batch asks about every try
# the other left without an answer, and a burst of them would wait for a pooled connection
# past their timeout. The worker's HTTP pool holds this many connections more.
QUERIES_IN_FLIGHT = 16


class EmailEventsApi:
    """Asks `email_events_url` + `/events` with HTTP Basic `api` and the key."""

    def __init__(self, settings: DispatcherSettings, client: ProviderClient) -> None:
        assert settings.email_events_url is not None
        self._settings = settings
        self._client = client
        self._url = settings.email_events_url.rstrip("/") + "/events"
        key = settings.email_events_api_key
        self._headers = {
            "Accept": "application/json",
            "Authorization": basic_auth("api", key.get_secret_value() if key else ""),
        }
        self._queries = asyncio.Semaphore(QUERIES_IN_FLIGHT)

    async def events_of(self, message_id: str) -> EmailEvents | str:
        """The `accepted` events of the message with Message-ID `message_id`, or why they
        could not be had."""
        seconds = self._settings.provider_timeout_seconds
        try:
            # The wait for a query slot counts too: a burst of them waits in a batch.
            async with asyncio.timeout(seconds), self._queries:
                response = await self._client.get(
                    self._url,
                    params={"message-id": bare(message_id), "event": "accepted", "limit": _LIMIT},
                    headers=self._headers,
                    timeout=seconds,
                )
        except ProviderHttpError as exc:
            return f"email events: {exc}"
        except TimeoutError:
            return f"email events: no answer within {seconds:g} s"
        return parse_email_events(response.status_code, answer_object(response.content))


def email_events(settings: DispatcherSettings, client: ProviderClient) -> EmailEventsApi | None:
    """The events API when one is configured."""
    return EmailEventsApi(settings, client) if settings.email_events_url else None
