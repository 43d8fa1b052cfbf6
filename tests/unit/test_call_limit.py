"""The adaptive call limit (`services.dispatcher.domain.limits`), against simulated providers:
a try's latency is the provider's own while it serves every call at once, and grows with the
calls queued beyond its capacity."""

from __future__ import annotations

import asyncio

import pytest

from services.dispatcher.domain.limits import LEAST_SPAN, CallLimit
from services.dispatcher.slots import ChannelSlots

BASE = 0.05


def latency(in_use: int, capacity: int | None) -> float:
    if capacity is None or in_use <= capacity:
        return BASE
    return BASE * in_use / capacity  # the calls beyond capacity wait their turn


def backlog(limit: CallLimit, capacity: int | None, calls: int) -> list[int]:
    """A backlog keeps every allowed slot taken; the limit after each call."""
    seen = []
    for _ in range(calls):
        in_use = limit.allowed
        seen.append(limit.sample(latency(in_use, capacity), in_use))
    return seen


def test_a_provider_that_never_queues_gets_every_slot() -> None:
    limit = CallLimit(floor=4, ceiling=64)
    seen = backlog(limit, None, 200)
    assert seen[-1] == 64
    assert seen.index(64) < 100, "it should reach the ceiling within a hundred calls"


@pytest.mark.parametrize("capacity", [10, 30, 60])
def test_the_limit_settles_near_what_the_provider_serves_at_once(capacity: int) -> None:
    limit = CallLimit(floor=4, ceiling=256)
    seen = backlog(limit, capacity, 5_000)
    settled = seen[-1_000:]
    # Vegas keeps a few calls queued (alpha to beta: 3 to 6 times log10 of the limit); the
    # probes at the start of each span allow half the limit for a few calls.
    probing = [allowed for allowed in settled if allowed < capacity]
    assert len(probing) <= 2 * capacity + 20
    assert min(settled) >= capacity // 2
    assert max(settled) <= capacity + 6 * 3


def test_a_channel_limited_by_its_traffic_keeps_its_limit() -> None:
    limit = CallLimit(floor=8, ceiling=64)
    for _ in range(1_000):
        assert limit.sample(BASE, in_use=2) == 8


def test_a_provider_that_slows_for_good_is_its_new_normal_after_two_spans() -> None:
    limit = CallLimit(floor=4, ceiling=64)
    backlog(limit, None, 500)
    assert limit.allowed == 64
    slower = 4 * BASE
    for _ in range(2 * LEAST_SPAN + 300):
        limit.sample(slower, limit.allowed)
    # Its latency no longer reads as a queue: the limit is back at the ceiling.
    assert limit.queued < 1
    assert limit.allowed == 64


def test_a_limit_needs_a_floor_within_its_ceiling() -> None:
    with pytest.raises(ValueError, match="floor"):
        CallLimit(floor=10, ceiling=5)


# --- the slots that follow the limit ----------------------------------------------------------


async def test_tries_beyond_the_limit_wait_their_turn_in_order() -> None:
    slots = ChannelSlots(CallLimit(floor=2, ceiling=2))
    await slots.acquire()
    await slots.acquire()
    order: list[str] = []

    async def waiting(name: str) -> None:
        await slots.acquire()
        order.append(name)

    first = asyncio.ensure_future(waiting("first"))
    second = asyncio.ensure_future(waiting("second"))
    await asyncio.sleep(0)
    assert order == []
    slots.release()
    await first
    assert order == ["first"]
    assert not second.done()
    slots.release()
    await second
    assert order == ["first", "second"]
    assert slots.in_use == 2


async def test_a_limit_that_grows_lets_waiting_tries_in() -> None:
    slots = ChannelSlots(CallLimit(floor=1, ceiling=8))
    await slots.acquire()
    waiting = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    assert not waiting.done()
    slots.sample(BASE)  # the only call ended at once, with the only slot taken: room to grow
    await asyncio.wait_for(waiting, 1)
    assert slots.in_use == 2


async def test_a_try_cancelled_while_waiting_takes_no_slot() -> None:
    slots = ChannelSlots(CallLimit(floor=1, ceiling=1))
    await slots.acquire()
    waiting = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    slots.release()
    assert slots.in_use == 0
    await asyncio.wait_for(slots.acquire(), 1)
    assert slots.in_use == 1
