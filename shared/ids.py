"""Deterministic ids: the same inputs always give the same id, so replays are idempotent."""

from __future__ import annotations

import hashlib
import hmac
from typing import Protocol


class _Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...


def _feed(digest: _Digest, parts: tuple[object, ...]) -> None:
    # Each part is length-prefixed, so ("ab", "c") and ("a", "bc") never collide.
    for part in parts:
        raw = str(part).encode()
        digest.update(len(raw).to_bytes(4, "big"))
        digest.update(raw)


def stable_id(*parts: object, length: int = 32) -> str:
    """A hex digest over the parts, joined unambiguously."""
    digest = hashlib.blake2b(digest_size=32)
    _feed(digest, parts)
    return digest.hexdigest()[:length]


def keyed_digest(key: bytes, *parts: object) -> bytes:
    """HMAC-SHA256 under `key` over the parts (joined as `stable_id` joins them): as
    deterministic as `stable_id`, but only who holds the key can compute it (32 bytes)."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    _feed(mac, parts)
    return mac.digest()


def stable_fraction(*parts: object) -> float:
    """A number in [0, 1) derived from the parts, for stable random choices."""
    return int(stable_id(*parts, length=13), 16) / float(16**13)
