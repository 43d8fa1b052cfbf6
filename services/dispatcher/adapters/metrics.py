"""Dispatcher metrics (Prometheus): outcomes per channel, and the alert that a channel is paused."""

from __future__ import annotations

from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge


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
        self._batches = Counter(
            "waypost_dispatcher_batches", "Batches of records handled", registry=self.registry
        )
        self._rounds = Counter(
            "waypost_dispatcher_checkpoints",
            "Group commits before provider calls (one per round of tries in a batch)",
            registry=self.registry,
        )

        self._stopped = Counter(
            "waypost_dispatcher_stopped_tries",
            "Tries another worker left `sending` (it stopped during the call), by channel and"
            " what settled them: its call receipt, the provider asked (SMS), or nothing",
            ["channel", "settled_by"],
            registry=self.registry,
        )

    def stopped_try(self, channel: str, settled_by: str) -> None:
        self._stopped.labels(channel, settled_by).inc()

    def rounds(self, rounds: int) -> None:
        self._batches.inc()
        self._rounds.inc(rounds)

    def outcome(self, channel: str, kind: str) -> None:
        self._outcomes.labels(channel, kind).inc()
        if kind == "config":
            self._config_errors.labels(channel).inc()

    def paused(self, channel: str, until: datetime, reason: str | None) -> None:
        self._paused_until.labels(channel).set(until.timestamp())
