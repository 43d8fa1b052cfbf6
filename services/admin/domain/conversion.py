"""Conversion of treated contacts against the holdout group of a journey (pure)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GroupConversion:
    entered: int
    converted: int

    @property
    def rate(self) -> float | None:
        return self.converted / self.entered if self.entered else None


@dataclass(frozen=True)
class ConversionReport:
    """How often instances converted, for contacts who got messages and for the holdout."""

    treated: GroupConversion
    holdout: GroupConversion

    @property
    def uplift(self) -> float | None:
        """Treated rate minus holdout rate (absolute, in fractions); None without both groups."""
        if self.treated.rate is None or self.holdout.rate is None:
            return None
        return self.treated.rate - self.holdout.rate

    def as_dict(self) -> dict[str, object]:
        def group(g: GroupConversion) -> dict[str, object]:
            return {"entered": g.entered, "converted": g.converted, "rate": g.rate}

        return {
            "treated": group(self.treated),
            "holdout": group(self.holdout),
            "uplift": self.uplift,
        }


def conversion_report(counts: dict[tuple[bool, str], int]) -> ConversionReport:
    """From instance counts keyed by (holdout, kind) with kind `entered` or `converted`."""

    def group(holdout: bool) -> GroupConversion:
        return GroupConversion(
            entered=counts.get((holdout, "entered"), 0),
            converted=counts.get((holdout, "converted"), 0),
        )

    return ConversionReport(treated=group(False), holdout=group(True))
