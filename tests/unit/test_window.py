import numpy as np

from controller.window import FeedbackWindow
from early_exit.feedback import FeedbackRecord


def _record(ramps: tuple[int, ...], n: int, exit_value: int) -> FeedbackRecord:
    return FeedbackRecord("m", 1, ramps, np.full((len(ramps), n), 0.5, np.float32), np.zeros((len(ramps), n), int),
                          np.zeros(n, int), np.full(n, exit_value))


def test_window_keeps_only_recent_samples_and_restarts_on_new_ramp_set() -> None:
    window = FeedbackWindow(capacity=10)
    for _ in range(5):
        window.add(_record((0, 1), 4, 2))
    assert 10 <= len(window) < 14 and window.fresh == 20
    window.add(_record((1,), 3, 2))
    assert len(window) == 3 and window.ramps == (1,)


def test_realised_accuracy_uses_the_answering_exit() -> None:
    record = FeedbackRecord("m", 1, (0,), np.ones((1, 4), np.float32), np.array([[0, 1, 0, 1]]), np.zeros(4, int),
                            np.array([0, 0, 1, 1]))  # samples 0 and 1 exited at ramp 0; 1 disagrees
    window = FeedbackWindow(capacity=100)
    window.add(record)
    assert window.view().realised_accuracy() == 0.75
