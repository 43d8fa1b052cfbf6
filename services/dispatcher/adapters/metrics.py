"""Dispatcher metrics (Prometheus): outcomes per channel, and the alert that a channel is paused."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Where a try's time goes (`Dispatcher._attempt`), in the order a try takes the steps: waiting
# for a call slot (and the channel's rate limit); staging (an email's MAIL, RCPT, DATA and
# message, before its mark; nothing for the other channels); marking it `sending`, durable once
# its intent is acknowledged; the call, from its start to the provider's answer; and coming back
# in after the answer (the event loop getting to it). `docs/delivery.md` reads them.
TRY_STEPS = ("slot", "stage", "mark", "call", "back")
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class DispatchMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._outcomes = Counter(
            "waypost_dispatcher_outcomes",
            "Provider calls and decisions not to call, by channel and outcome class",
            ["channel", "outcome"],
            registry=self.registry,
        )
        self._config_errors = Counter(
            "waypost_dispatcher_configuration_errors",
            "Configuration errors (bad credentials, template ids); each pauses the channel",
            ["channel"],
            registry=self.registry,
        )
        # Alert on this: a paused channel keeps its requests on the retry topics.
        self._paused_until = Gauge(
            "waypost_dispatcher_channel_paused_until_seconds",
            "Unix time until which a channel is paused by a configuration error (0 = running)",
            ["channel"],
            registry=self.registry,
        )

        # Against the channel's limit (`WAYPOST_MAX_IN_FLIGHT`, or its own): at the limit, the
        # provider's latency bounds the channel's rate.
        self.in_flight = Gauge(
            "waypost_dispatcher_provider_calls_in_flight",
            "Provider calls under way by channel (each holds one of the channel's call slots)",
            ["channel"],
            registry=self.registry,
        )
        self._stopped = Counter(
            "waypost_dispatcher_stopped_tries",
            "Tries another worker left `sending` (it stopped during the call), by channel and"
            " what settled them: its call receipt, the provider asked (SMS), or nothing",
            ["channel", "settled_by"],
            registry=self.registry,
        )

        self._steps = Histogram(
            "waypost_dispatcher_try_step_seconds",
            "Seconds each try spent in each step, by channel and step (slot, stage, mark,"
            " call, back)",
            ["channel", "step"],
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self._step_children: dict[tuple[str, str], Any] = {}

    def step(self, channel: str, step: str, seconds: float) -> None:
        """One try's time in one of `TRY_STEPS`."""
        key = (channel, step)
        child = self._step_children.get(key)
        if child is None:
            child = self._step_children[key] = self._steps.labels(channel, step)
        child.observe(seconds)

    def stopped_try(self, channel: str, settled_by: str) -> None:
        self._stopped.labels(channel, settled_by).inc()

    def outcome(self, channel: str, kind: str) -> None:
        self._outcomes.labels(channel, kind).inc()
        if kind == "config":
            self._config_errors.labels(channel).inc()

    def paused(self, channel: str, until: datetime, reason: str | None) -> None:
        self._paused_until.labels(channel).set(until.timestamp())
