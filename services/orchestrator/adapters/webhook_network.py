"""The network under webhook calls: resolve, judge every address, connect to a judged one.

The check lives at the socket, not before the request: `GuardedBackend` is an httpcore network
backend whose `connect_tcp` resolves the host itself (every A and AAAA record), refuses the
host if any address is refused by the `DestinationPolicy`, and then opens the TCP connection to
one of those very addresses, so a second DNS answer (rebinding) never reaches a socket. httpcore
still starts TLS with the URL's host name as SNI and certificate name, and httpx still sends the
URL's Host header: only the address lookup moves here. Redirects are not followed, proxies from
the environment are ignored (a proxy would resolve for us), and connections kept alive in the
pool were opened to judged addresses.

httpx 0.28 has no public way to hand its transport a network backend, so `GuardedTransport`
replaces the connection pool an `httpx.AsyncHTTPTransport` builds with one of its own: the same
httpcore pool, with the guarded backend. The refusal tests fail if httpx stops using it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable
from ipaddress import ip_address

import httpcore
import httpx

from services.orchestrator.domain.destinations import DestinationPolicy, IPAddress

# What a refusal tells the operator to change when the destination is meant to be reachable.
ALLOW_HINT = "allow it with WAYPOST_WEBHOOK_ALLOWED_NETWORKS or WAYPOST_WEBHOOK_ALLOWED_HOSTS"


class DestinationRefused(Exception):
    """The webhook's destination is not one it may reach: the definition's fault, so another
    attempt cannot help. Not an httpx error, so it reaches the caller as itself."""


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Connects only to addresses the policy allows, and only to the addresses it checked."""

    def __init__(
        self, policy: DestinationPolicy, inner: httpcore.AsyncNetworkBackend | None = None
    ) -> None:
        self.policy = policy
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self._resolve(host, port, timeout)
        reason = self.policy.refusal_of(host, addresses)
        if reason is not None:
            raise DestinationRefused(f"{reason}; {ALLOW_HINT}")
        failure: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(
                    str(address), port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None  # _resolve returns at least one address
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise DestinationRefused("a webhook never connects to a Unix socket")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)

    async def _resolve(self, host: str, port: int, timeout: float | None) -> list[IPAddress]:
        try:
            async with asyncio.timeout(timeout):
                found = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM
                )
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host} took too long") from exc
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        # Each address once, in the resolver's order of preference.
        addresses = list(dict.fromkeys(ip_address(sockaddr[0]) for *_, sockaddr in found))
        if not addresses:
            raise httpcore.ConnectError(f"{host} has no address")
        return addresses


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's own HTTP/1.1 transport over the guarded backend, without proxies."""

    def __init__(self, policy: DestinationPolicy) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            network_backend=GuardedBackend(policy),
        )


def webhook_client(policy: DestinationPolicy) -> httpx.AsyncClient:
    """The client webhook calls go through: guarded, no redirects, no environment proxies."""
    return httpx.AsyncClient(
        transport=GuardedTransport(policy),
        follow_redirects=False,
        trust_env=False,
        # An uncompressed answer: the body cap then counts what crossed the network.
        headers={"Accept-Encoding": "identity"},
    )
