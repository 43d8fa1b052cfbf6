"""Deterministic ids: the same inputs always give the same id, so replays are idempotent."""

from __future__ import annotations

import hashlib


def stable_id(*parts: object, length: int = 32) -> str:
    """A hex digest over the parts, joined unambiguously."""
    digest = hashlib.blake2b(digest_size=32)
    for part in parts:
        raw = str(part).encode()
        digest.update(len(raw).to_bytes(4, "big"))
        digest.update(raw)
    return digest.hexdigest()[:length]


def stable_fraction(*parts: object) -> float:
    """A number in [0, 1) derived from the parts, for stable random choices."""
    return int(stable_id(*parts, length=13), 16) / float(16**13)
