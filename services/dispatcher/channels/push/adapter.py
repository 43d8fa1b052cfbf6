"""Push through FCM HTTP v1: a service-account JWT exchanged for an OAuth access token that the
worker's senders share, one messages:send call per device token, the answer classified.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import jwt

from services.dispatcher.channels.common import (
    AccessTokenError,
    MonotonicClock,
    answer_object,
    describe_error,
    refresh_at,
    retry_after_seconds,
    transport_failure,
)
from services.dispatcher.channels.http import (
    Answer,
    ProviderClient,
    ProviderHttpError,
    ProviderUrlError,
    RequestMaybeSent,
    RequestNotSent,
)
from services.dispatcher.channels.push.domain import (
    FCM_MAX_MESSAGE_BYTES,
    FCM_REFRESH_MARGIN,
    PushContent,
    classify_fcm,
    classify_oauth_failure,
    fcm_jwt_claims,
    fcm_needs_new_token,
    fcm_request_body,
)
from services.dispatcher.domain.messages import Delivery
from services.dispatcher.domain.outcomes import Outcome
from services.dispatcher.settings import DispatcherSettings
from shared.contracts import Channel

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"


@dataclass(frozen=True)
class ServiceAccount:
    client_email: str
    private_key: str
    project_id: str
    token_uri: str
    private_key_id: str | None = None

    @classmethod
    def load(cls, path: Path) -> ServiceAccount:
        """Read the service-account JSON; any defect is a configuration error."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise AccessTokenError(
                Outcome("config", f"fcm service account {path}: {describe_error(exc)}")
            ) from exc
        if not isinstance(raw, dict):
            raise AccessTokenError(
                Outcome("config", f"fcm service account {path}: not a JSON object")
            )
        fields = ("client_email", "private_key", "project_id", "token_uri")
        missing = [name for name in fields if not isinstance(raw.get(name), str) or not raw[name]]
        if missing:
            raise AccessTokenError(
                Outcome("config", f"fcm service account {path}: missing {', '.join(missing)}")
            )
        key_id = raw.get("private_key_id")
        return cls(
            client_email=raw["client_email"],
            private_key=raw["private_key"],
            project_id=raw["project_id"],
            token_uri=raw["token_uri"],
            private_key_id=key_id if isinstance(key_id, str) and key_id else None,
        )


class FcmAccessToken:
    """The worker's FCM access token: cached, replaced 5 minutes before it expires or when FCM
    rejects it, fetched by one caller at a time while the others wait for it."""

    def __init__(
        self, settings: DispatcherSettings, client: ProviderClient, clock: MonotonicClock
    ) -> None:
        self._settings = settings
        self._client = client
        self._clock = clock
        self._lock = asyncio.Lock()
        self._account: ServiceAccount | None = None
        self._token: str | None = None
        self._refresh_at = 0.0

    def account(self) -> ServiceAccount:
        """The service account, read once; a broken file is read again on the next call."""
        if self._account is None:
            path = self._settings.fcm_service_account_file
            if path is None:
                raise AccessTokenError(Outcome("config", "fcm not configured"))
            self._account = ServiceAccount.load(path)
        return self._account

    async def get(self) -> str:
        """A valid access token; raises AccessTokenError when none can be had."""
        token = self._valid()
        if token is not None:
            return token
        async with self._lock:
            # Whoever held the lock before may have fetched one already.
            token = self._valid()
            if token is not None:
                return token
            return await self._fetch()

    def invalidate(self, token: str) -> None:
        """FCM rejected `token`; the next `get` fetches a new one (unless one already came)."""
        if self._token == token:
            self._token = None

    def _valid(self) -> str | None:
        if self._token is not None and self._clock.monotonic() < self._refresh_at:
            return self._token
        return None

    async def _fetch(self) -> str:
        account = self.account()
        issued_at = int(self._clock.now().timestamp())
        claims = fcm_jwt_claims(account.client_email, account.token_uri, issued_at)
        headers = {"kid": account.private_key_id} if account.private_key_id else None
        try:
            assertion = jwt.encode(claims, account.private_key, algorithm="RS256", headers=headers)
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise AccessTokenError(
                Outcome("config", f"fcm service account key: {describe_error(exc)}")
            ) from exc
        started = self._clock.monotonic()
        try:
            response = await self._client.post(
                account.token_uri,
                data={"grant_type": JWT_BEARER_GRANT, "assertion": assertion},
                timeout=self._settings.provider_timeout_seconds,
            )
        except ProviderUrlError as exc:
            raise AccessTokenError(Outcome("config", f"fcm token_uri: {exc}")) from exc
        except ProviderHttpError as exc:
            # No message was sent yet, so any failure here is safe to retry.
            raise AccessTokenError(Outcome("retry", f"fcm token: {exc}")) from exc
        body = answer_object(response.content)
        if response.status_code != 200:
            raise AccessTokenError(
                classify_oauth_failure(
                    response.status_code,
                    body,
                    retry_after_seconds(response.headers.get("Retry-After")),
                )
            )
        token = body.get("access_token") if body else None
        expires_in = body.get("expires_in", 3600) if body else 3600
        if not isinstance(token, str) or not token or not isinstance(expires_in, int | float):
            raise AccessTokenError(Outcome("retry", "fcm token: answer without an access token"))
        self._token = token
        self._refresh_at = refresh_at(started, float(expires_in), FCM_REFRESH_MARGIN)
        return token


