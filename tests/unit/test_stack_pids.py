"""A service that exited counts as down, even before the process that started it reaped it:
signal 0 still reaches such a zombie, which made a crashed service look up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import local_stack


def _wait_exited(child: subprocess.Popen[bytes]) -> None:
    """Until the child has exited, without reaping it (`waitid` with WNOWAIT)."""
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)


def test_an_exited_service_is_down_before_it_is_reaped(tmp_path: Path) -> None:
    stack = local_stack.Stack(home=tmp_path)
    (tmp_path / "run").mkdir()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        (tmp_path / "run" / "segmenter.pid").write_text(str(running.pid))
        (tmp_path / "run" / "orchestrator.pid").write_text(str(exited.pid))
        _wait_exited(exited)
        assert local_stack._zombie(exited.pid)
        assert not local_stack._zombie(running.pid)
        assert stack.pid("segmenter") == running.pid
        assert stack.pid("orchestrator") is None
        assert stack.pid("dispatcher") is None  # no pidfile
    finally:
        running.kill()
        running.wait()
        exited.wait()
