"""The HTTP client of the providers that answer over HTTP (SMS, push, WeChat), on aiohttp.

Measured against the local sandbox's SMS endpoint, 64 requests in flight and 50 ms of provider
latency (`bench/spikes/http_clients.py`, docs/delivery.md): httpx spent 2.3 ms of CPU per request
with its default pool and 7.8-9.6 ms with every connection kept alive as the dispatcher kept
them, and reached 104-402 sends/s; aiohttp spent 0.39-0.43 ms and reached 998-1,068 sends/s.

What the adapters need of a call is small: the status, the headers, the body, and, when no
answer came, whether the request may have reached the provider. That decides between a safe
retry and an `unknown` outcome, so it is the one thing this module classifies:
`ProviderUrlError` (the URL cannot be requested: configuration), `RequestNotSent` (no connection
was made: a retry is safe) and `RequestMaybeSent` (the request may have arrived).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus

import aiohttp
from aiohttp.abc import AbstractStreamWriter
from aiohttp.connector import Connection

FORM = "application/x-www-form-urlencoded"


class ProviderHttpError(Exception):
    """A provider call that got no answer."""


class ProviderUrlError(ProviderHttpError):
    """The URL cannot be requested (not http or https, or malformed): a configuration error."""


class RequestNotSent(ProviderHttpError):
    """No connection was made (refused, unresolvable, a connect timeout): nothing was sent."""


class RequestMaybeSent(ProviderHttpError):
    """The connection broke or the answer did not come in time after the request went out."""


@dataclass(frozen=True)
class Answer:
    status_code: int
    headers: Mapping[str, str]  # case-insensitive
    content: bytes


# What must hold for a request to go out, checked once the request has its connection and
# again as its bytes are written (it raises to stop it). Set by the caller around the task that
# makes the request (`contextvars`: the task keeps the value it was made with, as do the tasks it
# starts); None: nothing to check.
BEFORE_SENDING: ContextVar[Callable[[], None] | None] = ContextVar("before_sending", default=None)


class _Refused(Exception):
    """Raised in aiohttp's body writer when `BEFORE_SENDING` refused (an `Exception`, which
    aiohttp hands to the waiting request as a broken connection; what the check raised, a
    `BaseException` perhaps, would escape its writer task unretrieved)."""


class _CheckedBody(aiohttp.BytesPayload):
    """A request body that asks `BEFORE_SENDING` again right before it and the request's
    headers (held back to go out with it) are written. On Python before 3.12 aiohttp writes
    them from a task of their own, at least one turn of the event loop after the connection was
    handed over, and a worker stopped in between would write them once resumed. What the check
    raised is kept (`refused`) and raised to the caller; aiohttp sees `_Refused`."""

    refused: BaseException | None = None

    def _check(self) -> None:
        check = BEFORE_SENDING.get()
        if check is None:
            return
        try:
            check()
        except BaseException as exc:
            self.refused = exc
            raise _Refused(str(exc)) from exc

    async def write(self, writer: AbstractStreamWriter) -> None:
        self._check()
        await super().write(writer)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        self._check()
        await super().write_with_length(writer, content_length)


class _CheckingConnector(aiohttp.TCPConnector):
    """The pool of connections, which hands a request its connection, kept alive or new, only
    once `BEFORE_SENDING` holds; the body asks again as its bytes are written (`_CheckedBody`),
    a loop turn or more later on Python before 3.12. (Request tracing hooks would do the first
    too, at about 20 µs a request for the tracing of every other step.)"""

    async def connect(
        self, req: aiohttp.ClientRequest, traces: list[Any], timeout: aiohttp.ClientTimeout
    ) -> Connection:
        connection = await super().connect(req, traces, timeout)
        check = BEFORE_SENDING.get()
        if check is not None:
            try:
                check()
            except BaseException:
                connection.release()  # unused: back to the pool, nothing written on it
                raise
        return connection


class ProviderClient:
    """One pool of kept-alive connections shared by a worker's HTTP providers. The session is
    made on the first call, inside the worker's event loop."""

    def __init__(
        self,
        *,
        max_connections: int,
        timeout: float,
        keepalive_seconds: float = 15.0,
        trace_configs: Sequence[aiohttp.TraceConfig] = (),
    ) -> None:
        self._max_connections = max_connections
        self._timeout = timeout
        self._keepalive_seconds = keepalive_seconds
        self._trace_configs = list(trace_configs)
        self._session: aiohttp.ClientSession | None = None
        self._deadlines: dict[float, aiohttp.ClientTimeout] = {}

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = _CheckingConnector(
                limit=self._max_connections,
                limit_per_host=0,
                keepalive_timeout=self._keepalive_seconds,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                trace_configs=self._trace_configs,
                # Providers' answers are read whole and classified here, never raised on.
                raise_for_status=False,
            )
        return self._session

    async def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        data: Mapping[str, str] | bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Answer:
        """The provider's answer; one of the `ProviderHttpError`s when none came. `data`: a form
        (urlencoded) or a body of bytes (say what it is in `headers`)."""
        seconds = self._timeout if timeout is None else timeout
        deadline = self._deadlines.get(seconds)
        if deadline is None:
            deadline = self._deadlines[seconds] = aiohttp.ClientTimeout(
                total=seconds, connect=seconds
            )
        if data is not None and not isinstance(data, bytes):
            # Encoded here rather than by aiohttp's FormData, which costs several times more
            # per request (the SMS hot path): the same bytes and content type.
            data = form_encoded(data)
            headers = {**(headers or {}), "Content-Type": FORM}
        body = None if data is None else _CheckedBody(data)
        # No redirect is followed: aiohttp would write the body again to the next hop, a second
        # request, and a provider's API answers where it was asked.
        options: dict[str, Any] = {
            "params": params,
            "data": body,
            "headers": headers,
            "allow_redirects": False,
        }
        try:
            async with self._open().request(method, url, timeout=deadline, **options) as answer:
                content = await answer.read()
                return Answer(answer.status, answer.headers, content)
        except aiohttp.InvalidURL as exc:
            raise ProviderUrlError(f"{type(exc).__name__}: {exc}") from exc
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
            raise RequestNotSent(_described(exc)) from exc
        except TimeoutError as exc:
            raise RequestMaybeSent(f"timed out after {seconds:g} s") from exc
        except aiohttp.ClientError as exc:
            if body is not None and body.refused is not None:
                # Stopped by the check as its bytes were to go out: none of them was written.
                raise body.refused from exc
            raise RequestMaybeSent(_described(exc)) from exc

    async def post(self, url: str, **options: Any) -> Answer:
        return await self.request("POST", url, **options)

    async def get(self, url: str, **options: Any) -> Answer:
        return await self.request("GET", url, **options)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


# What `urllib.parse.quote_plus` escapes in ASCII text: all but letters, digits and "_.-~".
_ESCAPED = re.compile(r"[^A-Za-z0-9_.~-]")


def form_encoded(form: Mapping[str, str]) -> bytes:
    """`urlencode(form)`'s bytes. Its `quote_plus` escapes byte by byte in Python (31 µs for
    an SMS's form); here a pattern finds the few characters of ASCII text to escape (17 µs),
    and other text goes through `quote_plus` itself."""
    return "&".join([_quoted(k) + "=" + _quoted(v) for k, v in form.items()]).encode()


def _quoted(text: str) -> str:
    if not text.isascii():
        return quote_plus(text)
    return _ESCAPED.sub(_escape, text)


def _escape(found: re.Match[str]) -> str:
    char = found.group()
    return "+" if char == " " else f"%{ord(char):02X}"


def basic_auth(user: str, password: str) -> str:
    """An `Authorization` header value for HTTP Basic credentials."""
    return aiohttp.encode_basic_auth(user, password)


def _described(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
