"""The runner that finishes traced batches off the request path: it waits while a batch is served, refuses work it
cannot take, and survives a failing pass."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from triton_backend.tail_runner import TailRunner


def _steps(log: list[str], name: str, count: int, gate: threading.Event | None = None) -> Iterator[None]:
    for index in range(count):
        if gate is not None:
            gate.wait(5)
        log.append(f"{name}{index}")
        yield None


def _wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture()
def runner() -> Iterator[TailRunner]:
    tails = TailRunner("test", capacity=2)
    yield tails
    tails.close()


def test_passes_run_to_the_end_in_order(runner: TailRunner) -> None:
    log: list[str] = []
    assert runner.submit(_steps(log, "a", 3))
    assert runner.submit(_steps(log, "b", 2))
    _wait_for(lambda: len(log) == 5)
    assert log == ["a0", "a1", "a2", "b0", "b1"]


def test_no_block_starts_while_a_batch_is_served(runner: TailRunner) -> None:
    log: list[str] = []
    with runner.serving():
        assert runner.submit(_steps(log, "a", 3))
        time.sleep(0.2)
        assert log == []
    _wait_for(lambda: len(log) == 3)


def test_a_full_runner_refuses_and_the_caller_keeps_the_pass(runner: TailRunner) -> None:
    gate = threading.Event()
    log: list[str] = []
    assert runner.submit(_steps(log, "busy", 1, gate))  # taken by the thread, blocked inside its first step
    _wait_for(lambda: runner._tails.empty())
    assert runner.submit(_steps(log, "a", 1)) and runner.submit(_steps(log, "b", 1))
    assert not runner.submit(_steps(log, "c", 1))
    gate.set()
    _wait_for(lambda: len(log) == 3)
    assert "c0" not in log


def test_a_failing_pass_is_reported_and_the_next_one_runs() -> None:
    failures: list[BaseException] = []

    def broken() -> Iterator[None]:
        yield None
        raise RuntimeError("block failed")

    tails = TailRunner("test", on_failed=failures.append)
    log: list[str] = []
    try:
        assert tails.submit(broken())
        assert tails.submit(_steps(log, "a", 1))
        _wait_for(lambda: log == ["a0"])
        assert [str(error) for error in failures] == ["block failed"]
    finally:
        tails.close()


def test_a_closed_runner_takes_nothing() -> None:
    tails = TailRunner("test")
    tails.close()
    assert not tails.submit(iter([None]))
