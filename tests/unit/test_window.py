import numpy as np
import pytest

from controller.latency import measured_exits
from controller.window import FeedbackWindow
from early_exit.feedback import BatchTiming, FeedbackRecord


def _timing(n: int, batch_ms: float = 10.0, overhead_ms: float = 0.0, idle_ms: float = 10.0,
            answer_ms: np.ndarray | None = None) -> BatchTiming:
    return BatchTiming(batch_ms, overhead_ms, idle_ms, np.full(n, batch_ms) if answer_ms is None else answer_ms)


def _record(ramps: tuple[int, ...], n: int, exit_value: int, version: int = 1) -> FeedbackRecord:
    return FeedbackRecord("m", version, ramps, np.full((len(ramps), n), 0.5, np.float32),
                          np.zeros((len(ramps), n), int), np.zeros(n, int), np.full(n, exit_value), _timing(n))


def test_window_keeps_only_recent_samples_and_restarts_on_new_ramp_set() -> None:
    window = FeedbackWindow(capacity=10)
    for _ in range(5):
        window.add(_record((0, 1), 4, 2))
    assert 10 <= len(window) < 14 and window.fresh == 20
    window.add(_record((1,), 3, 2))
    assert len(window) == 3 and window.ramps == (1,)


def test_a_sample_keeps_its_sequence_number_while_the_window_slides() -> None:
    """The controller splits chosen / held-out samples by sequence number: a sample must never change sides."""
    window = FeedbackWindow(capacity=10)
    for label in range(5):  # records of 3 samples, finals 3*label .. 3*label + 2: the final tells samples apart
        record = _record((0,), 3, 1)
        window.add(FeedbackRecord(record.model, 1, (0,), record.confidence, record.prediction,
                                  np.arange(3 * label, 3 * label + 3), record.exit, record.timing))
        view = window.view()
        np.testing.assert_array_equal(view.sequence, view.final)  # sequence number == position in the stream
    assert view.sequence[0] > 0  # older records were dropped, numbering went on
    window.add(_record((1,), 2, 2))
    np.testing.assert_array_equal(window.view().sequence, [0, 1])  # a new ramp set restarts the window


def test_realised_accuracy_uses_the_answering_exit_and_only_the_versions_asked_for() -> None:
    window = FeedbackWindow(capacity=100)
    window.add(FeedbackRecord("m", 1, (0,), np.ones((1, 4), np.float32), np.array([[1, 1, 1, 1]]), np.zeros(4, int),
                              np.array([0, 0, 0, 0]), _timing(4)))  # served under v1 at ramp 0: all wrong
    window.add(FeedbackRecord("m", 2, (0,), np.ones((1, 4), np.float32), np.array([[0, 1, 0, 1]]), np.zeros(4, int),
                              np.array([0, 0, 1, 1]), _timing(4)))  # v2: samples 0, 1 exited at ramp 0; 1 disagrees
    view = window.view()
    assert view.realised_accuracy() == (0.375, 8)
    assert view.realised_accuracy(since_version=2) == (0.75, 4)


def test_measured_saving_counts_early_answers_and_charges_overhead() -> None:
    window = FeedbackWindow(capacity=100)
    # Batch of 4 took 10 ms of which 1 ms was early-exit work; two samples were answered at 3 ms, two at the end.
    answers = np.array([3.0, 3.0, 10.0, 10.0])
    window.add(FeedbackRecord("m", 1, (0,), np.ones((1, 4), np.float32), np.zeros((1, 4), int), np.zeros(4, int),
                              np.array([0, 0, 1, 1]), _timing(4, 10.0, 1.0, 10.0, answers)))
    window.add(FeedbackRecord("m", 1, (0,), np.ones((1, 4), np.float32), np.zeros((1, 4), int), np.zeros(4, int),
                              np.array([0, 0, 1, 1]), _timing(4, 10.0, 1.0, 10.0, answers)))
    view = window.view()
    assert abs(view.busy - 20.0 / 30.0) < 1e-9  # the first batch's idle time precedes the window
    measured = measured_exits(view)
    saving, count = measured.saving_ms(), measured.count
    in_batch = np.mean(9.0 - answers)  # vanilla would have answered everyone at 10 - 1 ms
    assert count == 8 and abs(saving - (in_batch - 1.0 * (2 / 3) / (1 / 3))) < 1e-6


