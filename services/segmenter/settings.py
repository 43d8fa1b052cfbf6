"""Segmenter settings."""

from __future__ import annotations

from pydantic import Field, SecretStr

from shared.secrets import Secret
from shared.settings import StreamSettings

DEV_ERASURE_SECRET = "waypost-dev-erasure-secret"  # noqa: S105


class SegmenterSettings(StreamSettings):
    app_id: str = "waypost-segmenter"
    # Larger batches than the other stream workers': a batch's fixed costs (the wait for its
    # outputs, its changelog writes, its transaction) are shared by more events when the worker
    # catches up (docs/stream-processing.md); below its capacity, batches stay small anyway.
    batch_max_records: int = Field(default=5000, ge=1)
    # How often changed member counts are published (they are exact; this is only their pace).
    count_interval_seconds: float = 0.5
    # How often the worker looks for contacts evaluated against older segment definitions.
    backfill_check_seconds: float = 2.0
    # How often the object index is swept for relations older than every live fan-out trigger's
    # window on objects nobody writes any more (also soon after the start and every rebalance).
    relations_sweep_seconds: float = Field(default=3600.0, gt=0)
    # Keys the `forgotten:` marker kept for good per erased contact (an HMAC of the contact key,
    # so nobody can find out who was erased by hashing guessed keys, often e-mail addresses).
    # The same in every replica and kept: with a new secret, contacts erased before could be
    # rebuilt by late events.
    erasure_secret: SecretStr = SecretStr(DEV_ERASURE_SECRET)

    def secrets(self) -> list[Secret]:
        return [
            *super().secrets(),
            Secret("WAYPOST_ERASURE_SECRET", self.erasure_secret.get_secret_value()),
        ]

    def erasure_key(self) -> bytes:
        """The key of the `forgotten:` markers."""
        return self.erasure_secret.get_secret_value().encode()
