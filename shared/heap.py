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