def test_measured_saving_is_the_median_requests_when_fewer_than_half_exit() -> None:
    """A third of the samples answered at 3 ms, the rest at the end of a 10 ms batch with 1 ms of early-exit work:
    on average the exits save time, but the median request waits 1 ms longer than on the vanilla model."""
    window = FeedbackWindow(capacity=100)
    answers = np.array([3.0, 10.0, 10.0])
    for _ in range(4):
        window.add(FeedbackRecord("m", 1, (0,), np.ones((1, 3), np.float32), np.zeros((1, 3), int), np.zeros(3, int),
                                  np.array([0, 1, 1]), _timing(3, 10.0, 1.0, 10.0, answers)))
    measured = measured_exits(window.view())
    queueing = 1.0 * measured.busy / (1 - measured.busy)
    assert measured.in_batch_ms == pytest.approx(9.0 - np.mean(answers))  # +1.33 ms on average
    assert measured.median_in_batch_ms == pytest.approx(-1.0)
    assert measured.saving_ms() == pytest.approx(-1.0 - queueing) and measured.saving_ms() < 0
    assert measured.mean_saving_ms() == pytest.approx(9.0 - np.mean(answers) - queueing)
    assert measured.count == 12


def test_utilisation_counts_batches_that_sent_no_record() -> None:
    """With sampled feedback only traced batches send records; the untraced ones' busy time and waits come with the
    next record, so the window's utilisation is the instance's, not the traced batches'."""
    window = FeedbackWindow(capacity=100)
    # every record: a traced 10 ms batch after 4 ms idle, and since the previous record three untraced batches of
    # 2 ms, each after 4 ms idle (the first record's history precedes the window)
    for _ in range(3):
        timing = BatchTiming(10.0, 0.0, 4.0 + 3 * 4.0, np.full(4, 10.0), unreported_ms=3 * 2.0)
        window.add(FeedbackRecord("m", 1, (0,), np.ones((1, 4), np.float32), np.zeros((1, 4), int),
                                  np.zeros(4, int), np.zeros(4, int), timing))
    busy = 3 * 10.0 + 2 * 6.0
    assert abs(window.view().busy - busy / (busy + 2 * 16.0)) < 1e-9  # 57 %; traced batches alone looked 79 % busy


def test_blocks_run_off_the_request_path_count_as_saved_but_not_as_busy() -> None:
    """A traced batch answered at a ramp finishes its deeper blocks while the instance is idle: their time
    (``tail_ms``) is what its samples' exits saved beyond the batch, and no request waited for it."""
    window = FeedbackWindow(capacity=100)
    for _ in range(2):  # 4 ms to the ramp (0.5 ms of it early-exit work), 6 ms more had it run inline, 10 ms idle
        timing = BatchTiming(4.0, 0.5, 10.0, np.full(2, 4.0), tail_ms=6.0)
        window.add(FeedbackRecord("m", 1, (0,), np.ones((1, 2), np.float32), np.zeros((1, 2), int),
                                  np.zeros(2, int), np.zeros(2, int), timing))
    view = window.view()
    assert abs(view.busy - 8.0 / 18.0) < 1e-9
    measured = measured_exits(view)
    saving, count = measured.saving_ms(), measured.count
    rho = 8.0 / 18.0
    assert count == 4 and abs(saving - ((4.0 + 6.0 - 0.5 - 4.0) - 0.5 * rho / (1 - rho))) < 1e-6


def test_the_window_can_be_cut_to_its_newest_samples() -> None:
    window = FeedbackWindow(capacity=20)
    for _ in range(5):
        window.add(_record((0,), 4, 1))
    assert window.view().newest(6).size == 6
    np.testing.assert_array_equal(window.view().newest(6).sequence, np.arange(14, 20))
    window.keep_latest(6)  # whole records only: the two newest hold 8 samples
    assert len(window) == 8
    np.testing.assert_array_equal(window.view().sequence, np.arange(12, 20))
