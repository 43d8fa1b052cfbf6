"""`waypost segments check`: files are checked as one set, offline; problems name the file, the
segment or aggregate and the rule, and the exit code is 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.cli import main

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_examples_check(capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted((ROOT / "examples" / "segments").glob("*.yaml"))
    assert main(["segments", "check", *map(str, files)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"ok  {path}" for path in files]


def test_a_file_may_read_what_another_defines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    views = write(tmp_path, "views.yaml", "aggregates: [{id: views, event: Product Viewed}]\n")
    busy = write(
        tmp_path,
        "busy.yaml",
        "segments: [{id: busy, condition: {field: aggregates.views, op: gte, value: 3}}]\n",
    )
    assert main(["segments", "check", str(views), str(busy)]) == 0
    assert main(["segments", "check", str(busy)]) == 2
    err = capsys.readouterr().err
    assert f"{busy}: segment 'busy': reads aggregates.views" in err
    assert err.rstrip().endswith("[unknown-aggregate]")


def test_problems_point_at_the_file_that_defines_the_segment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = write(tmp_path, "a.yaml", "segments: [{id: a, condition: {segment: b}}]\n")
    second = write(tmp_path, "b.yaml", "segments: [{id: b, condition: {segment: a}}]\n")
    shape = write(
        tmp_path, "c.yaml", "segments: [{id: c, condition: {field: event.name, op: exists}}]\n"
    )
    assert main(["segments", "check", str(first), str(second)]) == 2
    assert capsys.readouterr().err == (
        f"{first}: segment 'a': segments refer to each other in a cycle: a -> b -> a "
        "[segment-cycle]\n"
    )
    assert main(["segments", "check", str(shape)]) == 2
    assert "segment 'c': reads 'event.name'" in capsys.readouterr().err


def test_shape_problems_of_every_file_are_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = write(tmp_path, "a.yaml", "segments: [{id: A, condition: {tag: x}}]\n")
    second = write(tmp_path, "b.yaml", "journey: {id: j}\n")
    assert main(["segments", "check", str(first), str(second)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"{first}: segment 'A': segments.0.id:")
    assert err[1].startswith(f"{second}: file: the file must hold a mapping")
