"""WeChat Official Account messages: template messages (de-duplicated by `client_msg_id`) and
customer-service news or text, sent with the one access token the worker's senders share.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from services.dispatcher.channels.common import (
    AccessTokenError,
    MonotonicClock,
    answer_object,
    classify_http_failure,
    refresh_at,
    retry_after_seconds,
    transport_failure,
)
from services.dispatcher.channels.http import (
    ProviderClient,
    ProviderHttpError,
    ProviderUrlError,
    RequestMaybeSent,
    RequestNotSent,
)
from services.dispatcher.channels.wechat.domain import (
    WECHAT_TOKEN_ERRCODES,
    WechatContent,
    classify_wechat,
    classify_wechat_token_failure,
    wechat_refresh_margin,
    wechat_request_body,
    wechat_send_path,
)
from services.dispatcher.domain.messages import Delivery
from services.dispatcher.domain.outcomes import Outcome
from services.dispatcher.settings import DispatcherSettings
from shared.contracts import Channel


def _encode(body: dict[str, Any]) -> bytes:
    # WeChat shows \uXXXX escapes literally in some messages, so Chinese text goes as UTF-8.
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _errcode(answer: dict[str, Any]) -> int:
    """The answer's errcode; a send answered without one succeeded."""
    errcode = answer.get("errcode", 0)
    return errcode if isinstance(errcode, int) and not isinstance(errcode, bool) else -1


class WechatAccessToken:
    """The worker's WeChat access token, from the stable-token endpoint (which does not cut off
    other holders of the current token): cached, replaced early, fetched by one caller at a
    time while the others wait for it."""

    def __init__(
        self, settings: DispatcherSettings, client: ProviderClient, clock: MonotonicClock
    ) -> None:
        self._settings = settings
        self._client = client
        self._clock = clock
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0
        self._rejected: str | None = None

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
            token, expires_in, started = await self._request(force_refresh=False)
            if token == self._rejected:
                # The endpoint still hands out the token WeChat just refused: ask for a new one.
                token, expires_in, started = await self._request(force_refresh=True)
            self._token, self._rejected = token, None
            self._refresh_at = refresh_at(started, expires_in, wechat_refresh_margin(expires_in))
            return token

    def invalidate(self, token: str) -> None:
        """WeChat refused `token` (40001/40014/42001); the next `get` fetches again."""
        if self._token == token:
            self._token = None
            self._rejected = token

    def _valid(self) -> str | None:
        if self._token is not None and self._clock.monotonic() < self._refresh_at:
            return self._token
        return None

    async def _request(self, *, force_refresh: bool) -> tuple[str, float, float]:
        settings = self._settings
        body = {
            "grant_type": "client_credential",
            "appid": settings.wechat_app_id,
            "secret": settings.wechat_app_secret.get_secret_value(),
            "force_refresh": force_refresh,
        }
        started = self._clock.monotonic()
        try:
            response = await self._client.post(
                f"{settings.wechat_base_url.rstrip('/')}/cgi-bin/stable_token",
                data=_encode(body),
                headers={"Content-Type": "application/json"},
                timeout=settings.provider_timeout_seconds,
            )
        except ProviderUrlError as exc:
            raise AccessTokenError(Outcome("config", f"wechat base URL: {exc}")) from exc
        except ProviderHttpError as exc:
            # No message was sent yet, so any failure here is safe to retry.
            raise AccessTokenError(Outcome("retry", f"wechat token: {exc}")) from exc
        retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        if response.status_code != 200:
            raise AccessTokenError(
                classify_http_failure("wechat token", response.status_code, retry_after)
            )
        answer = answer_object(response.content) or {}
        token, expires_in = answer.get("access_token"), answer.get("expires_in", 7200)
        if isinstance(token, str) and token and isinstance(expires_in, int | float):
            return token, float(expires_in), started
        raise AccessTokenError(
            classify_wechat_token_failure(
                _errcode(answer) or -1,
                str(answer.get("errmsg") or "answer without an access token"),
                self._clock.now(),
            )
        )


class WechatSender:
    """Sends one WeChat message per call; a refused access token is replaced and the message
    sent once more."""

    channel: Channel = "wechat"

    def __init__(
        self,
        settings: DispatcherSettings,
        client: ProviderClient,
        clock: MonotonicClock,
        token: WechatAccessToken | None = None,
    ) -> None:
        self._settings = settings
        self._client = client
        self._clock = clock
        self.token = token if token is not None else WechatAccessToken(settings, client, clock)

    async def send(self, delivery: Delivery) -> Outcome:
        content = delivery.content
        if not isinstance(content, WechatContent):
            raise TypeError(f"WechatSender was handed {type(content).__name__}")
        body = _encode(wechat_request_body(delivery.address, content, delivery.message_id))
        try:
            token = await self.token.get()
            answer = await self._post(content, token, body)
            if isinstance(answer, dict) and _errcode(answer) in WECHAT_TOKEN_ERRCODES:
                # Once with a fresh token; if WeChat refuses that too, retry later.
                self.token.invalidate(token)
                answer = await self._post(content, await self.token.get(), body)
        except AccessTokenError as exc:
            return exc.outcome
        if isinstance(answer, Outcome):
            return answer
        return classify_wechat(
            _errcode(answer),
            str(answer.get("errmsg") or ""),
            answer.get("msgid"),
            delivery.message_id,
            self._clock.now(),
        )

    async def _post(
        self, content: WechatContent, token: str, body: bytes
    ) -> dict[str, Any] | Outcome:
        # A template message carries client_msg_id, so WeChat drops a resent duplicate.
        resend_safe = content.kind == "template"
        base = self._settings.wechat_base_url.rstrip("/")
        try:
            response = await self._client.post(
                f"{base}{wechat_send_path(content)}",
                params={"access_token": token},
                data=body,
                headers={"Content-Type": "application/json"},
                timeout=self._settings.provider_timeout_seconds,
            )
        except ProviderUrlError as exc:
            return Outcome("config", f"wechat base URL: {exc}")
        except RequestNotSent as exc:
            return transport_failure("wechat", str(exc), request_sent=False)
        except RequestMaybeSent as exc:
            return transport_failure("wechat", str(exc), request_sent=True, resend_safe=resend_safe)
        if response.status_code != 200:
            retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            return classify_http_failure("wechat", response.status_code, retry_after)
        answer = answer_object(response.content)
        if answer is None:
            # A 200 we cannot read: the message may have gone out.
            return transport_failure(
                "wechat", "unreadable answer", request_sent=True, resend_safe=resend_safe
            )
        return answer