class PushSender:
    """Sends one FCM message per call; a rejected access token is replaced and the message sent
    once more."""

    channel: Channel = "push"

    def __init__(
        self,
        settings: DispatcherSettings,
        client: ProviderClient,
        clock: MonotonicClock,
        token: FcmAccessToken | None = None,
    ) -> None:
        self._settings = settings
        self._client = client
        self.token = token if token is not None else FcmAccessToken(settings, client, clock)

    async def send(self, delivery: Delivery) -> Outcome:
        content = delivery.content
        if not isinstance(content, PushContent):
            raise TypeError(f"PushSender was handed {type(content).__name__}")
        if self._settings.fcm_service_account_file is None:
            return Outcome("config", "fcm not configured")
        body = fcm_request_body(delivery.address, content, delivery.message_id)
        if len(body) > FCM_MAX_MESSAGE_BYTES:
            return Outcome(
                "recipient",
                f"payload_too_large: {len(body)} bytes, over FCM's {FCM_MAX_MESSAGE_BYTES}",
            )
        try:
            token = await self.token.get()
            answer = await self._post(token, body)
            if isinstance(answer, Answer) and fcm_needs_new_token(
                answer.status_code, answer_object(answer.content)
            ):
                # The token was revoked or expired early: one new token, one more attempt; a
                # second refusal is classified as configuration.
                self.token.invalidate(token)
                answer = await self._post(await self.token.get(), body)
        except AccessTokenError as exc:
            return exc.outcome
        if isinstance(answer, Outcome):
            return answer
        return classify_fcm(
            answer.status_code,
            answer_object(answer.content),
            retry_after_seconds(answer.headers.get("Retry-After")),
        )

    async def _post(self, token: str, body: bytes) -> Answer | Outcome:
        base = self._settings.fcm_base_url.rstrip("/")
        project = quote(self.token.account().project_id, safe="")
        try:
            return await self._client.post(
                f"{base}/v1/projects/{project}/messages:send",
                data=body,
                headers={
                    "Authorization": f"Bearer {token}",
                    "Content-Type": "application/json; charset=UTF-8",
                },
                timeout=self._settings.provider_timeout_seconds,
            )
        except ProviderUrlError as exc:
            return Outcome("config", f"fcm base URL: {exc}")
        except RequestNotSent as exc:
            return transport_failure("fcm", str(exc), request_sent=False)
        except RequestMaybeSent as exc:
            return transport_failure("fcm", str(exc), request_sent=True)
