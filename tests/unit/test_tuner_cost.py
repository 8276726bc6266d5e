"""The tuning-cost benchmark: its synthetic windows look like ramps along a model, and it reports every size asked."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from workload.tuner_cost import main, synthetic_window


def test_synthetic_ramps_grow_more_confident_and_more_often_right_with_depth() -> None:
    confidence, prediction, final, exit_ms = synthetic_window(4, 5000, seed=0)
    assert confidence.shape == prediction.shape == (4, 5000) and final.shape == (5000,)
    agreement = (prediction == final).mean(axis=1)
    assert np.all(np.diff(confidence.mean(axis=1)) > 0) and np.all(np.diff(agreement) > 0)
    assert np.all(np.diff(exit_ms) > 0) and exit_ms[-1] == 10.0


def test_the_report_has_one_row_per_ramp_count_and_window_size(tmp_path: Path) -> None:
    out = tmp_path / "tuner_cost.md"
    assert main(["--ramps", "2,5", "--samples", "300", "--windows", "1", "--repeats", "1", "--out", str(out)]) == 0
    rows = [line.split("|")[1:3] for line in out.read_text().splitlines()[2:]]
    assert [(r.strip(), n.strip()) for r, n in rows] == [("2", "300"), ("5", "300")]
