"""Which addresses a webhook step may reach, and what the operator's allow-list opens."""

from __future__ import annotations

from ipaddress import ip_address

import pytest
from pydantic import ValidationError

from services.orchestrator.domain.destinations import DestinationPolicy, address_class
from services.orchestrator.settings import OrchestratorSettings


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.45.0.9", "loopback"),
        ("::1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.254", "private"),
        ("192.168.1.10", "private"),
        ("fd12:3456::1", "private"),
        ("fc00::1", "private"),
        ("fec0::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "shared address space"),
        ("100.127.255.254", "shared address space"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.10", "special-purpose"),
        ("198.18.0.1", "special-purpose"),
        ("2001:db8::1", "special-purpose"),
        ("::ffff:127.0.0.1", "loopback, IPv4 inside IPv6"),
        ("::ffff:169.254.169.254", "link-local, IPv4 inside IPv6"),
        ("::ffff:10.0.0.1", "private, IPv4 inside IPv6"),
        ("2002:7f00:1::", "loopback, IPv4 inside IPv6"),
        ("64:ff9b::a9fe:a9fe", "link-local, IPv4 inside IPv6"),
    ],
)
def test_internal_addresses_are_refused_by_class(address: str, reason: str) -> None:
    assert address_class(ip_address(address)) == reason


@pytest.mark.parametrize(
    "address",
    ["93.184.216.34", "8.8.8.8", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "::ffff:8.8.8.8"],
)
def test_public_addresses_pass(address: str) -> None:
    assert address_class(ip_address(address)) is None


def test_an_allowed_network_opens_its_addresses_and_their_ipv4_mapped_forms() -> None:
    policy = DestinationPolicy.parse(["127.0.0.0/8", " 10.20.0.0/16"], [])

    assert policy.refusal("127.0.0.1", ip_address("127.0.0.1")) is None
    assert policy.refusal("::ffff:127.0.0.1", ip_address("::ffff:127.0.0.1")) is None
    assert policy.refusal("hooks", ip_address("10.20.3.4")) is None
    assert policy.refusal("hooks", ip_address("10.21.3.4")) == "private"
    assert policy.refusal("::1", ip_address("::1")) == "loopback"
    assert policy.refusal("meta", ip_address("169.254.169.254")) == "link-local"


def test_an_allowed_host_name_may_resolve_anywhere_and_a_leading_dot_allows_names_under_it() -> (
    None
):
    policy = DestinationPolicy.parse([], ["CRM.internal.", ".svc.cluster.local"])
    private = ip_address("10.0.0.7")

    assert policy.refusal("crm.internal", private) is None
    assert policy.refusal("scores.team.svc.cluster.local", private) is None
    assert policy.refusal("svc.cluster.local.evil.example", private) == "private"
    assert policy.refusal("other.internal", private) == "private"


def test_one_internal_address_refuses_the_whole_name() -> None:
    policy = DestinationPolicy()
    addresses = [ip_address("93.184.216.34"), ip_address("127.0.0.1")]

    assert policy.refusal_of("mixed.example", addresses) == (
        "mixed.example resolves to 127.0.0.1, which is loopback"
    )
    assert policy.refusal_of("::1", [ip_address("::1")]) == "::1 is loopback"
    assert policy.refusal_of("public.example", addresses[:1]) is None


def test_settings_read_comma_separated_lists_and_refuse_a_bad_network(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WAYPOST_WEBHOOK_ALLOWED_NETWORKS", raising=False)
    monkeypatch.delenv("WAYPOST_WEBHOOK_ALLOWED_HOSTS", raising=False)
    settings = OrchestratorSettings(
        webhook_allowed_networks="127.0.0.0/8, ::1/128", webhook_allowed_hosts="crm.internal"
    )

    policy = settings.webhook_destinations()

    assert [str(n) for n in policy.allowed_networks] == ["127.0.0.0/8", "::1/128"]
    assert policy.allowed_hosts == {"crm.internal"}
    assert OrchestratorSettings().webhook_destinations() == DestinationPolicy()
    with pytest.raises(ValidationError, match="webhook_allowed_networks"):
        OrchestratorSettings(webhook_allowed_networks="10.0.0.1/8")
