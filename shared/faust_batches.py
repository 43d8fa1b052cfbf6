"""Batches of records from a Faust stream, and a way to address a record's table partition.

`take_events` acknowledges a batch's events only after the code consuming it returned, so an
offset is committed only once the whole batch's outputs and state are stored. Faust tables read
and write the partition of "the current event"; when a batch spans partitions, `focus` makes the
partition of the record being handled (or of the write being stored) the current one.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

from faust.streams import _current_event

from shared.faust_app import record_of
from shared.kafka import Record

Focus = Callable[[int], None]


async def record_batches(
    stream: Any, max_records: int, within_seconds: float
) -> AsyncIterator[tuple[list[Record], Focus]]:
    """Up to `max_records` records at a time (fewer after `within_seconds`), in offset order
    per partition, with the `focus` function for their partitions."""
    async for events in stream.take_events(max_records, within_seconds):
        latest = {event.message.partition: event for event in events}

        def focus(partition: int, latest: dict[int, Any] = latest) -> None:
            # The context variable tables read, not `stream.current_event`: the stream's own
            # attribute tells `take_events` which event it buffered (and must acknowledge).
            _current_event.set(weakref.ref(latest[partition]))

        yield [record_of(event) for event in events], focus
