"""A suppression's reason never holds the address it suppresses (`adapters/suppressions.py`)."""

from __future__ import annotations

from services.dispatcher.adapters.suppressions import without_address


def test_a_quoted_address_is_taken_out_of_the_reason_in_any_letter_case() -> None:
    reason = "smtp 550: 5.1.1 <Ann@Example.com>: Recipient address rejected"
    assert without_address(reason, "ann@example.com ") == (
        "smtp 550: 5.1.1 <<address>>: Recipient address rejected"
    )


def test_a_reason_without_the_address_is_kept_whole() -> None:
    assert without_address("21211: invalid 'To' number", "+15550100") == (
        "21211: invalid 'To' number"
    )
    assert without_address("bounced", "") == "bounced"
