"""Coupon codes: keyed with the server's secret, the same on a replay, out of reach without it."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from shared.cli import load_journey_file
from shared.ids import stable_id
from shared.journey_engine.engine import coupon_code
from shared.journey_engine.simulator import Simulation
from shared.journeys import CouponStep

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
KEY = b"9f1c2b7e4d5a6c8b0e3f1a2d4c6b8e0f9a1c3e5b"
OTHER_KEY = b"0b8d6f4a2c1e3b5d7f9a0c2e4b6d8f1a3c5e7b9d"
ON_TAG = load_journey_file(
    Path(__file__).resolve().parents[2] / "examples" / "journeys" / "s14-coupon-on-tag.yaml"
).journey


def step(prefix: str = "", length: int = 10) -> CouponStep:
    return CouponStep(id="coupon", type="coupon", prefix=prefix, length=length)


def unkeyed(instance_id: str, step: CouponStep, visit: int) -> str:
    """The code as it was derived before it was keyed: from public inputs only."""
    digest = base64.b32encode(bytes.fromhex(stable_id(instance_id, step.id, visit, length=64)))
    return step.prefix + "".join(ALPHABET[c % 32] for c in digest[: step.length])


def issued(key: bytes) -> str:
    """The code the coupon-on-tag journey issues to one customer under `key`."""
    sim = Simulation([ON_TAG], T0, coupon_key=key)
    sim.identify("ada", email="ada@example.com", status="customer")
    sim.tag("ada", "mens-section-buyer")
    (coupon,) = sim.profile("ada").coupons
    return coupon.code


def test_the_same_inputs_and_key_give_the_same_code() -> None:
    assert coupon_code(KEY, "i-1", "coupon", 0, step()) == coupon_code(
        KEY, "i-1", "coupon", 0, step()
    )
    # Through the engine: a replay of the same journey run issues the same coupon.
    assert issued(KEY) == issued(KEY)


def test_another_key_gives_another_code() -> None:
    assert coupon_code(KEY, "i-1", "coupon", 0, step()) != coupon_code(
        OTHER_KEY, "i-1", "coupon", 0, step()
    )
    assert issued(KEY) != issued(OTHER_KEY)


def test_each_instance_step_and_visit_has_its_own_code() -> None:
    codes = {
        coupon_code(KEY, instance, step_id, visit, step())
        for instance in ("i-1", "i-2")
        for step_id in ("coupon", "coupon-2")
        for visit in (0, 1)
    }
    assert len(codes) == 8


@given(
    instance_id=st.text(min_size=1, max_size=40),
    visit=st.integers(min_value=0, max_value=50),
    length=st.integers(min_value=6, max_value=32),
)
def test_the_code_is_not_the_one_public_inputs_alone_would_give(
    instance_id: str, visit: int, length: int
) -> None:
    coupon = step(length=length)
    assert coupon_code(KEY, instance_id, "coupon", visit, coupon) != unkeyed(
        instance_id, coupon, visit
    )


@given(
    prefix=st.sampled_from(["", "MENS-", "WELCOME10-"]),
    length=st.integers(min_value=6, max_value=32),
)
def test_the_code_keeps_its_prefix_length_and_alphabet(prefix: str, length: int) -> None:
    code = coupon_code(KEY, "i-1", "coupon", 0, step(prefix, length))
    assert code.startswith(prefix)
    assert len(code) == len(prefix) + length
    assert set(code[len(prefix) :]) <= set(ALPHABET)


def test_a_simulated_run_issues_codes_with_its_own_fixed_key() -> None:
    sim = Simulation([ON_TAG], T0)
    sim.identify("ada", email="ada@example.com", status="customer")
    sim.tag("ada", "mens-section-buyer")
    (coupon,) = sim.profile("ada").coupons
    assert coupon.code.startswith("MENS-")
    assert coupon.code != issued(KEY)
