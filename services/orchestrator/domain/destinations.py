"""Where a webhook step may connect: public internet addresses, plus what the operator allows.

Pure judgement over addresses the adapter has already resolved; the adapter then connects to
exactly the address judged (`adapters/webhook_network.py`), so DNS cannot change the answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

# Shared address space (RFC 6598): carrier-grade NAT, and the node network of some clouds.
_CGNAT = IPv4Network("100.64.0.0/10")
_RFC1918 = (IPv4Network("10.0.0.0/8"), IPv4Network("172.16.0.0/12"), IPv4Network("192.168.0.0/16"))
# Unique local (RFC 4193) and the deprecated site-local block: IPv6's private networks.
_IPV6_PRIVATE = (IPv6Network("fc00::/7"), IPv6Network("fec0::/10"))
# NAT64's well-known prefix (RFC 6052) carries an IPv4 address in its last 32 bits.
_NAT64 = IPv6Network("64:ff9b::/96")


def embedded_ipv4(address: IPAddress) -> IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (IPv4-mapped, 6to4, NAT64), if any."""
    if isinstance(address, IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_class(address: IPAddress) -> str | None:
    """Why a webhook may not reach `address` by default ("loopback", "private", …), or None
    for a public internet address."""
    inner = embedded_ipv4(address)
    if inner is not None:
        reason = address_class(inner)
        return None if reason is None else f"{reason}, IPv4 inside IPv6"
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address in _CGNAT:
        return "shared address space"
    if any(address in network for network in (*_RFC1918, *_IPV6_PRIVATE)):
        return "private"
    if address.is_reserved:
        return "reserved"
    if not address.is_global:
        # Documentation, benchmarking, "this network" and the other special-purpose blocks.
        return "special-purpose"
    return None


@dataclass(frozen=True)
class DestinationPolicy:
    """Which refused addresses an operator opens: networks (CIDRs) and host names.

    A host name in `allowed_hosts` may resolve to anything (an internal service); a name
    starting with a dot allows every name under it (`.svc.cluster.local`).
    """

    allowed_networks: tuple[IPNetwork, ...] = ()
    allowed_hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, networks: Iterable[str], hosts: Iterable[str]) -> DestinationPolicy:
        """From CIDRs or single addresses and host names; raises ValueError on a bad CIDR."""
        return cls(
            allowed_networks=tuple(ip_network(n.strip()) for n in networks if n.strip()),
            allowed_hosts=frozenset(_host_name(h) for h in hosts if h.strip()),
        )

    def allows_host(self, host: str) -> bool:
        name = _host_name(host)
        return name in self.allowed_hosts or any(
            allowed.startswith(".") and name.endswith(allowed) for allowed in self.allowed_hosts
        )

    def refusal(self, host: str, address: IPAddress) -> str | None:
        """None when a webhook to `host` may connect to `address`, else the address's class."""
        if self.allows_host(host):
            return None
        inner = embedded_ipv4(address)
        for candidate in (address, inner):
            if candidate is not None and any(candidate in n for n in self.allowed_networks):
                return None
        return address_class(address)

    def refusal_of(self, host: str, addresses: Iterable[IPAddress]) -> str | None:
        """Why a host that resolves to `addresses` is refused: one refused address is enough
        (a name that mixes public and internal addresses is not trusted either)."""
        for address in addresses:
            reason = self.refusal(host, address)
            if reason is not None:
                shown = "" if _is_literal(host) else f" resolves to {address}, which"
                return f"{host}{shown} is {reason}"
        return None


def _host_name(host: str) -> str:
    return host.strip().lower().rstrip(".")


def _is_literal(host: str) -> bool:
    try:
        ip_address(host)
    except ValueError:
        return False
    return True
