"""ModelController: tuning from feedback, the accuracy guard, and never acting on stale evidence."""

import numpy as np

from controller.service import ControllerSettings, ModelController
from controller.tuner import TunerSettings
from early_exit.exit_config import NEVER_EXIT, ExitConfig
from early_exit.feedback import FeedbackRecord
from early_exit.manifest import BlockSpec, Manifest, Profile, RampSpec, TensorSpec


def _manifest() -> Manifest:
    blocks = tuple(BlockSpec(f"b{i}", ("x",) if i == 0 else (f"v{i - 1}",), (f"v{i}",), "") for i in range(3))
    ramps = tuple(RampSpec(i, i, {"kind": "linear", "features": 4, "classes": 10}) for i in range(2))
    profile = Profile("cpu", (1, 8), ((2.0, 4.0),) * 3, ((0.01, 0.02),) * 2)
    return Manifest("m", 10, (TensorSpec("x", "float32", (4,)),), blocks, ramps, "r", "", {0: NEVER_EXIT}, profile)


def _records(version: int, n: int, ramp_right: bool, seed: int = 0) -> list[FeedbackRecord]:
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n // 8):
        final = rng.integers(0, 10, 8)
        prediction = (final if ramp_right else (final + 1) % 10)[None, :]
        records.append(FeedbackRecord("m", version, (0,), np.full((1, 8), 0.97, np.float32), prediction, final,
                                      np.full(8, 2)))
    return records


def _controller() -> ModelController:
    settings = ControllerSettings(tuner=TunerSettings(budget=0.01), window=400, min_fresh=200, adjust_every=0)
    return ModelController(_manifest(), ExitConfig("m", 1, {0: NEVER_EXIT}), settings)


def test_good_ramp_gets_opened_and_version_increases() -> None:
    controller = _controller()
    for record in _records(1, 400, ramp_right=True):
        controller.observe(record)
    config = controller.step()
    assert config is not None and config.version == 2 and config.thresholds[0] <= 0.97


def test_no_fresh_feedback_no_change() -> None:
    controller = _controller()
    for record in _records(1, 400, ramp_right=True):
        controller.observe(record)
    assert controller.step() is not None
    assert controller.step() is None  # same evidence: never re-tune (or loosen) on it


def test_accuracy_breach_closes_the_ramp_at_once() -> None:
    controller = _controller()
    for record in _records(1, 400, ramp_right=True):
        controller.observe(record)
    opened = controller.step()
    assert opened is not None and opened.thresholds[0] < NEVER_EXIT
    for record in _records(opened.version, 400, ramp_right=False, seed=1):  # inputs drifted: the ramp is now wrong
        controller.observe(record)
    closed = controller.step()
    assert closed is not None and closed.thresholds[0] == NEVER_EXIT


def test_a_breach_on_served_answers_is_acted_on_before_a_full_round() -> None:
    controller = _controller()
    for record in _records(1, 400, ramp_right=True):
        controller.observe(record)
    opened = controller.step()
    assert opened is not None
    breaching = [
        FeedbackRecord("m", opened.version, (0,), r.confidence, r.prediction, r.final, np.zeros(8, dtype=int))
        for r in _records(opened.version, 64, ramp_right=False, seed=2)  # served at ramp 0, and wrong
    ]
    for record in breaching:
        controller.observe(record)
    assert controller.window.fresh < controller.settings.min_fresh
    tightened = controller.step()
    assert tightened is not None and tightened.thresholds[0] > opened.thresholds[0]
