"""How many tries of one channel may hold a call slot at once: sized to rate times latency.

A try holds its slot from the moment it is marked `sending` until its provider answered, so the
slots in use are what a crash can leave `unknown` (an email cannot be asked about afterwards).
Slots beyond what the provider serves at once buy no throughput: the calls queue at the
provider, its latency grows, and so does the window a crash leaves unknown. `CallLimit` keeps a
channel's slots near rate times latency by watching the provider's latency (the Vegas method of
adaptive concurrency limits): from the latency of recent calls against the least seen lately
(the provider's latency with nothing queued), it estimates how many calls wait at the provider,
`limit * (1 - least / recent)`. Fewer than `alpha` queued: the limit grows; more than `beta`:
it shrinks. While fewer than half the slots are in use, the channel is limited by its traffic,
not by the provider, and the limit stays where it is.

In a backlog that lasts, the provider's latency with nothing queued is never seen again, and a
least latency that aged out would take the queue for the norm. So at the start of each span
of `LEAST_SPAN` calls the limit probes: for a few calls it allows half its slots, the queue at
the provider drains, and the least latency of the new span is the provider's own again.

Pure: the shell feeds it each call's duration and the channel's slots in use, and reads
`allowed`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The least latency is the least of the last one or two spans of this many calls: a provider
# that got slower for good (a new region, a heavier template) is its new normal after that.
LEAST_SPAN = 1_000
# The recent latency averages about this many calls.
RECENT_CALLS = 10
# A probe lasts this many calls, and at least twice the limit (the calls in flight when it
# starts must end first).
PROBE_CALLS = 20


@dataclass
class CallLimit:
    floor: int
    ceiling: int
    limit: float = 0.0
    recent: float | None = None
    least: float = math.inf
    least_before: float = math.inf
    calls: int = 0
    probe_until: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.floor <= self.ceiling:
            raise ValueError(f"need 1 <= floor ({self.floor}) <= ceiling ({self.ceiling})")
        self.limit = min(float(self.ceiling), max(float(self.floor), self.limit))

    @property
    def allowed(self) -> int:
        limit = self.limit / 2 if self.calls < self.probe_until else self.limit
        return max(self.floor, min(self.ceiling, int(limit)))

    @property
    def queued(self) -> float:
        """Calls estimated to wait at the provider, at the current limit."""
        if self.recent is None:
            return 0.0
        return self.limit * (1 - min(self.least, self.least_before) / self.recent)

    def sample(self, seconds: float, in_use: int) -> int:
        """One provider call took `seconds`, with `in_use` of the channel's slots taken when it
        ended; the number of slots now allowed."""
        seconds = max(seconds, 1e-6)
        self.calls += 1
        if self.calls % LEAST_SPAN == 0:
            self.least_before, self.least = self.least, math.inf
            self.probe_until = self.calls + max(PROBE_CALLS, 2 * int(self.limit))
        self.least = min(self.least, seconds)
        if self.calls < self.probe_until:
            return self.allowed  # probing: the limit learns nothing from these
        self.recent = (
            seconds if self.recent is None else self.recent + (seconds - self.recent) / RECENT_CALLS
        )
        if in_use * 2 < self.limit:
            return self.allowed  # limited by the traffic: nothing learnt about the provider
        step = max(1.0, math.log10(self.limit))
        alpha, beta = 3 * step, 6 * step
        queued = self.queued
        if queued < step:
            self.limit += beta / RECENT_CALLS * 2  # far from any queue: grow fast
        elif queued < alpha:
            self.limit += step / RECENT_CALLS
        elif queued > beta:
            self.limit -= step / RECENT_CALLS
        self.limit = min(float(self.ceiling), max(float(self.floor), self.limit))
        return self.allowed
