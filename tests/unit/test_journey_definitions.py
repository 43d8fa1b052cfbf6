"""Journey definitions: durations, graph rules of `check_journey`, and loading definition files.

A problem must name the journey, the step and the rule, so a marketer can fix the file alone.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from shared.cli import DefinitionError, load_journey_file
from shared.durations import parse_duration
from shared.journey_checks import DefinitionProblem, check_journey
from shared.journeys import JourneyFile

WELCOME_FILE = Path(__file__).resolve().parents[2] / "examples" / "journeys" / "s02-welcome.yaml"

# --- parse_duration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("250ms", timedelta(milliseconds=250)),
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("6h", timedelta(hours=6)),
        ("1.5h", timedelta(minutes=90)),
        ("6d", timedelta(days=6)),
        ("2w", timedelta(weeks=2)),
        (" 3 d ", timedelta(days=3)),
        ("0s", timedelta(0)),
    ],
)
def test_parse_duration_reads_a_number_and_a_unit(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "6", "d", "-1d", "1 day", "6D", "1.d", ".5h", "1e3s", "1h30m", "P1D", "ten m"],
)
def test_parse_duration_rejects_anything_else_with_an_example(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration such as 30s"):
        parse_duration(text)


# --- check_journey --------------------------------------------------------------------------


def journey_file(
    steps: list[dict[str, Any]], templates: dict[str, Any] | None = None
) -> JourneyFile:
    """A journey `j` with the given steps; template `t` (email) exists unless overridden."""
    return JourneyFile.model_validate(
        {
            "journey": {"id": "j", "name": "J", "trigger": {"event": "Signed Up"}, "steps": steps},
            "templates": {"t": {"text": "hi"}} if templates is None else templates,
        }
    )


def send(step_id: str, **extra: Any) -> dict[str, Any]:
    return {"id": step_id, "type": "send", "template": "t", **extra}


def wait(step_id: str, duration: str = "1d", **extra: Any) -> dict[str, Any]:
    return {"id": step_id, "type": "wait", "duration": duration, **extra}


def exit_(step_id: str, **extra: Any) -> dict[str, Any]:
    return {"id": step_id, "type": "exit", **extra}


def only_problem(problems: list[DefinitionProblem]) -> DefinitionProblem:
    assert len(problems) == 1, problems
    return problems[0]


def test_a_well_formed_journey_has_no_problems() -> None:
    assert check_journey(journey_file([send("a"), wait("w"), send("b"), exit_("end")])) == []


def test_a_loop_through_a_wait_is_allowed() -> None:
    assert check_journey(journey_file([send("a"), wait("w", next="a")])) == []


def test_next_naming_an_unknown_step_is_a_problem() -> None:
    problem = only_problem(check_journey(journey_file([send("a", next="nowhere"), exit_("b")])))

    assert (problem.journey, problem.step, problem.rule) == ("j", "a", "next-exists")
    assert "nowhere" in problem.message


def test_a_step_no_path_reaches_is_a_problem() -> None:
    problems = check_journey(journey_file([send("a", next="c"), send("b"), exit_("c")]))

    problem = only_problem(problems)
    assert (problem.step, problem.rule) == ("b", "reachable")


def test_a_step_after_an_exit_is_unreachable() -> None:
    problem = only_problem(check_journey(journey_file([send("a"), exit_("end"), send("late")])))

    assert (problem.step, problem.rule) == ("late", "reachable")


def test_a_send_with_an_undefined_template_is_a_problem() -> None:
    problem = only_problem(check_journey(journey_file([send("a", template="missing")])))

    assert (problem.journey, problem.step, problem.rule) == ("j", "a", "template-exists")
    assert "missing" in problem.message


def test_a_template_known_to_the_store_satisfies_a_send() -> None:
    file = journey_file([send("a", template="stored")])

    assert check_journey(file, known_templates={"stored"}) == []


def test_a_template_for_another_channel_is_a_problem() -> None:
    file = journey_file([send("a", channel="sms")], templates={"t": {"text": "hi"}})

    problem = only_problem(check_journey(file))

    assert (problem.step, problem.rule) == ("a", "template-channel")
    assert "email" in problem.message
    assert "sms" in problem.message


def test_an_exit_with_next_is_a_problem() -> None:
    problem = only_problem(check_journey(journey_file([send("a"), exit_("end", next="a")])))

    assert (problem.step, problem.rule) == ("end", "exit-is-final")


def test_two_steps_with_one_id_are_a_problem() -> None:
    problem = only_problem(check_journey(journey_file([send("a"), send("a"), exit_("end")])))

    assert (problem.step, problem.rule) == ("a", "unique-step-ids")


def test_a_loop_without_a_wait_is_a_problem() -> None:
    problem = only_problem(check_journey(journey_file([send("a"), send("b", next="a")])))

    assert (problem.journey, problem.rule) == ("j", "bounded-loops")
    assert "loop" in problem.message


def test_a_loop_without_a_wait_names_a_step_of_the_loop() -> None:
    problem = only_problem(check_journey(journey_file([send("a"), send("b", next="a")])))

    assert problem.step in {"a", "b"}


def test_a_problem_reads_as_journey_step_message_and_rule() -> None:
    problem = only_problem(check_journey(journey_file([send("a", next="zz"), exit_("b")])))

    assert str(problem) == "journey 'j', step 'a': 'next' names unknown step 'zz' [next-exists]"


# --- load_journey_file ----------------------------------------------------------------------


def test_the_welcome_example_loads_clean() -> None:
    loaded = load_journey_file(WELCOME_FILE)

    assert loaded.journey.id == "welcome"
    assert [s.id for s in loaded.journey.steps] == [
        "welcome-email",
        "wait-before-reminder",
        "trial-reminder",
        "wait-a-day",
        "ordered-since-entering",
        "tag-first-order",
        "tag-trial-not-placed",
        "done",
    ]
    assert set(loaded.templates) == {"welcome", "trial-reminder"}
    assert check_journey(loaded) == []


GOOD_HEAD = """\
journey:
  id: onboarding
  name: Onboarding
  trigger: {event: Registered}
  steps:
