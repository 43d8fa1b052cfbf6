"""Scenario tests: the definition files in examples/journeys, played in virtual time."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.cli import load_journey_file
from shared.contracts import SendRequest
from shared.journey_engine.simulator import Simulation
from shared.journeys import Journey, JourneyFile
from shared.rendering import (
    EmailTemplate,
    RenderedEmail,
    render_email,
    render_variables,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "journeys"
# A Monday morning; scenario clocks start here unless they say otherwise.
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def definition(name: str) -> JourneyFile:
    """The file examples/journeys/<name>.yaml, validated like `waypost check` does."""
    return load_journey_file(EXAMPLES / f"{name}.yaml")


def journey(name: str) -> Journey:
    """The journey of examples/journeys/<name>.yaml."""
    return definition(name).journey


def rendered(request: SendRequest, *files: JourneyFile) -> RenderedEmail:
    """The message as the dispatcher renders it (strict: a missing variable fails the test).

    Every channel goes through the one sandboxed renderer; a push title is the subject.
    """
    templates = {name: t for f in files for name, t in f.templates.items()}
    template = templates[request.template_id]
    assert template.channel == request.channel
    email = EmailTemplate(subject=template.subject or "", text=template.text, html=template.html)
    return render_email(email, render_variables(request))


def segment_in_header(name: str, segment_id: str) -> dict[str, Any]:
    """A segment definition written as a comment in a file's header, read back as YAML."""
    lines = (EXAMPLES / f"{name}.yaml").read_text().splitlines()
    start = lines.index(f"#   id: {segment_id}")
    block = []
    for line in lines[start:]:
        if not line.startswith("#   "):
            break
        block.append(line[2:])
    loaded: dict[str, Any] = yaml.safe_load("\n".join(block))
    return loaded


@pytest.fixture
def simulate() -> type[Simulation]:
    return Simulation
