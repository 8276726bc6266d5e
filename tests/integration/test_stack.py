"""The benchmark stack's own processes: a terminated benchmark leaves no server behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workload.stack import ROOT

pytestmark = pytest.mark.integration

HOLD_STACK = """
import sys, time
from pathlib import Path
from workload.stack import running_stack
with running_stack(Path(sys.argv[1]), models=[], log_dir=Path(sys.argv[2])) as stack:
    print(" ".join(str(process.popen.pid) for process in stack.processes), flush=True)
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_stops_redis_triton_and_the_controller(tmp_path: Path) -> None:
    repository = tmp_path / "repository"  # an empty one: the processes are under test, not the models
    repository.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_STACK, str(repository), str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        pids = [int(pid) for pid in holder.stdout.readline().split()]
        assert len(pids) == 3 and all(_alive(pid) for pid in pids)
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in pids if _alive(pid)]
    finally:
        holder.kill()
        holder.wait()
        for pid in filter(_alive, pids):  # left behind by a failure: not by the next test's machine
            os.killpg(pid, signal.SIGKILL)
