"""Every throw-away stack (tests, benchmarks) listens below Linux's ephemeral port range, and no
two of them share a port, so they never fail to start on a port a client connection holds, and
two benches (or a bench and a test session) can run side by side."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest

from tests.conftest import local_stack, ports_at
from tests.e2e.test_docstore_soak import SOAK_PORTS

# Linux draws the local ports of outgoing connections from here (net.ipv4.ip_local_port_range).
EPHEMERAL_FIRST = 32768
BENCHES = sorted(
    p.stem
    for p in (Path(__file__).resolve().parents[2] / "bench").glob("*.py")
    if "PORTS = stack.Ports(" in p.read_text()
)


def _stacks() -> dict[str, local_stack.Ports]:
    stacks = {f"bench.{name}": importlib.import_module(f"bench.{name}").PORTS for name in BENCHES}
    stacks["tests"] = ports_at(0)
    stacks["tests (docstore soak)"] = SOAK_PORTS
    return stacks


def _ports(ports: local_stack.Ports) -> dict[str, int]:
    return {f.name: getattr(ports, f.name) for f in dataclasses.fields(ports)}


def test_every_bench_that_starts_a_stack_is_checked() -> None:
    assert {"chaos", "dispatch", "docstore", "ingest", "pipeline", "segmenter", "timers"} <= set(
        BENCHES
    )


@pytest.mark.parametrize(
    "name", [*(f"bench.{b}" for b in BENCHES), "tests", "tests (docstore soak)"]
)
def test_a_stack_listens_below_the_ephemeral_range(name: str) -> None:
    ports = _ports(_stacks()[name])
    inside = {field: port for field, port in ports.items() if port >= EPHEMERAL_FIRST}
    assert not inside, f"{name}: {inside} inside Linux's ephemeral range ({EPHEMERAL_FIRST}+)"


def test_no_two_stacks_share_a_port() -> None:
    """Ports left at the local stack's defaults (`make up`) are ones a stack does not use."""
    defaults = _ports(local_stack.Ports())
    owner: dict[int, str] = {}
    for name, ports in _stacks().items():
        for field, port in _ports(ports).items():
            if port == defaults[field]:
                continue
            assert port not in owner, f"{name}.{field} and {owner[port]} both use {port}"
            owner[port] = f"{name}.{field}"