"""
TEMPLATES = """\
templates:
  hello: {text: Hello}
"""


def write(tmp_path: Path, steps: str, templates: str = TEMPLATES, name: str = "j.yaml") -> Path:
    path = tmp_path / name
    path.write_text(GOOD_HEAD + steps + templates)
    return path


def load_error(path: Path) -> str:
    with pytest.raises(DefinitionError) as caught:
        load_journey_file(path)
    return str(caught.value)


def test_a_bad_duration_names_file_journey_step_and_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "    - {id: hello, type: send, template: hello}\n"
        "    - {id: pause, type: wait, duration: 6 days}\n",
    )

    message = load_error(path)

    assert message.startswith(f"{path}: journey 'onboarding', step 'pause': ")
    assert "journey.steps.1.wait.duration" in message
    assert "'6 days' is not a duration" in message


def test_a_zero_wait_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "    - {id: pause, type: wait, duration: 0s}\n")

    assert "a wait must be longer than zero" in load_error(path)


def test_a_missing_field_names_the_step_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, "    - {id: hello, type: send}\n")

    message = load_error(path)

    assert "journey 'onboarding', step 'hello'" in message
    assert "journey.steps.0.send: Value error, a send needs `template`" in message


def test_a_step_without_an_id_is_named_by_its_position(tmp_path: Path) -> None:
    path = write(tmp_path, "    - {id: hello, type: send, template: hello}\n    - {type: exit}\n")

    message = load_error(path)

    assert "step '#2'" in message
    assert "journey.steps.1.exit.id" in message


def test_an_unknown_step_type_names_the_step(tmp_path: Path) -> None:
    path = write(tmp_path, "    - {id: hello, type: sned, template: hello}\n")

    message = load_error(path)

    assert "step 'hello'" in message
    assert "'sned'" in message


def test_every_problem_of_a_file_is_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "    - {id: hello, type: send}\n    - {id: pause, type: wait, duration: soon}\n",
    )

    lines = load_error(path).splitlines()

    assert any("step 'hello'" in line and "template" in line for line in lines)
    assert any("step 'pause'" in line and "duration" in line for line in lines)
    assert all(line.startswith(f"{path}: journey 'onboarding'") for line in lines)


def test_a_graph_problem_names_journey_step_and_rule(tmp_path: Path) -> None:
    path = write(tmp_path, "    - {id: hello, type: send, template: hello, next: later}\n")

    message = load_error(path)

    assert message == (
        f"{path}: journey 'onboarding', step 'hello': 'next' names unknown step 'later' "
        "[next-exists]"
    )


def test_a_template_missing_from_the_file_is_a_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "    - {id: hello, type: send, template: nope}\n")

    assert "step 'hello': template 'nope' is not defined [template-exists]" in load_error(path)


def test_invalid_yaml_is_reported_as_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("journey: [unclosed\n")

    assert load_error(path).startswith(f"{path}: cannot read: ")


def test_a_json_definition_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "j.json"
    path.write_text(
        '{"journey": {"id": "j", "name": "J", "trigger": {"event": "X"},'
        ' "steps": [{"id": "a", "type": "exit"}]}}'
    )

    assert load_journey_file(path).journey.id == "j"


def test_a_journey_that_is_not_a_mapping_is_a_definition_error(tmp_path: Path) -> None:
    path = tmp_path / "j.yaml"
    path.write_text("journey: welcome\n")

    assert "journey" in load_error(path)


def test_a_huge_wait_is_a_definition_error(tmp_path: Path) -> None:
    path = write(tmp_path, "    - {id: pause, type: wait, duration: 9999999999d}\n")

    assert "step 'pause'" in load_error(path)
