"""The start-up heap set aside from the garbage collector's full passes.

A worker process holds some 80,000 long-lived objects before it handles its first record:
imported modules, pydantic schemas and validators, compiled definitions, clients. Each of
CPython's full (generation 2) collections walks all of them again. In the dispatcher these
passes took 40 to 69 ms each, several times a phase of `bench/dispatch.py`, and stopped the
event loop meanwhile; with the start-up heap frozen they took 3 to 18 ms (docs/delivery.md).
Objects frozen here are never collected as cycles. Call it once, where a service process
starts (`run_stream_worker`, the dispatcher's and ingest's start-up), never from library code
that a test process may run: what start-up left is the process's own for its whole life, so
nothing is lost there.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect what start-up left over, then move every surviving object to the collector's
    permanent generation; the number of objects frozen so far."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


# The collector's thresholds for a stream worker and the dispatcher (CPython's defaults: 700,
# 10, 10). A batch of
# thousands of records allocates and drops hundreds of thousands of objects, and a worker keeps
# thousands of decoded rows: with the defaults, `bench/segmenter.py`'s worker ran about 1,280
# young, 116 middle and 11 full collections per 60,000 events, 0.84 to 1.24 s in all (the
# longest pause 81 to 115 ms), about a tenth of its CPU while it caught up; with these, 33, 1
# and 1, 0.36 to 0.52 s (docs/stream-processing.md). Young objects that die by reference
# count never reach a collection either way; cycles wait a little longer to be found. The
# dispatcher's collections in a `bench/dispatch.py` phase of 3,000 sends: 0.16 to 0.33 s with
# the defaults, 0.07 to 0.11 s with these (docs/delivery.md).
YOUNG_THRESHOLD = 20_000
OLDER_THRESHOLD = 20


def collect_less_often() -> tuple[int, int, int]:
    """Run the cyclic collector less often (`YOUNG_THRESHOLD`, `OLDER_THRESHOLD`); the
    thresholds before."""
    before = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, OLDER_THRESHOLD, OLDER_THRESHOLD)
    return before
