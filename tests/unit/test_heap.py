"""`shared.heap`: the start-up heap leaves the collector's full passes."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from shared.heap import freeze_startup_heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_objects_alive_at_start_up_are_frozen_and_garbage_is_not(unfrozen: None) -> None:
    kept = [{"row": n} for n in range(1000)]
    cycle = _Node()
    cycle.me = cycle  # garbage only a collection frees
    gone = weakref.ref(cycle)
    del cycle

    frozen = freeze_startup_heap()

    assert frozen == gc.get_freeze_count()
    assert frozen >= len(kept)
    # What lived at start-up is out of every generation the collector walks...
    tracked = {id(o) for generation in range(3) for o in gc.get_objects(generation)}
    assert id(kept[0]) not in tracked
    # ...and what start-up left as cyclic garbage was collected first, not frozen with it.
    assert gone() is None


class _Node:
    me: object = None
