"""Every definition file in examples/journeys loads as `waypost check` loads it, and together
they cover every scenario of SCENARIOS.md with consistent, used templates."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest

from shared.cli import load_journey_file
from shared.journey_checks import check_journey
from shared.journeys import SendStep, TemplateDefinition
from tests.scenarios.conftest import EXAMPLES

FILES = sorted(EXAMPLES.glob("*.yaml"))
NAME = re.compile(r"^s(\d\d)-[a-z0-9-]+\.yaml$")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_the_file_loads_clean(path: Path) -> None:
    loaded = load_journey_file(path)

    assert check_journey(loaded) == []
    assert NAME.match(path.name)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_the_header_says_which_scenario_it_is(path: Path) -> None:
    number = int(path.name[1:3])

    assert re.match(rf"# S{number}\b", path.read_text())


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_template_of_the_file_is_used_by_a_send(path: Path) -> None:
    loaded = load_journey_file(path)
    used = {
        choice.template
        for step in loaded.journey.steps
        if isinstance(step, SendStep)
        for choice in step.choices
    }

    assert set(loaded.templates) == used


def test_every_scenario_has_a_definition_file() -> None:
    numbers = {int(path.name[1:3]) for path in FILES}

    assert numbers == set(range(1, 20))


def test_journey_ids_are_unique_across_files() -> None:
    ids = [load_journey_file(path).journey.id for path in FILES]

    assert len(ids) == len(set(ids))


def test_a_template_id_shared_by_several_files_means_the_same_template() -> None:
    # Publishing stores templates by id: two files must not overwrite each other's.
    seen: dict[str, list[TemplateDefinition]] = defaultdict(list)
    for path in FILES:
        for template_id, template in load_journey_file(path).templates.items():
            seen[template_id].append(template)

    assert {
        t for t, versions in seen.items() if len({v.model_dump_json() for v in versions}) > 1
    } == set()
