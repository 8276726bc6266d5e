"""CPU accounting of the benchmark stack between two readings of Triton's processes."""

from __future__ import annotations

import pytest

from workload.stack import cpu_used


def test_a_stub_a_reload_replaced_between_readings_is_missed_not_subtracted() -> None:
    before = {1: ("tritonserver", 10.0), 2: ("router", 7.0), 3: ("model", 1.0)}
    after = {1: ("tritonserver", 12.0), 4: ("router", 0.5), 3: ("model", 1.0)}  # pid 2 replaced by pid 4
    assert cpu_used(before, after) == pytest.approx({"tritonserver": 2.0, "router": 0.5, "model": 0.0})


def test_a_reused_pid_counts_from_its_start_for_its_new_owner() -> None:
    before = {1: ("tritonserver", 10.0), 2: ("router", 7.0)}
    after = {1: ("tritonserver", 10.5), 2: ("model", 0.25)}
    assert cpu_used(before, after) == pytest.approx({"tritonserver": 0.5, "model": 0.25})
