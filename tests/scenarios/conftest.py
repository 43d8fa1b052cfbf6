"""Scenario tests: the definition files in examples/journeys, played in virtual time."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.orchestrator.domain.simulator import Simulation
from shared.cli import load_journey_file
from shared.journeys import Journey

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "journeys"
# A Monday morning; scenario clocks start here unless they say otherwise.
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def journey(name: str) -> Journey:
    """The journey of examples/journeys/<name>.yaml, validated like `waypost check` does."""
    return load_journey_file(EXAMPLES / f"{name}.yaml").journey


@pytest.fixture
def simulate() -> type[Simulation]:
    return Simulation
