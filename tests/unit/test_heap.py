"""`shared.heap`: the start-up heap leaves the collector's full passes."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from shared.heap import OLDER_THRESHOLD, YOUNG_THRESHOLD, collect_less_often, freeze_startup_heap


class _Node:
    me: object = None


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def _tracked_ids() -> set[int]:
    return {id(o) for generation in range(3) for o in gc.get_objects(generation)}


def test_objects_alive_at_start_up_are_frozen_and_garbage_is_not(unfrozen: None) -> None:
    kept = [_Node() for _ in range(1000)]
    assert all(gc.is_tracked(node) for node in kept)
    assert {id(node) for node in kept} <= _tracked_ids()
    cycle = _Node()
    cycle.me = cycle  # garbage only a collection frees
    gone = weakref.ref(cycle)
    del cycle
    before = gc.get_freeze_count()

    frozen = freeze_startup_heap()

    # What lived at start-up is out of every generation the collector walks...
    assert frozen >= before + len(kept)
    assert not {id(node) for node in kept} & _tracked_ids()
    # ...and what start-up left as cyclic garbage was collected first, not frozen with it.
    assert gone() is None


def test_objects_made_after_start_up_stay_collectable(unfrozen: None) -> None:
    freeze_startup_heap()
    later = _Node()
    later.me = later
    gone = weakref.ref(later)
    del later

    gc.collect()

    assert gone() is None


def test_a_worker_collects_less_often_and_still_finds_cycles() -> None:
    before = collect_less_often()
    try:
        assert gc.get_threshold() == (YOUNG_THRESHOLD, OLDER_THRESHOLD, OLDER_THRESHOLD)
        gc.collect()
        young_before = gc.get_stats()[0]["collections"]
        cycle = _Node()
        cycle.me = cycle
        gone = weakref.ref(cycle)
        del cycle
        # Fewer new objects than the threshold: no young collection ran, the cycle lives on.
        kept = [_Node() for _ in range(YOUNG_THRESHOLD // 2)]
        assert gc.get_stats()[0]["collections"] == young_before
        assert gone() is not None
        # More than the threshold: a young collection ran on its own and freed it.
        kept += [_Node() for _ in range(YOUNG_THRESHOLD)]
        assert gc.get_stats()[0]["collections"] > young_before
        assert gone() is None
    finally:
        gc.set_threshold(*before)
